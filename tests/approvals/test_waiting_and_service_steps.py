"""Issue 12 in the pure core: a request held `waiting` for a related approval (resume,
fail_waiting, restarts while held) and the verdicts of steps the service runs (route_step)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from connector.approvals.errors import ChainError, NotAnApproverError, StepClosedError
from connector.approvals.lifecycle import (
    fail_waiting,
    is_active,
    may_vote,
    on_record_change,
    open_request,
    recall,
    resume,
    route_step,
)
from connector.approvals.spec import DuplicateCheck, FieldApprovers, Route, RuleSpec, StepSpec
from tests.approvals.test_lifecycle import ROLES, T0, FieldEquals, make_ctx, make_rule, one, vote

CHECK = StepSpec(
    name="check", mode="one", approvers=(), service=DuplicateCheck("number", None, Route("reject"))
)


def held(rule: RuleSpec, values: dict[str, Any] | None = None) -> Any:
    return open_request(
        rule,
        ROLES,
        make_ctx(values),
        record_ref="contract-1",
        submitter="sub",
        now=T0,
        request_id="r1",
        hold="waiting for company-approval of company C-1",
    ).request


def test_a_held_request_waits_with_no_open_step_and_says_why() -> None:
    rule = make_rule(one("lawyer", "eva"))
    outcome = open_request(
        rule, ROLES, make_ctx(), record_ref="c", submitter="sub", now=T0, hold="waiting for X"
    )
    request = outcome.request
    assert (request.status, request.current_step, request.steps) == ("waiting", None, [])
    assert [t.kind for t in outcome.transitions] == ["submitted", "waiting"]
    assert outcome.transitions[-1].comment == "waiting for X"
    assert outcome.events == ("submit",)
    assert is_active(request) and not may_vote(request, "eva")


def test_resume_starts_the_chain_with_the_updated_snapshot() -> None:
    rule = make_rule(one("lawyer", "eva"))
    outcome = resume(
        held(rule),
        rule,
        ROLES,
        now=T0 + timedelta(days=1),
        comment="company approved",
        values={"company.approval": "approved"},
    )
    assert outcome is not None
    request = outcome.request
    assert (request.status, request.current_step) == ("pending", 0)
    assert request.record["company.approval"] == "approved"
    assert [t.kind for t in outcome.transitions] == ["resumed", "entered"]
    assert outcome.transitions[0].comment == "company approved"
    assert vote(request, rule, "eva").request.status == "approved"


def test_resume_and_fail_do_nothing_unless_waiting() -> None:
    rule = make_rule(one("lawyer", "eva"))
    running = resume(held(rule), rule, ROLES, now=T0)
    assert running is not None
    assert resume(running.request, rule, ROLES, now=T0) is None
    assert fail_waiting(running.request, reason="x", now=T0) is None


def test_resume_checks_the_chain_and_changes_nothing_when_nobody_can_approve() -> None:
    # the step applies only once the company is approved, and then nobody is in `manager`
    boss = StepSpec(
        name="boss",
        mode="one",
        approvers=(FieldApprovers("manager"),),
        when=FieldEquals("company.approval", "approved"),
    )
    rule = make_rule(boss)
    request = held(rule, {"company.approval": "pending", "manager": None})
    with pytest.raises(ChainError):
        resume(request, rule, ROLES, now=T0, values={"company.approval": "approved"})
    assert request.status == "waiting" and request.record["company.approval"] == "pending"


def test_fail_waiting_rejects_with_the_dependency_reason_and_fires_reject() -> None:
    outcome = fail_waiting(
        held(make_rule(one("lawyer", "eva"))), reason="company C-1 was rejected: sanctions", now=T0
    )
    assert outcome is not None
    assert outcome.request.status == "rejected" and outcome.request.closed_at == T0
    assert outcome.transitions[-1].comment == "company C-1 was rejected: sanctions"
    assert [(a.event, a.comment) for a in outcome.actions] == [
        ("reject", "company C-1 was rejected: sanctions")
    ]


def test_a_restart_field_change_while_waiting_keeps_waiting_with_the_new_values() -> None:
    rule = make_rule(one("lawyer", "eva"), restart_on_change=frozenset({"amount"}))
    request = held(rule, {"amount": 10})
    outcome = on_record_change(request, rule, ROLES, make_ctx({"amount": 20}), T0)
    assert outcome is not None
    assert (outcome.request.status, outcome.request.record["amount"]) == ("waiting", 20)
    assert [t.kind for t in outcome.transitions] == ["restarted"]


def test_a_waiting_request_may_be_recalled_by_its_submitter() -> None:
    request = held(make_rule(one("lawyer", "eva")))
    assert recall(request, actor="sub", comment=None, now=T0).request.status == "recalled"


def test_a_service_step_opens_with_nobody_assigned_and_people_cannot_vote() -> None:
    rule = make_rule(CHECK, one("lawyer", "eva"))
    request = open_request(rule, ROLES, make_ctx(), record_ref="c", submitter="sub", now=T0).request
    assert (request.current_step, request.steps[0].approvers, request.steps[0].required) == (0, (), 0)
    with pytest.raises(NotAnApproverError):
        vote(request, rule, "eva", step_index=0)


@pytest.mark.parametrize(
    ("route", "status", "step", "tail"),
    [
        (Route("continue"), "pending", 1, ["step_approved", "entered"]),
        (Route("reject"), "rejected", None, ["step_rejected", "rejected"]),
    ],
)
def test_route_step_continue_and_reject(route: Route, status: str, step: int | None, tail: list[str]) -> None:
    rule = make_rule(CHECK, one("lawyer", "eva"))
    request = open_request(rule, ROLES, make_ctx(), record_ref="c", submitter="sub", now=T0).request
    outcome = route_step(
        request,
        rule,
        ROLES,
        step_index=0,
        step_round=1,
        route=route,
        message="why",
        actor="service:check",
        now=T0,
    )
    assert (outcome.request.status, outcome.request.current_step) == (status, step)
    assert [t.kind for t in outcome.transitions] == tail
    assert outcome.transitions[0].actor == "service:check" and outcome.transitions[-1].comment in (
        "why",
        None,
    )


def test_route_step_back_reopens_the_named_step_as_a_new_round_with_the_message() -> None:
    rule = make_rule(one("documents", "anna"), CHECK, one("lawyer", "eva"))
    request = open_request(rule, ROLES, make_ctx(), record_ref="c", submitter="sub", now=T0).request
    request = vote(request, rule, "anna").request
    assert request.current_step == 1
    outcome = route_step(
        request,
        rule,
        ROLES,
        step_index=1,
        step_round=1,
        route=Route("back", "documents"),
        message="send the registry extract",
        actor="service:check",
        now=T0,
    )
    assert [t.kind for t in outcome.transitions] == ["sent_back", "entered"]
    assert outcome.transitions[0].comment == "send the registry extract"
    assert (outcome.request.current_step, outcome.request.steps[-1].round) == (0, 2)
    again = vote(outcome.request, rule, "anna").request
    assert (again.current_step, [s.round for s in again.steps if s.index == 1]) == (1, [1, 2])


def test_a_verdict_for_a_step_no_longer_open_is_refused() -> None:
    rule = make_rule(CHECK, one("lawyer", "eva"))
    request = open_request(rule, ROLES, make_ctx(), record_ref="c", submitter="sub", now=T0).request
    moved = route_step(
        request,
        rule,
        ROLES,
        step_index=0,
        step_round=1,
        route=Route("continue"),
        message=None,
        actor="service:check",
        now=T0,
    ).request
    with pytest.raises(StepClosedError):
        route_step(
            moved,
            rule,
            ROLES,
            step_index=0,
            step_round=1,
            route=Route("reject"),
            message=None,
            actor="service:check",
            now=T0,
        )
