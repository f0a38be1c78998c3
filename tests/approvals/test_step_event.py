"""The `step` action event and the `progress` template variables (pure: no database)."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from typing import Any

from connector.approvals.actions import render_outcome_actions, template_variables
from connector.approvals.lifecycle import cast_vote, open_request, recall
from connector.approvals.spec import ActionSpec, RuleSpec, StepSpec, UserApprovers
from tests.approvals.test_actions import RULE, T0, TODAY, ctx, var

STEP_RULE = replace(
    RULE,
    steps=(
        StepSpec("manager", "one", (UserApprovers(("m1",)),), label="Sales manager"),
        StepSpec("board", "all", (UserApprovers(("b1", "b2")),)),
    ),
    actions={**RULE.actions, "step": ActionSpec(set={"progress": var("progress"), "who": var("approver")})},
)
NAMES = {"m1": "Maria", "b1": "Bao"}.get


def submit() -> Any:
    return open_request(STEP_RULE, {}, ctx(), record_ref="opp-1", submitter="sub", now=T0, request_id="r1")


def vote(
    request: Any, who: str, decision: str = "approve", comment: str | None = None, minutes: int = 5
) -> Any:
    step = request.current_step
    return cast_vote(
        request, STEP_RULE, {}, approver=who, decision=decision, step_index=step,
        now=T0 + timedelta(minutes=minutes), comment=comment,
    )  # fmt: skip


def rendered(outcome: Any) -> list[tuple[str, dict[str, Any]]]:
    actions = render_outcome_actions(
        outcome, STEP_RULE, TODAY, T0, names=lambda u: NAMES(u) or u, request_url="https://x/app/requests/r1"
    )
    return [(a.event, a.values) for a in actions]


def test_step_fires_after_submit_with_where_the_request_waits() -> None:
    [(submit_event, _), (event, values)] = rendered(submit())
    assert (submit_event, event) == ("submit", "step")
    assert values["progress"] == {
        "step": "Sales manager",  # the label
        "step_number": 1,
        "step_count": 2,
        "since": T0.date(),
        "waiting_for": ("Maria",),  # names through the caller's lookup
        "waiting_for_ids": ("m1",),
        "last_comment": None,
        "url": "https://x/app/requests/r1",
    }


def test_step_fires_for_each_step_and_tracks_votes_and_comments() -> None:
    outcome = vote(submit().request, "m1", comment="go")
    [(event, values)] = rendered(outcome)
    progress = values["progress"]
    assert (event, progress["step"], progress["step_number"]) == ("step", "board", 2)  # no label: the name
    assert (progress["waiting_for"], progress["last_comment"]) == (("Bao", "b2"), "go")  # unknown: the id
    partly = vote(outcome.request, "b1", comment="ok by me", minutes=6)
    assert rendered(partly) == []  # a vote that opens nothing moves nothing
    assert template_variables(partly.request, STEP_RULE, TODAY, T0)["progress"]["waiting_for_ids"] == ("b2",)


def test_step_fires_once_more_when_the_request_stops_waiting() -> None:
    approved = vote(vote(vote(submit().request, "m1").request, "b1").request, "b2", comment="signed")
    events = rendered(approved)
    assert [e for e, _ in events] == ["approve", "step"]
    assert events[-1][1]["progress"]["step"] is None
    assert events[-1][1]["who"] == "b2"
    rejected = vote(submit().request, "m1", "reject", comment="no budget")
    assert [e for e, _ in rendered(rejected)] == ["reject", "step"]
    withdrawn = recall(submit().request, actor="sub", now=T0, comment="wrong deal")
    [(_, values)] = [r for r in rendered(withdrawn) if r[0] == "step"]
    assert values["progress"]["step"] is None and values["progress"]["last_comment"] == "wrong deal"


def test_rules_without_a_step_action_write_nothing_more() -> None:
    plain = replace(STEP_RULE, actions=RULE.actions)
    assert [a.event for a in render_outcome_actions(submit(), plain, TODAY, T0)] == ["submit"]


def test_a_step_title_is_its_label_else_its_name() -> None:
    assert isinstance(STEP_RULE, RuleSpec)
    assert [s.title for s in STEP_RULE.steps] == ["Sales manager", "board"]
