"""Action rendering and template variables (connector.approvals.actions)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from connector.approvals.actions import (
    TEMPLATE_VARIABLES,
    render_action,
    render_outcome_actions,
    template_variables,
)
from connector.approvals.errors import ActionRenderError
from connector.approvals.lifecycle import ApprovalRequest, cast_vote, open_request, recall
from connector.approvals.spec import (
    ActionSpec,
    ConditionTrace,
    EvalContext,
    RuleSpec,
    StepSpec,
    UserApprovers,
)

T0 = datetime(2024, 3, 1, 9, 0, tzinfo=UTC)
TODAY = date(2024, 3, 1)
VALUES = {"amount": 500, "status": "Draft"}


@dataclass(frozen=True)
class Always:
    def __call__(self, ctx: EvalContext) -> bool:
        return True

    def explain(self, ctx: EvalContext) -> list[ConditionTrace]:
        return []


@dataclass(frozen=True)
class Never(Always):
    def __call__(self, ctx: EvalContext) -> bool:
        return False


def const(value: Any) -> Any:
    return lambda _variables: value


def var(*path: str) -> Any:
    """Renderer reading a nested template variable, like {{ request.expires_at }}."""

    def render(variables: Mapping[str, Any]) -> Any:
        value: Any = variables
        for key in path:
            value = value[key]
        return value

    return render


RULE = RuleSpec(
    name="Discount",
    when=Always(),
    steps=(
        StepSpec("Manager", "one", (UserApprovers(("m1",)),)),
        StepSpec("CFO", "one", (UserApprovers(("cfo",)),)),
    ),
    actions={
        "submit": ActionSpec(set={"status": const("Pending")}),
        "approve": ActionSpec(
            set={
                "status": const("Approved"),
                "approval_expires": var("request", "expires_at"),
                "approved_by": var("approver"),
                "valid_until": lambda v: v["today"] + timedelta(days=180),
            }
        ),
        "reject": ActionSpec(set={"status": const("Rejected"), "reject_reason": var("comment")}),
    },
    expires_after=timedelta(days=180),
)


def ctx() -> EvalContext:
    return EvalContext(values=dict(VALUES), previous=None, changed_fields=frozenset(), today=TODAY, now=T0)


def pending() -> ApprovalRequest:
    return open_request(RULE, {}, ctx(), record_ref="opp-1", submitter="sub", now=T0, request_id="r1").request


def vote(request: ApprovalRequest, who: str, decision: str = "approve", comment: str | None = None) -> Any:
    return cast_vote(
        request,
        RULE,
        {},
        approver=who,
        decision=decision,
        step_index=request.current_step,  # type: ignore[arg-type]
        now=T0 + timedelta(hours=1),
        comment=comment,
    )


def test_render_action_calls_every_renderer_with_the_variables() -> None:
    seen: list[Mapping[str, Any]] = []

    def spy(variables: Mapping[str, Any]) -> str:
        seen.append(variables)
        return "x"

    variables = {"today": TODAY}
    assert render_action(ActionSpec(set={"a": spy, "b": const(3)}), variables) == {"a": "x", "b": 3}
    assert seen == [variables]


def test_render_action_none_writes_nothing() -> None:
    assert render_action(None, {}) == {}


def test_render_action_failure_names_the_field() -> None:
    with pytest.raises(ActionRenderError) as err:
        render_action(ActionSpec(set={"ok": const(1), "bad": var("missing")}), {})
    assert err.value.field == "bad"
    assert isinstance(err.value.cause, KeyError)


def test_template_variables_pending_request() -> None:
    request = pending()
    now = T0 + timedelta(minutes=5)
    variables = template_variables(request, RULE, TODAY, now, approver="m1", comment="hi")
    assert tuple(variables) == TEMPLATE_VARIABLES
    assert variables["today"] == TODAY and variables["now"] == now
    assert variables["record"] == VALUES
    assert (variables["approver"], variables["comment"]) == ("m1", "hi")
    assert variables["request"] == {
        "id": "r1",
        "rule": "Discount",
        "status": "pending",
        "step": "Manager",
        "step_index": 0,
        "last_step": "Manager",
        "submitter": "sub",
        "record_ref": "opp-1",
        "submitted_at": T0,
        "approved_at": None,
        "expires_at": None,
    }
    assert variables["rule"] == {
        "name": "Discount",
        "steps": ("Manager", "CFO"),
        "expires_after": timedelta(days=180),
    }


def test_template_variables_record_override_and_isolation() -> None:
    request = pending()
    variables = template_variables(request, RULE, TODAY, T0, record={"amount": 1})
    assert variables["record"] == {"amount": 1}
    variables = template_variables(request, RULE, TODAY, T0)
    variables["record"]["amount"] = 0  # a renderer scribbling on its input...
    assert request.record["amount"] == 500  # ...can't corrupt the snapshot


def test_template_variables_after_rejection_name_the_rejecting_step() -> None:
    request = vote(vote(pending(), "m1").request, "cfo", "reject").request
    variables = template_variables(request, RULE, TODAY, T0)
    assert variables["request"]["step"] is None
    assert variables["request"]["step_index"] is None
    assert variables["request"]["last_step"] == "CFO"


def test_render_outcome_actions_on_approval() -> None:
    outcome = vote(vote(pending(), "m1").request, "cfo")
    rendered = render_outcome_actions(outcome, RULE, TODAY, T0 + timedelta(hours=1))
    assert [r.event for r in rendered] == ["approve"]
    assert rendered[0].values == {
        "status": "Approved",
        "approval_expires": T0 + timedelta(hours=1, days=180),
        "approved_by": "cfo",
        "valid_until": date(2024, 8, 28),
    }


def test_render_outcome_actions_on_rejection_carries_comment() -> None:
    outcome = vote(pending(), "m1", "reject", comment="margin too low")
    rendered = render_outcome_actions(outcome, RULE, TODAY, T0)
    assert [(r.event, r.values) for r in rendered] == [
        ("reject", {"status": "Rejected", "reject_reason": "margin too low"})
    ]


def test_render_outcome_actions_in_firing_order_when_everything_is_skipped() -> None:
    rule = RuleSpec(
        name="Discount",
        when=Always(),
        steps=(StepSpec("Manager", "one", (UserApprovers(("m1",)),), when=Never()),),
        actions=RULE.actions,
    )
    outcome = open_request(rule, {}, ctx(), record_ref="opp-1", submitter="sub", now=T0)
    rendered = render_outcome_actions(outcome, rule, TODAY, T0)
    assert [r.event for r in rendered] == ["submit", "approve"]
    assert rendered[1].values["approved_by"] is None  # nobody approved: every step was skipped
    assert rendered[1].values["approval_expires"] is None  # rule has no expires_after


def test_events_without_an_action_spec_are_left_out() -> None:
    outcome = recall(pending(), actor="sub", now=T0)
    assert outcome.events == ("recall",)
    assert render_outcome_actions(outcome, RULE, TODAY, T0) == []
