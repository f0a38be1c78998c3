"""The pure parts of issue 11 items 4-6: connector.approvals.reapproval, .locking and
.crm_vote, on hand-built specs (the pipeline tests drive them through the worker)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from connector.approvals.crm_vote import read_crm_vote
from connector.approvals.lifecycle import ApprovalRequest, cast_vote, flag, on_record_change, open_request
from connector.approvals.locking import LOCK_MODES, answer_edits, locked_edits
from connector.approvals.reapproval import carried_steps, keeps_approval
from connector.approvals.spec import (
    CrmVoteSpec,
    EvalContext,
    FieldApprovers,
    LockSpec,
    RoleApprovers,
    RuleSpec,
    StepSpec,
)
from tests.approvals.test_lifecycle import AmountAbove, FieldEquals

T0 = datetime(2024, 3, 1, 9, 0, tzinfo=UTC)
ROLES: dict[str, tuple[str, ...]] = {"legal": ("l1",), "finance": ("f1",)}
VALUES: dict[str, Any] = {
    "amount": 600,
    "region": "EU",
    "owner": "own",
    "owner_manager": "m1",
    "stage": "open",
}

LEGAL = StepSpec(
    "legal", "one", (RoleApprovers("legal"),), when=FieldEquals("region", "EU"), inputs=frozenset({"region"})
)
FINANCE = StepSpec(
    "finance", "one", (RoleApprovers("finance"),), when=AmountAbove(500), inputs=frozenset({"amount"})
)
MANAGER = StepSpec("manager", "one", (FieldApprovers("owner_manager"),), inputs=frozenset({"owner_manager"}))


def rule(**overrides: Any) -> RuleSpec:
    base = RuleSpec(
        "deal",
        when=lambda ctx: True,  # type: ignore[arg-type]
        steps=(LEGAL, FINANCE, MANAGER),
        restart_on_change=frozenset({"amount", "region", "owner_manager"}),
        smart_reapproval=True,
        crm_vote=CrmVoteSpec("decision", "note"),
        lock=LockSpec(frozenset({"stage", "amount"}), "revert"),
    )
    return replace(base, **overrides)


def ctx(
    values: dict[str, Any], changed: set[str] | None = None, previous: dict[str, Any] | None = None
) -> EvalContext:
    return EvalContext(values, previous, frozenset(changed if changed is not None else values), T0.date(), T0)


def opened(r: RuleSpec) -> ApprovalRequest:
    return open_request(r, ROLES, ctx(dict(VALUES)), record_ref="D-1", submitter="own", now=T0).request


def approve(request: ApprovalRequest, r: RuleSpec, user: str) -> ApprovalRequest:
    index = request.current_step
    assert index is not None
    return cast_vote(request, r, ROLES, approver=user, decision="approve", step_index=index, now=T0).request


# --- smart re-approval ----------------------------------------------------------------------


def test_only_steps_whose_inputs_are_unchanged_are_carried() -> None:
    r = rule()
    request = approve(approve(opened(r), r, "l1"), r, "f1")
    assert carried_steps(r, request, {**VALUES, "amount": 900}, ROLES).keys() == {0}
    assert carried_steps(r, request, {**VALUES, "region": "US"}, ROLES).keys() == {1}
    assert carried_steps(r, request, dict(VALUES), ROLES).keys() == {0, 1}  # manager was never approved


def test_a_step_setting_wins_over_the_rules() -> None:
    assert keeps_approval(rule(), replace(LEGAL, smart_reapproval=False)) is False
    assert keeps_approval(rule(smart_reapproval=False), replace(LEGAL, smart_reapproval=True)) is True
    assert keeps_approval(rule(smart_reapproval=False), LEGAL) is False
    r = rule(steps=(replace(LEGAL, smart_reapproval=False), FINANCE, MANAGER))
    request = approve(approve(opened(r), r, "l1"), r, "f1")
    assert carried_steps(r, request, {**VALUES, "amount": 900}, ROLES) == {}


def test_new_approvers_for_a_step_ask_again_even_with_unchanged_inputs() -> None:
    r = rule()
    request = approve(opened(r), r, "l1")
    assert carried_steps(r, request, dict(VALUES), {**ROLES, "legal": ("l2",)}) == {}


def test_restart_records_carried_steps_and_opens_the_first_changed_one() -> None:
    r = rule()
    request = approve(approve(opened(r), r, "l1"), r, "f1")
    new = ctx({**VALUES, "amount": 900}, {"amount"})
    outcome = on_record_change(
        request,
        r,
        ROLES,
        new,
        T0 + timedelta(hours=1),
        carried=lambda c: carried_steps(r, request, c.values, ROLES),
    )
    assert outcome is not None
    kinds = [(t.kind, t.step_index) for t in outcome.transitions]
    assert kinds == [("restarted", None), ("carried_over", 0), ("entered", 1)]
    carried_row = [s for s in outcome.request.steps if s.index == 0][-1]
    assert (carried_row.status, carried_row.round, carried_row.approvers) == ("approved", 2, ("l1",))
    assert "approved by l1" in (outcome.transitions[1].comment or "")


def test_every_step_carried_approves_the_request() -> None:
    r = rule(steps=(LEGAL, FINANCE))
    request = approve(opened(r), r, "l1")  # legal; finance open
    rejected = cast_vote(request, r, ROLES, approver="f1", decision="reject", step_index=1, now=T0).request
    again = open_request(
        r,
        ROLES,
        ctx(dict(VALUES)),
        record_ref="D-1",
        submitter="own",
        now=T0,
        carried=carried_steps(r, rejected, VALUES, ROLES),
    )
    assert [t.kind for t in again.transitions] == [
        "submitted",
        "carried_over",
        "entered",
    ]  # finance asked again


# --- locking ----------------------------------------------------------------------------------


def test_locked_edits_skip_restart_and_vote_fields_and_unchanged_fields() -> None:
    r = rule(lock=LockSpec(frozenset({"stage", "amount", "decision"}), "revert"))
    request = opened(r)
    edited = ctx({**VALUES, "stage": "won", "amount": 700, "decision": "x"}, {"stage", "amount", "decision"})
    assert [(e.field, e.opened_with, e.new) for e in locked_edits(request, r, edited)] == [
        ("stage", "open", "won")
    ]
    # Not among this change's changed fields: already judged when it was made.
    assert locked_edits(request, r, ctx({**VALUES, "stage": "won"}, {"owner"})) == ()


@pytest.mark.parametrize(
    ("mode", "kind", "write_back"),
    [("revert", "lock_reverted", {"stage": "open"}), ("flag", "lock_flagged", {})],
)
def test_lock_modes(mode: str, kind: str, write_back: dict[str, Any]) -> None:
    r = rule(lock=LockSpec(frozenset({"stage"}), mode))  # type: ignore[arg-type]
    request = opened(r)
    answer = answer_edits(
        request,
        r,
        ctx({**VALUES, "stage": "won"}, {"stage"}),
        editor="rep",
        admins=frozenset({"adm"}),
        now=T0,
    )
    assert answer is not None and dict(answer.write_back) == write_back
    [row] = answer.outcome.transitions
    assert (row.kind, row.actor, row.to_status) == (kind, "rep", "pending")
    assert "stage: 'open' -> 'won'" in (row.comment or "")
    assert (
        answer_edits(
            request,
            r,
            ctx({**VALUES, "stage": "won"}, {"stage"}),
            editor="adm",
            admins=frozenset({"adm"}),
            now=T0,
        )
        is None
    )
    assert set(LOCK_MODES) == {"revert", "flag"}


def test_flag_refuses_kinds_that_are_not_flags() -> None:
    with pytest.raises(ValueError, match="not a flag"):
        flag(opened(rule()), "approved", actor=None, comment="x", now=T0)


# --- votes from a CRM field ---------------------------------------------------------------------


def test_the_author_of_the_change_votes_never_the_value() -> None:
    r = rule()
    request = opened(r)
    change = ctx({**VALUES, "decision": "approve", "note": "ok"}, {"decision", "note"}, previous=dict(VALUES))
    result = read_crm_vote(request, r, ROLES, change, voter="l1", now=T0)
    assert result is not None and result.voted
    assert [(v.approver, v.decision, v.comment) for v in result.outcome.votes] == [("l1", "approve", "ok")]
    assert dict(result.write_back) == {"decision": None, "note": None}
    refused = read_crm_vote(request, r, ROLES, change, voter="f1", now=T0)
    assert refused is not None and not refused.voted and refused.outcome.votes == ()
    assert refused.outcome.transitions[0].kind == "crm_vote_refused"
    assert dict(refused.write_back) == {"decision": None, "note": None}  # as before the change


def test_an_unnamed_author_is_refused() -> None:
    r = rule()
    change = ctx({**VALUES, "decision": "Approve"}, {"decision"})
    result = read_crm_vote(opened(r), r, ROLES, change, voter=None, now=T0)
    assert result is not None and not result.voted
    assert "did not say by whom" in (result.outcome.transitions[0].comment or "")


def test_no_vote_without_a_changed_decision_field() -> None:
    r = rule()
    assert (
        read_crm_vote(
            opened(r), r, ROLES, ctx({**VALUES, "decision": "Approve"}, {"stage"}), voter="l1", now=T0
        )
        is None
    )
    assert (
        read_crm_vote(opened(r), r, ROLES, ctx({**VALUES, "decision": " "}, {"decision"}), voter="l1", now=T0)
        is None
    )
    assert (
        read_crm_vote(
            opened(r), rule(crm_vote=None), ROLES, ctx({**VALUES, "decision": "Approve"}), voter="l1", now=T0
        )
        is None
    )
