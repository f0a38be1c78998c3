"""The approval state machine (connector.approvals.lifecycle)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from connector.approvals.errors import (
    ChainError,
    ConflictError,
    DuplicateVoteError,
    InvalidDecisionError,
    NotAnApproverError,
    PermissionDeniedError,
    RecallNotAllowedError,
    RequestClosedError,
    RuleMismatchError,
    StaleStepError,
    StepClosedError,
)
from connector.approvals.lifecycle import (
    ApprovalRequest,
    Outcome,
    cast_vote,
    current_step_state,
    expire,
    is_active,
    on_record_change,
    open_request,
    plan_chain,
    recall,
    restart_fields,
    step_votes,
)
from connector.approvals.spec import (
    ConditionTrace,
    EvalContext,
    FieldApprovers,
    RejectBehaviour,
    RoleApprovers,
    RuleSpec,
    StepSpec,
    UserApprovers,
)

T0 = datetime(2024, 3, 1, 9, 0, tzinfo=UTC)
ROLES: dict[str, tuple[str, ...]] = {"team": ("a", "b", "c"), "managers": ("m1",), "empty": ()}
VALUES: dict[str, Any] = {"amount": 500, "stage": "Proposal", "owner": "own", "owner_manager": "m1"}


# --- helpers -------------------------------------------------------------------


@dataclass(frozen=True)
class FieldEquals:
    """Hand-written Criterion: values[field] == expected."""

    field: str
    expected: Any

    def __call__(self, ctx: EvalContext) -> bool:
        return ctx.values.get(self.field) == self.expected

    def explain(self, ctx: EvalContext) -> list[ConditionTrace]:
        actual = ctx.values.get(self.field)
        return [ConditionTrace("when", self.field, "eq", self.expected, actual, actual == self.expected)]


@dataclass(frozen=True)
class AmountAbove:
    """Hand-written Criterion: values['amount'] > limit."""

    limit: int

    def __call__(self, ctx: EvalContext) -> bool:
        return (ctx.values.get("amount") or 0) > self.limit

    def explain(self, ctx: EvalContext) -> list[ConditionTrace]:
        return [ConditionTrace("when", "amount", "gt", self.limit, ctx.values.get("amount"), self(ctx))]


ALWAYS = FieldEquals("always", None)  # the field never exists, so None == None
NEVER = FieldEquals("never", "set")


def make_ctx(values: dict[str, Any] | None = None, changed: frozenset[str] = frozenset()) -> EvalContext:
    return EvalContext(
        values=dict(VALUES if values is None else values),
        previous=None,
        changed_fields=changed,
        today=T0.date(),
        now=T0,
    )


def make_rule(*steps: StepSpec, **kwargs: Any) -> RuleSpec:
    return RuleSpec(name="Discount", when=ALWAYS, steps=steps, **kwargs)


def one(name: str, *users: str, **kwargs: Any) -> StepSpec:
    return StepSpec(name=name, mode="one", approvers=(UserApprovers(users),), **kwargs)


def team_step(mode: Any, **kwargs: Any) -> StepSpec:
    return StepSpec(name="Team", mode=mode, approvers=(RoleApprovers("team"),), **kwargs)


def submit(rule: RuleSpec, values: dict[str, Any] | None = None, now: datetime = T0) -> Outcome:
    return open_request(
        rule, ROLES, make_ctx(values), record_ref="opp-1", submitter="sub", now=now, request_id="r1"
    )


def vote(
    request: ApprovalRequest,
    rule: RuleSpec,
    who: str,
    decision: str = "approve",
    *,
    minutes: int = 1,
    step_index: int | None = None,
    **kwargs: Any,
) -> Outcome:
    index = request.current_step if step_index is None else step_index
    assert index is not None
    return cast_vote(
        request,
        rule,
        ROLES,
        approver=who,
        decision=decision,
        step_index=index,
        now=T0 + timedelta(minutes=minutes),
        **kwargs,
    )


def kinds(outcome: Outcome) -> list[str]:
    return [t.kind for t in outcome.transitions]


# --- step modes (table-driven) -----------------------------------------------------


MODE_CASES = [
    pytest.param(team_step("one"), [("a", "approve", "approved")], id="one-approve"),
    pytest.param(team_step("one"), [("a", "reject", "rejected")], id="one-reject"),
    pytest.param(
        team_step("all"),
        [("a", "approve", "pending"), ("b", "approve", "pending"), ("c", "approve", "approved")],
        id="all-needs-every-approver",
    ),
    pytest.param(
        team_step("all"), [("a", "approve", "pending"), ("c", "reject", "rejected")], id="all-one-rejection"
    ),
    pytest.param(team_step("any"), [("b", "approve", "approved")], id="any-first-approval-decides"),
    pytest.param(team_step("any"), [("c", "reject", "rejected")], id="any-first-rejection-decides"),
    pytest.param(
        team_step("quorum", quorum_count=2),
        [("a", "reject", "pending"), ("b", "approve", "pending"), ("c", "approve", "approved")],
        id="quorum-count-reached-despite-rejection",
    ),
    pytest.param(
        team_step("quorum", quorum_count=2),
        [("a", "approve", "pending"), ("b", "reject", "pending"), ("c", "reject", "rejected")],
        id="quorum-count-unreachable",
    ),
    pytest.param(
        team_step("quorum", quorum_percent=Decimal("60")),
        [("a", "approve", "pending"), ("c", "approve", "approved")],
        id="quorum-60-percent-of-3-needs-2",
    ),
    pytest.param(
        team_step("quorum", quorum_percent=Decimal("60")),
        [("b", "reject", "pending"), ("c", "reject", "rejected")],
        id="quorum-60-percent-unreachable-after-2-rejections",
    ),
    pytest.param(
        team_step("quorum", quorum_percent=Decimal("100")),
        [("b", "reject", "rejected")],
        id="quorum-100-percent-first-rejection",
    ),
]


@pytest.mark.parametrize(("step", "votes"), MODE_CASES)
def test_step_modes(step: StepSpec, votes: list[tuple[str, str, str]]) -> None:
    rule = make_rule(step)
    request = submit(rule).request
    events: list[str] = []
    for minute, (who, decision, expected_status) in enumerate(votes, start=1):
        outcome = vote(request, rule, who, decision, minutes=minute)
        request = outcome.request
        events.extend(outcome.events)
        assert request.status == expected_status, (who, decision)
        assert outcome.votes[0].approver == who
    final = {"approved": ["approve"], "rejected": ["reject"]}[request.status]
    assert events == final  # the deciding event fires exactly once
    assert request.current_step is None
    assert request.steps[0].status == request.status  # "approved" / "rejected"
    assert request.steps[0].left_at == T0 + timedelta(minutes=len(votes))


def test_one_mode_with_several_resolved_assigns_only_the_first() -> None:
    rule = make_rule(team_step("one"))
    request = submit(rule).request
    assert current_step_state(request).approvers == ("a",)  # type: ignore[union-attr]
    with pytest.raises(NotAnApproverError):
        vote(request, rule, "b")


def test_undecided_vote_records_vote_without_transition() -> None:
    rule = make_rule(team_step("all"))
    request = submit(rule).request
    outcome = vote(request, rule, "a", comment="fine by me")
    assert outcome.transitions == ()
    assert outcome.actions == ()
    assert [(v.approver, v.decision, v.comment, v.round) for v in outcome.votes] == [
        ("a", "approve", "fine by me", 1)
    ]
    assert outcome.request.version == request.version + 1


# --- reject behaviour (table-driven) ----------------------------------------------


@pytest.mark.parametrize(
    ("on_reject", "skip_middle", "expected_status", "expected_step", "expected_events"),
    [
        pytest.param("reject", False, "rejected", None, ("reject",), id="reject-rejects-request"),
        pytest.param("back", False, "pending", 1, (), id="back-to-previous-step"),
        pytest.param("back", True, "pending", 0, (), id="back-jumps-over-skipped-step"),
        pytest.param("reject", True, "rejected", None, ("reject",), id="reject-with-skipped-step"),
    ],
)
def test_reject_behaviour(
    on_reject: RejectBehaviour,
    skip_middle: bool,
    expected_status: str,
    expected_step: int | None,
    expected_events: tuple[str, ...],
) -> None:
    middle = one("Legal", "legal", when=NEVER if skip_middle else ALWAYS)
    rule = make_rule(one("Manager", "m1"), middle, one("Director", "d1", on_reject=on_reject))
    request = vote(submit(rule).request, rule, "m1").request
    if not skip_middle:
        request = vote(request, rule, "legal", minutes=2).request
    assert request.current_step == 2
    outcome = vote(request, rule, "d1", "reject", minutes=3, comment="too cheap")
    assert outcome.request.status == expected_status
    assert outcome.request.current_step == expected_step
    assert outcome.events == expected_events
    if on_reject == "back":
        assert kinds(outcome) == ["step_rejected", "sent_back", "entered"]
        assert outcome.transitions[1].comment == "too cheap"
        reopened = current_step_state(outcome.request)
        assert (reopened.index, reopened.round, reopened.status) == (expected_step, 2, "pending")  # type: ignore[union-attr]
        assert step_votes(outcome.request, reopened) == []  # type: ignore[arg-type]


def test_back_on_first_step_rejects_request() -> None:
    rule = make_rule(one("Manager", "m1", on_reject="back"), one("Director", "d1"))
    outcome = vote(submit(rule).request, rule, "m1", "reject")
    assert outcome.request.status == "rejected"
    assert outcome.events == ("reject",)
    assert kinds(outcome) == ["step_rejected", "rejected"]


def test_back_on_first_applicable_step_after_skipped_first_step_rejects() -> None:
    rule = make_rule(one("Manager", "m1", when=NEVER), one("Director", "d1", on_reject="back"))
    outcome = vote(submit(rule).request, rule, "d1", "reject")
    assert outcome.request.status == "rejected"


def test_back_clears_previous_step_votes_and_everyone_votes_again() -> None:
    rule = make_rule(
        StepSpec("Team", "all", (UserApprovers(("a", "b")),)),
        one("Director", "d1", on_reject="back"),
    )
    request = submit(rule).request
    request = vote(request, rule, "a").request
    request = vote(request, rule, "b", minutes=2).request
    request = vote(request, rule, "d1", "reject", minutes=3).request
    assert request.current_step == 0
    # a's old approval doesn't count and isn't a duplicate: a may vote again...
    request = vote(request, rule, "a", minutes=4).request
    assert request.current_step == 0  # ...and b must approve again before moving on
    request = vote(request, rule, "b", minutes=5).request
    director = current_step_state(request)
    assert (director.index, director.round) == (1, 2)  # type: ignore[union-attr]
    assert vote(request, rule, "d1", minutes=6).request.status == "approved"
    assert len(request.votes) == 5  # history is kept; only rounds differ


def test_back_over_skipped_step_reskips_it_when_moving_forward() -> None:
    rule = make_rule(
        one("Manager", "m1"), one("Legal", "legal", when=NEVER), one("Director", "d1", on_reject="back")
    )
    request = vote(submit(rule).request, rule, "m1").request
    request = vote(request, rule, "d1", "reject", minutes=2).request
    outcome = vote(request, rule, "m1", minutes=3)
    assert kinds(outcome) == ["step_approved", "skipped", "entered"]
    assert [(s.index, s.round, s.status) for s in outcome.request.steps] == [
        (0, 1, "approved"),
        (1, 1, "skipped"),
        (2, 1, "rejected"),
        (0, 2, "approved"),
        (1, 2, "skipped"),
        (2, 2, "pending"),
    ]


def test_back_from_middle_of_three_returns_to_immediately_previous_step() -> None:
    rule = make_rule(one("Manager", "m1"), one("Legal", "legal", on_reject="back"), one("Director", "d1"))
    request = vote(submit(rule).request, rule, "m1").request
    assert vote(request, rule, "legal", "reject").request.current_step == 0


def test_back_twice_walks_back_step_by_step() -> None:
    rule = make_rule(
        one("Manager", "m1"), one("Legal", "legal", on_reject="back"), one("Director", "d1", on_reject="back")
    )
    request = vote(submit(rule).request, rule, "m1").request
    request = vote(request, rule, "legal", minutes=2).request
    request = vote(request, rule, "d1", "reject", minutes=3).request
    assert request.current_step == 1
    request = vote(request, rule, "legal", "reject", minutes=4).request
    assert request.current_step == 0
    assert current_step_state(request).round == 2  # type: ignore[union-attr]


# --- chains ------------------------------------------------------------------------


def test_final_approver_after_parallel_vote() -> None:
    rule = make_rule(team_step("all"), one("Final", "boss"))
    request = submit(rule).request
    for minute, who in enumerate(("a", "b"), start=1):
        request = vote(request, rule, who, minutes=minute).request
    outcome = vote(request, rule, "c", minutes=3)
    assert kinds(outcome) == ["step_approved", "entered"]
    assert outcome.events == ()  # the request is not approved until the final approver says so
    request = outcome.request
    assert current_step_state(request).approvers == ("boss",)  # type: ignore[union-attr]
    with pytest.raises(NotAnApproverError):
        vote(request, rule, "a", minutes=4)
    final = vote(request, rule, "boss", minutes=4)
    assert final.request.status == "approved"
    assert final.events == ("approve",)
    assert final.actions[0].actor == "boss"


def test_final_approver_can_reject_after_parallel_approval() -> None:
    rule = make_rule(StepSpec("Team", "all", (UserApprovers(("a", "b")),)), one("Final", "boss"))
    request = vote(submit(rule).request, rule, "a").request
    request = vote(request, rule, "b", minutes=2).request
    outcome = vote(request, rule, "boss", "reject", minutes=3, comment="no")
    assert outcome.request.status == "rejected"
    assert outcome.actions[0].comment == "no"


def test_same_person_in_two_steps_votes_in_each() -> None:
    rule = make_rule(one("Manager", "m1"), StepSpec("Pair", "all", (UserApprovers(("m1", "x")),)))
    request = vote(submit(rule).request, rule, "m1").request
    assert request.current_step == 1
    # step 1's vote is not carried over: m1 and x must both approve step 2
    request = vote(request, rule, "x", minutes=2).request
    assert request.status == "pending"
    assert vote(request, rule, "m1", minutes=3).request.status == "approved"


def test_later_step_entry_criteria_use_the_snapshot() -> None:
    rule = make_rule(one("Manager", "m1"), one("CFO", "cfo", when=AmountAbove(1000)))
    small = vote(submit(rule, {**VALUES, "amount": 500}).request, rule, "m1")
    assert small.request.status == "approved"
    assert kinds(small) == ["step_approved", "skipped", "approved"]
    large = vote(submit(rule, {**VALUES, "amount": 5000}).request, rule, "m1")
    assert large.request.current_step == 1


def test_later_step_approvers_resolve_from_record_field() -> None:
    rule = make_rule(one("Owner", "own"), StepSpec("Mgr", "one", (FieldApprovers("owner_manager"),)))
    request = vote(submit(rule).request, rule, "own").request
    assert current_step_state(request).approvers == ("m1",)  # type: ignore[union-attr]


# --- submit --------------------------------------------------------------------------


def test_open_request_initial_state() -> None:
    rule = make_rule(one("Manager", "m1"))
    outcome = submit(rule)
    request = outcome.request
    assert (request.id, request.rule_name, request.record_ref, request.submitter) == (
        "r1",
        "Discount",
        "opp-1",
        "sub",
    )
    assert request.status == "pending" and is_active(request)
    assert request.current_step == 0
    assert request.record == VALUES
    assert request.version == 1
    assert outcome.events == ("submit",)
    assert outcome.actions[0].actor == "sub"
    assert [
        (t.seq, t.kind, t.from_status, t.to_status, t.step_index, t.actor) for t in outcome.transitions
    ] == [
        (1, "submitted", None, "submitted", None, "sub"),
        (2, "entered", "submitted", "pending", 0, None),
    ]
    step = outcome.steps[0]
    assert (step.name, step.mode, step.approvers, step.required, step.status) == (
        "Manager",
        "one",
        ("m1",),
        1,
        "pending",
    )
    assert (step.entered_at, step.left_at) == (T0, None)


@pytest.mark.parametrize(
    "steps",
    [
        pytest.param((one("Manager", "m1", when=NEVER), one("CFO", "cfo", when=NEVER)), id="all-skipped"),
        pytest.param((), id="no-steps"),
    ],
)
def test_nothing_to_approve_approves_at_submit(steps: tuple[StepSpec, ...]) -> None:
    rule = make_rule(*steps, expires_after=timedelta(days=180))
    outcome = submit(rule)
    assert outcome.request.status == "approved"
    assert outcome.events == ("submit", "approve")
    assert outcome.actions[1].actor is None  # nobody approved: the engine did
    assert kinds(outcome) == ["submitted"] + ["skipped"] * len(steps) + ["approved"]
    assert outcome.request.approved_at == T0
    assert outcome.request.expires_at == T0 + timedelta(days=180)
    assert all(s.status == "skipped" and s.left_at == T0 for s in outcome.request.steps)


def test_first_steps_skipped_then_pending() -> None:
    outcome = submit(make_rule(one("Manager", "m1", when=NEVER), one("CFO", "cfo")))
    assert kinds(outcome) == ["submitted", "skipped", "entered"]
    assert outcome.transitions[1].to_status == "submitted"
    assert outcome.request.current_step == 1


def test_step_resolving_to_nobody_fails_submit() -> None:
    rule = make_rule(StepSpec("Mgr", "one", (FieldApprovers("owner_manager"),)))
    with pytest.raises(ChainError) as err:
        submit(rule, {**VALUES, "owner_manager": None})
    assert err.value.step == "Mgr"
    assert "owner_manager" in str(err.value)


def test_later_step_resolving_to_nobody_fails_submit_up_front() -> None:
    rule = make_rule(one("Manager", "m1"), StepSpec("Board", "all", (RoleApprovers("empty"),)))
    with pytest.raises(ChainError, match="Board"):
        submit(rule)


def test_skipped_step_with_unresolvable_approvers_is_fine() -> None:
    rule = make_rule(one("Manager", "m1"), StepSpec("Board", "all", (RoleApprovers("nope"),), when=NEVER))
    assert submit(rule).request.status == "pending"


def test_plan_chain_previews_assignments() -> None:
    rule = make_rule(team_step("quorum", quorum_percent=Decimal("60")), one("CFO", "cfo", when=NEVER))
    plan = plan_chain(rule, ROLES, make_ctx())
    assert [(s.name, a.approvers if a else None, a.required if a else None) for s, a in plan] == [
        ("Team", ("a", "b", "c"), 2),
        ("CFO", None, None),
    ]


def test_request_id_defaults_to_a_fresh_id() -> None:
    rule = make_rule(one("Manager", "m1"))
    first = open_request(rule, ROLES, make_ctx(), record_ref="x", submitter="s", now=T0).request
    second = open_request(rule, ROLES, make_ctx(), record_ref="x", submitter="s", now=T0).request
    assert first.id and first.id != second.id


# --- vote errors ---------------------------------------------------------------------


@pytest.fixture
def all_rule() -> RuleSpec:
    return make_rule(team_step("all"), one("Final", "boss"))


@pytest.fixture
def pending(all_rule: RuleSpec) -> ApprovalRequest:
    return submit(all_rule).request


@pytest.mark.parametrize("decision", ["approved", "APPROVE", "", "abstain"])
def test_invalid_decision(pending: ApprovalRequest, all_rule: RuleSpec, decision: str) -> None:
    with pytest.raises(InvalidDecisionError):
        vote(pending, all_rule, "a", decision)


def test_not_an_approver(pending: ApprovalRequest, all_rule: RuleSpec) -> None:
    with pytest.raises(NotAnApproverError) as err:
        vote(pending, all_rule, "boss")  # boss is assigned to the *next* step only
    assert isinstance(err.value, PermissionDeniedError)


def test_duplicate_vote(pending: ApprovalRequest, all_rule: RuleSpec) -> None:
    request = vote(pending, all_rule, "a").request
    for decision in ("approve", "reject"):
        with pytest.raises(DuplicateVoteError):
            vote(request, all_rule, "a", decision, minutes=2)


def test_vote_on_closed_step(pending: ApprovalRequest, all_rule: RuleSpec) -> None:
    request = pending
    for who in ("a", "b", "c"):
        request = vote(request, all_rule, who).request
    assert request.current_step == 1
    with pytest.raises(StepClosedError):
        vote(request, all_rule, "boss", step_index=0)


def test_vote_naming_a_step_not_reached_is_stale(pending: ApprovalRequest, all_rule: RuleSpec) -> None:
    for index in (1, 7, -1):
        with pytest.raises(StaleStepError):
            vote(pending, all_rule, "a", step_index=index)


def test_vote_on_closed_round_after_back() -> None:
    rule = make_rule(one("Manager", "m1"), one("Director", "d1", on_reject="back"))
    request = vote(submit(rule).request, rule, "m1").request
    request = vote(request, rule, "d1", "reject", minutes=2).request
    with pytest.raises(StepClosedError):
        vote(request, rule, "m1", step_round=1, minutes=3)  # the caller saw round 1
    with pytest.raises(StaleStepError):
        vote(request, rule, "m1", step_round=3, minutes=3)
    assert vote(request, rule, "m1", step_round=2, minutes=3).request.current_step == 1


@pytest.mark.parametrize(
    "close",
    [
        pytest.param(lambda r, rule: recall(r, actor="sub", now=T0).request, id="after-recall"),
        pytest.param(lambda r, rule: vote(r, rule, "a", "reject").request, id="after-rejection"),
    ],
)
def test_vote_on_closed_request(pending: ApprovalRequest, all_rule: RuleSpec, close: Any) -> None:
    closed = close(pending, all_rule)
    with pytest.raises(RequestClosedError) as err:
        vote(closed, all_rule, "b", step_index=0, minutes=5)
    assert isinstance(err.value, ConflictError)


def test_vote_after_approval() -> None:
    rule = make_rule(team_step("any"))
    approved = vote(submit(rule).request, rule, "a").request
    assert approved.status == "approved"
    with pytest.raises(RequestClosedError):
        vote(approved, rule, "b", step_index=0, minutes=2)


def test_vote_with_a_different_rule_is_refused(pending: ApprovalRequest) -> None:
    other = RuleSpec(name="Other", when=ALWAYS, steps=(team_step("all"),))
    with pytest.raises(RuleMismatchError):
        vote(pending, other, "a")


def test_vote_after_mapping_edit_renamed_current_step(pending: ApprovalRequest) -> None:
    edited = make_rule(StepSpec("Renamed", "all", (RoleApprovers("team"),)))
    with pytest.raises(RuleMismatchError):
        vote(pending, edited, "a")


def test_failed_operations_change_nothing(pending: ApprovalRequest, all_rule: RuleSpec) -> None:
    before = copy.deepcopy(pending)
    for who, kwargs in (("zz", {}), ("a", {"step_index": 1})):
        with pytest.raises(Exception):  # noqa: B017 - any refusal must leave the state alone
            vote(pending, all_rule, who, **kwargs)
    assert pending == before


def test_chain_error_mid_flight_leaves_request_untouched() -> None:
    rule = make_rule(one("Manager", "m1"), StepSpec("Board", "all", (RoleApprovers("board"),)))
    roles_at_submit = {**ROLES, "board": ("x",)}
    request = open_request(
        rule, roles_at_submit, make_ctx(), record_ref="r", submitter="s", now=T0, request_id="r1"
    ).request
    before = copy.deepcopy(request)
    with pytest.raises(ChainError, match="board"):
        vote(request, rule, "m1")  # ROLES has no "board" any more
    assert request == before


def test_operations_do_not_mutate_their_input(pending: ApprovalRequest, all_rule: RuleSpec) -> None:
    before = copy.deepcopy(pending)
    vote(pending, all_rule, "a")
    recall(pending, actor="sub", now=T0)
    assert pending == before


# --- admin -----------------------------------------------------------------------------


def test_admin_vote_decides_the_step_and_is_recorded(pending: ApprovalRequest, all_rule: RuleSpec) -> None:
    outcome = vote(pending, all_rule, "root", is_admin=True, comment="urgent")
    assert outcome.request.current_step == 1  # the "all" step closed on one admin vote
    assert outcome.votes[0].acting_admin is True
    approved = [t for t in outcome.transitions if t.kind == "step_approved"]
    assert approved[0].acting_admin is True and approved[0].actor == "root"


def test_admin_rejection_applies_on_reject(pending: ApprovalRequest, all_rule: RuleSpec) -> None:
    outcome = vote(pending, all_rule, "root", "reject", is_admin=True)
    assert outcome.request.status == "rejected"
    assert outcome.transitions[-1].acting_admin is True


def test_assigned_approver_with_admin_flag_votes_normally(
    pending: ApprovalRequest, all_rule: RuleSpec
) -> None:
    outcome = vote(pending, all_rule, "a", is_admin=True)
    assert outcome.request.current_step == 0  # counted as one of three, no override
    assert outcome.votes[0].acting_admin is False


def test_admin_cannot_vote_on_stale_step(pending: ApprovalRequest, all_rule: RuleSpec) -> None:
    with pytest.raises(StaleStepError):
        vote(pending, all_rule, "root", is_admin=True, step_index=1)


# --- recall ----------------------------------------------------------------------------


def test_recall_by_submitter(pending: ApprovalRequest) -> None:
    outcome = recall(pending, actor="sub", now=T0 + timedelta(hours=1), comment="oops")
    request = outcome.request
    assert request.status == "recalled" and not is_active(request)
    assert request.current_step is None
    assert request.closed_at == T0 + timedelta(hours=1)
    assert outcome.events == ("recall",)
    assert [(t.kind, t.from_status, t.actor, t.comment, t.acting_admin) for t in outcome.transitions] == [
        ("recalled", "pending", "sub", "oops", False)
    ]
    assert [(s.status, s.left_at) for s in outcome.steps] == [("cancelled", T0 + timedelta(hours=1))]


def test_recall_by_admin_is_recorded_as_admin(pending: ApprovalRequest) -> None:
    outcome = recall(pending, actor="root", now=T0, is_admin=True)
    assert outcome.request.status == "recalled"
    assert outcome.transitions[0].acting_admin is True


def test_recall_by_someone_else(pending: ApprovalRequest) -> None:
    with pytest.raises(RecallNotAllowedError):
        recall(pending, actor="a", now=T0)


def test_recall_twice_or_after_approval() -> None:
    rule = make_rule(team_step("any"))
    request = submit(rule).request
    recalled = recall(request, actor="sub", now=T0).request
    approved = vote(request, rule, "a").request
    for closed in (recalled, approved):
        with pytest.raises(RequestClosedError):
            recall(closed, actor="sub", now=T0)


# --- expiry ----------------------------------------------------------------------------


@pytest.fixture
def approved() -> ApprovalRequest:
    rule = make_rule(one("Manager", "m1"), expires_after=timedelta(days=180))
    request = vote(submit(rule).request, rule, "m1", minutes=10).request
    assert request.expires_at == T0 + timedelta(minutes=10, days=180)
    return request


def test_expire_before_expiry_is_a_no_op(approved: ApprovalRequest) -> None:
    assert expire(approved, approved.expires_at - timedelta(seconds=1)) is None  # type: ignore[operator]


def test_expire_at_expiry(approved: ApprovalRequest) -> None:
    outcome = expire(approved, approved.expires_at)  # type: ignore[arg-type]
    assert outcome is not None
    assert outcome.request.status == "expired"
    assert outcome.request.expired_at == approved.expires_at
    assert outcome.events == ("expire",)
    assert [(t.kind, t.from_status, t.to_status, t.actor) for t in outcome.transitions] == [
        ("expired", "approved", "expired", None)
    ]
    assert expire(outcome.request, approved.expires_at + timedelta(days=1)) is None  # type: ignore[operator]


def test_expire_ignores_requests_that_are_not_approved(pending: ApprovalRequest) -> None:
    assert expire(pending, T0 + timedelta(days=10_000)) is None


def test_approval_without_expires_after_never_expires() -> None:
    rule = make_rule(one("Manager", "m1"))
    request = vote(submit(rule).request, rule, "m1").request
    assert request.expires_at is None
    assert expire(request, T0 + timedelta(days=10_000)) is None


# --- record changes and restart ---------------------------------------------------------


@pytest.fixture
def restart_rule() -> RuleSpec:
    return make_rule(
        StepSpec("Team", "all", (UserApprovers(("a", "b")),)),
        one("Director", "d1"),
        restart_on_change=frozenset({"amount"}),
    )


def test_restart_fields_compares_with_snapshot(pending: ApprovalRequest, restart_rule: RuleSpec) -> None:
    assert restart_fields(pending, restart_rule, make_ctx({**VALUES, "amount": 900})) == {"amount"}
    # the CRM saying "amount changed" is not enough: the value must differ
    assert restart_fields(pending, restart_rule, make_ctx(VALUES, changed=frozenset({"amount"}))) == set()
    assert restart_fields(pending, restart_rule, make_ctx({"stage": "Won"})) == set()  # field absent


def test_restart_while_pending(restart_rule: RuleSpec) -> None:
    request = submit(restart_rule).request
    request = vote(request, restart_rule, "a").request
    request = vote(request, restart_rule, "b", minutes=2).request
    assert request.current_step == 1
    now = T0 + timedelta(minutes=3)
    outcome = on_record_change(request, restart_rule, ROLES, make_ctx({**VALUES, "amount": 900}), now)
    assert outcome is not None
    new = outcome.request
    assert kinds(outcome) == ["restarted", "entered"]
    assert outcome.transitions[0].comment == "changed: amount"
    assert (outcome.transitions[0].from_status, outcome.transitions[0].to_status) == ("pending", "submitted")
    assert outcome.events == ("submit",)
    assert new.record["amount"] == 900
    assert new.current_step == 0
    assert [(s.index, s.round, s.status) for s in outcome.steps] == [(1, 1, "cancelled"), (0, 2, "pending")]
    # votes cleared: a and b must approve again
    request = vote(new, restart_rule, "a", minutes=4).request
    assert request.current_step == 0
    assert vote(request, restart_rule, "b", minutes=5).request.current_step == 1


def test_redelivered_change_does_not_restart_twice(restart_rule: RuleSpec) -> None:
    request = submit(restart_rule).request
    ctx = make_ctx({**VALUES, "amount": 900}, changed=frozenset({"amount"}))
    restarted = on_record_change(request, restart_rule, ROLES, ctx, T0)
    assert restarted is not None
    assert on_record_change(restarted.request, restart_rule, ROLES, ctx, T0) is None


def test_other_edits_while_pending_change_nothing(restart_rule: RuleSpec) -> None:
    request = submit(restart_rule).request
    ctx = make_ctx({**VALUES, "stage": "Negotiation"}, changed=frozenset({"stage"}))
    assert on_record_change(request, restart_rule, ROLES, ctx, T0) is None


def test_rule_without_restart_fields_never_restarts() -> None:
    rule = make_rule(one("Manager", "m1"))
    request = submit(rule).request
    assert on_record_change(request, rule, ROLES, make_ctx({**VALUES, "amount": 1}), T0) is None


def test_change_on_closed_request_is_ignored(restart_rule: RuleSpec) -> None:
    recalled = recall(submit(restart_rule).request, actor="sub", now=T0).request
    assert on_record_change(recalled, restart_rule, ROLES, make_ctx({**VALUES, "amount": 1}), T0) is None


def test_restart_re_evaluates_entry_criteria() -> None:
    rule = make_rule(
        one("Manager", "m1", when=AmountAbove(100)),
        one("CFO", "cfo", when=AmountAbove(1000)),
        restart_on_change=frozenset({"amount"}),
    )
    request = submit(rule).request  # amount 500: Manager only
    assert request.current_step == 0
    outcome = on_record_change(request, rule, ROLES, make_ctx({**VALUES, "amount": 50}), T0)
    assert outcome is not None
    assert outcome.request.status == "approved"  # nothing applies any more
    assert outcome.events == ("submit", "approve")


def test_restart_with_partial_payload_keeps_other_snapshot_values(restart_rule: RuleSpec) -> None:
    request = submit(restart_rule).request
    outcome = on_record_change(request, restart_rule, ROLES, make_ctx({"amount": 900}), T0)
    assert outcome is not None
    assert outcome.request.record == {**VALUES, "amount": 900}


def test_restart_into_unassignable_chain_changes_nothing() -> None:
    rule = make_rule(
        StepSpec("Mgr", "one", (FieldApprovers("owner_manager"),)),
        restart_on_change=frozenset({"owner_manager"}),
    )
    request = submit(rule).request
    before = copy.deepcopy(request)
    with pytest.raises(ChainError):
        on_record_change(request, rule, ROLES, make_ctx({**VALUES, "owner_manager": ""}), T0)
    assert request == before


def test_snapshot_is_frozen_for_later_entry_criteria() -> None:
    rule = make_rule(one("Manager", "m1"), one("CFO", "cfo", when=AmountAbove(1000)))
    request = submit(rule).request
    # amount edited to 5000 (not a restart field): the snapshot, not the edit, decides
    assert on_record_change(request, rule, ROLES, make_ctx({**VALUES, "amount": 5000}), T0) is None
    assert vote(request, rule, "m1").request.status == "approved"


def test_today_override_reaches_later_entry_criteria() -> None:
    @dataclass(frozen=True)
    class InQuarterEnd:
        def __call__(self, ctx: EvalContext) -> bool:
            return ctx.today == date(2024, 3, 31)

        def explain(self, ctx: EvalContext) -> list[ConditionTrace]:
            return []

    rule = make_rule(one("Manager", "m1"), one("CFO", "cfo", when=InQuarterEnd()))
    request = submit(rule).request
    assert vote(request, rule, "m1").request.status == "approved"
    assert vote(request, rule, "m1", today=date(2024, 3, 31)).request.current_step == 1


# --- audit trail -------------------------------------------------------------------------


def test_transition_log_is_ordered_and_complete(all_rule: RuleSpec) -> None:
    request = submit(all_rule).request
    for minute, who in enumerate(("a", "b", "c", "boss"), start=1):
        request = vote(request, all_rule, who, minutes=minute).request
    assert [t.seq for t in request.transitions] == list(range(1, len(request.transitions) + 1))
    assert [(t.kind, t.step_index, t.actor) for t in request.transitions] == [
        ("submitted", None, "sub"),
        ("entered", 0, None),
        ("step_approved", 0, "c"),
        ("entered", 1, None),
        ("step_approved", 1, "boss"),
        ("approved", None, "boss"),
    ]
    team, final = request.steps
    assert (team.entered_at, team.left_at) == (T0, T0 + timedelta(minutes=3))
    assert (final.entered_at, final.left_at) == (T0 + timedelta(minutes=3), T0 + timedelta(minutes=4))
    assert request.version == 5  # submit + four votes
    assert request.closed_at == request.approved_at == T0 + timedelta(minutes=4)


def test_outcome_rows_match_request_children(all_rule: RuleSpec) -> None:
    outcome = vote(submit(all_rule).request, all_rule, "root", is_admin=True)
    assert outcome.transitions == tuple(outcome.request.transitions[-len(outcome.transitions) :])
    assert outcome.votes == tuple(outcome.request.votes[-1:])
    assert {(s.index, s.round) for s in outcome.steps} == {(0, 1), (1, 1)}
