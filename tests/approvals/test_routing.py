"""Deputies (chains, cycles), the manager chain, CRM queues and asking the same approver once:
connector.approvals.routing and its hooks in the lifecycle."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from connector.approvals.errors import ChainError, NotAnApproverError
from connector.approvals.lifecycle import (
    cast_vote,
    current_step_state,
    delegate_open_step,
    may_see,
    open_request,
    step_votes,
)
from connector.approvals.routing import (
    Delegation,
    RoutingContext,
    describe_cycle,
    find_cycle,
    managers_above,
    managers_of_approvers,
)
from connector.approvals.spec import (
    ConditionTrace,
    EvalContext,
    ManagerApprovers,
    QueueApprovers,
    RuleSpec,
    SameApprover,
    StepMode,
    StepSpec,
    UserApprovers,
)

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
TODAY = T0.date()
VALUES: dict[str, Any] = {"owner": "rep", "amount": 10}


@dataclass
class OrgChart:
    """The directory as data (connector.approvals.routing.Org), for the pure engine."""

    managers: dict[str, str] = field(default_factory=dict)
    inactive: set[str] = field(default_factory=set)
    queues: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def manager_id(self, user_id: str) -> str | None:
        return self.managers.get(user_id)

    def is_active(self, user_id: str) -> bool:
        return user_id not in self.inactive

    def queue_members(self, queue: str) -> tuple[str, ...] | None:
        return self.queues.get(queue)

    def queue_names(self) -> tuple[str, ...]:
        return tuple(sorted(self.queues))


@dataclass(frozen=True)
class Always:
    def __call__(self, ctx: EvalContext) -> bool:
        return True

    def explain(self, ctx: EvalContext) -> list[ConditionTrace]:
        return []


def ctx(values: dict[str, Any] | None = None) -> EvalContext:
    return EvalContext(dict(values or VALUES), None, frozenset(), TODAY, T0)


def step(name: str, *users: str, mode: StepMode = "all") -> StepSpec:
    return StepSpec(name, mode, (UserApprovers(users),))


def rule(*steps: StepSpec, same: SameApprover = "ask_each_step", name: str = "deal") -> RuleSpec:
    return RuleSpec(name, Always(), steps, same_approver=same)


def away(
    user: str, deputy: str, days: int = 10, *, rule_name: str | None = None, start: int = 0
) -> Delegation:
    return Delegation(user, deputy, TODAY + timedelta(days=start), TODAY + timedelta(days=days), rule_name)


def routing(*delegations: Delegation, org: OrgChart | None = None, today: date = TODAY) -> RoutingContext:
    return RoutingContext({"team": ("a", "b")}, org=org, delegations=delegations, today=today)


# --- delegation -----------------------------------------------------------------------------------


def test_a_step_goes_to_the_deputy_and_the_vote_is_recorded_on_behalf_of_the_approver() -> None:
    r = rule(step("manager", "a"))
    out = open_request(r, routing(away("a", "b")), ctx(), record_ref="x", submitter="rep", now=T0)
    row = current_step_state(out.request)
    assert row is not None and row.approvers == ("b",) and row.on_behalf_of == {"b": "a"}
    delegated = [t for t in out.transitions if t.kind == "delegated"]
    assert len(delegated) == 1 and "a -> b" in (delegated[0].comment or "")
    assert may_see(out.request, "a") and may_see(out.request, "b")
    with pytest.raises(NotAnApproverError):
        cast_vote(out.request, r, routing(), approver="a", decision="approve", step_index=0, now=T0)
    voted = cast_vote(out.request, r, routing(), approver="b", decision="approve", step_index=0, now=T0)
    (vote,) = voted.votes
    assert (vote.approver, vote.on_behalf_of, vote.auto_reason) == ("b", "a", None)
    assert voted.request.status == "approved"


def test_deputies_chain_and_the_place_keeps_the_original_approver() -> None:
    r = rule(step("manager", "a"))
    ctxt = routing(away("a", "b"), away("b", "c"), away("c", "d"))
    out = open_request(r, ctxt, ctx(), record_ref="x", submitter="rep", now=T0)
    row = current_step_state(out.request)
    assert row is not None and row.approvers == ("d",) and row.on_behalf_of == {"d": "a"}
    assert any("a -> b -> c -> d" in (t.comment or "") for t in out.transitions)


def test_a_cycle_met_while_routing_keeps_the_step_with_its_approver_and_says_why() -> None:
    r = rule(step("manager", "a"))
    out = open_request(
        r, routing(away("a", "b"), away("b", "a")), ctx(), record_ref="x", submitter="rep", now=T0
    )
    row = current_step_state(out.request)
    assert row is not None and row.approvers == ("a",) and row.on_behalf_of == {}
    notes = [t.comment for t in out.transitions if t.kind == "delegated"]
    assert notes == []
    opened = [t.comment for t in out.transitions if t.kind == "entered"]
    assert opened and "cycle (a -> b -> a)" in (opened[0] or "")


def test_delegations_count_only_within_their_dates_and_rule() -> None:
    r = rule(step("manager", "a"), name="deal")
    later = routing(away("a", "b", days=5, start=1))
    assert current_step_state(
        open_request(r, later, ctx(), record_ref="x", submitter="rep", now=T0).request
    ).approvers == ("a",)  # type: ignore[union-attr]
    other_rule = routing(away("a", "b", rule_name="quote"))
    out = open_request(r, other_rule, ctx(), record_ref="x", submitter="rep", now=T0)
    assert current_step_state(out.request).approvers == ("a",)  # type: ignore[union-attr]
    both = routing(away("a", "b"), away("a", "c", rule_name="deal"))
    out = open_request(r, both, ctx(), record_ref="x", submitter="rep", now=T0)
    assert current_step_state(out.request).approvers == ("c",)  # type: ignore[union-attr]


def test_a_deputy_who_submitted_the_request_or_is_on_the_step_leaves_the_place_where_it_was() -> None:
    r = rule(step("manager", "a"))
    out = open_request(r, routing(away("a", "rep")), ctx(), record_ref="x", submitter="rep", now=T0)
    assert current_step_state(out.request).approvers == ("a",)  # type: ignore[union-attr]
    r2 = rule(step("pair", "a", "b"))
    out = open_request(r2, routing(away("a", "b")), ctx(), record_ref="x", submitter="rep", now=T0)
    assert current_step_state(out.request).approvers == ("a", "b")  # type: ignore[union-attr]
    assert any("already approves" in (t.comment or "") for t in out.transitions if t.kind == "entered")
    assert not [t for t in out.transitions if t.kind == "delegated"]


def test_an_open_step_moves_to_a_deputy_set_later_but_votes_cast_stay() -> None:
    r = rule(step("pair", "a", "c"))
    out = open_request(r, routing(), ctx(), record_ref="x", submitter="rep", now=T0)
    out = cast_vote(out.request, r, routing(), approver="c", decision="approve", step_index=0, now=T0)
    assert delegate_open_step(out.request, r, routing(), T0) is None
    moved = delegate_open_step(out.request, r, routing(away("a", "b"), away("c", "d")), T0)
    assert moved is not None
    row = current_step_state(moved.request)
    assert row is not None and row.approvers == ("b", "c") and row.on_behalf_of == {"b": "a"}
    assert [t.kind for t in moved.transitions] == ["delegated"]
    assert delegate_open_step(moved.request, r, routing(away("a", "b"), away("c", "d")), T0) is None
    done = cast_vote(moved.request, r, routing(), approver="b", decision="approve", step_index=0, now=T0)
    assert done.request.status == "approved"
    assert [v.on_behalf_of for v in done.request.votes] == [None, "a"]


def test_cycles_are_found_at_set_time_only_when_dates_and_rules_overlap() -> None:
    existing = [Delegation("a", "b", date(2026, 12, 1), date(2026, 12, 10), id=1)]
    cycle = find_cycle(existing, Delegation("b", "a", date(2026, 12, 5), date(2026, 12, 20)))
    assert cycle is not None
    assert describe_cycle(cycle) == "b -> a (2026-12-05..2026-12-20) -> b (2026-12-01..2026-12-10)"
    assert find_cycle(existing, Delegation("b", "a", date(2026, 12, 11), date(2026, 12, 20))) is None
    scoped = [Delegation("a", "b", date(2026, 12, 1), date(2026, 12, 10), rule="deal", id=1)]
    assert (
        find_cycle(scoped, Delegation("b", "a", date(2026, 12, 1), date(2026, 12, 10), rule="quote")) is None
    )
    assert find_cycle(scoped, Delegation("b", "a", date(2026, 12, 1), date(2026, 12, 10))) is not None
    longer = [*existing, Delegation("b", "c", date(2026, 12, 1), date(2026, 12, 31), id=2)]
    three = find_cycle(longer, Delegation("c", "a", date(2026, 12, 9), date(2026, 12, 9)))
    assert three is not None and [d.user for d in three] == ["c", "a", "b"]
    own = find_cycle([], Delegation("a", "a", date(2026, 12, 1), date(2026, 12, 2)))
    assert own is not None and describe_cycle(own) == "a cannot be their own deputy"


# --- the manager chain and queues ---------------------------------------------------------------------


def test_manager_of_walks_up_the_chain_passing_over_inactive_managers() -> None:
    org = OrgChart(managers={"rep": "m1", "m1": "m2", "m2": "m3", "m3": "ceo"}, inactive={"m1"})
    assert managers_above(org, "rep", 1) == ("m2",)
    assert managers_above(org, "rep", 2) == ("m2", "m3")
    assert managers_above(org, "rep", 9) == ("m2", "m3", "ceo")
    loop = OrgChart(managers={"x": "y", "y": "x"})
    assert managers_above(loop, "x", 5) == ("y",)
    assert managers_of_approvers(org, ("rep", "m2"), 1) == ("m2", "m3")

    r = rule(StepSpec("managers", "all", (ManagerApprovers("owner", 2),)))
    out = open_request(r, routing(org=org), ctx(), record_ref="x", submitter="rep", now=T0)
    assert current_step_state(out.request).approvers == ("m2", "m3")  # type: ignore[union-attr]


def test_manager_of_needs_the_directory_and_someone_above() -> None:
    r = rule(StepSpec("managers", "all", (ManagerApprovers("owner", 1),)))
    with pytest.raises(ChainError, match="needs the user directory"):
        open_request(r, {"team": ("a",)}, ctx(), record_ref="x", submitter="rep", now=T0)
    with pytest.raises(ChainError, match="resolved to nobody"):
        open_request(r, routing(org=OrgChart()), ctx(), record_ref="x", submitter="rep", now=T0)


def test_queue_members_are_the_active_ones_and_an_unknown_queue_names_the_known() -> None:
    org = OrgChart(queues={"Finance": ("f1", "f2", "f3")}, inactive={"f2"})
    r = rule(StepSpec("finance", "any", (QueueApprovers("Finance"),)))
    out = open_request(r, routing(org=org), ctx(), record_ref="x", submitter="rep", now=T0)
    assert current_step_state(out.request).approvers == ("f1", "f3")  # type: ignore[union-attr]
    bad = rule(StepSpec("finance", "any", (QueueApprovers("Finanse"),)))
    with pytest.raises(ChainError, match=r"no such queue \(known: Finance\)"):
        open_request(bad, routing(org=org), ctx(), record_ref="x", submitter="rep", now=T0)


def test_a_queue_member_away_hands_their_place_to_a_deputy() -> None:
    org = OrgChart(queues={"Finance": ("f1", "f2")})
    r = rule(StepSpec("finance", "all", (QueueApprovers("Finance"),)))
    out = open_request(r, routing(away("f1", "d"), org=org), ctx(), record_ref="x", submitter="rep", now=T0)
    assert current_step_state(out.request).approvers == ("d", "f2")  # type: ignore[union-attr]


# --- the same approver on several steps ------------------------------------------------------------


def three_steps(same: SameApprover) -> RuleSpec:
    return rule(step("first", "a"), step("second", "a", "b"), step("third", "a"), same=same)


def test_ask_once_approves_later_steps_they_hold_and_waits_for_the_others() -> None:
    r = three_steps("ask_once")
    out = open_request(r, routing(), ctx(), record_ref="x", submitter="rep", now=T0)
    out = cast_vote(out.request, r, routing(), approver="a", decision="approve", step_index=0, now=T0)
    row = current_step_state(out.request)
    assert row is not None and row.index == 1 and row.status == "pending"  # b still has to approve
    (auto,) = step_votes(out.request, row)
    assert auto.approver == "a" and auto.auto_reason is not None and "'first'" in auto.auto_reason
    out = cast_vote(out.request, r, routing(), approver="b", decision="approve", step_index=1, now=T0)
    assert out.request.status == "approved"
    third = [v for v in out.request.votes if v.step_index == 2]
    assert len(third) == 1 and third[0].approver == "a" and third[0].auto_reason
    closed = [t for t in out.transitions if t.kind == "step_approved" and t.step_index == 2]
    assert closed and "same approver" in (closed[0].comment or "")


def test_ask_each_step_asks_again() -> None:
    r = three_steps("ask_each_step")
    out = open_request(r, routing(), ctx(), record_ref="x", submitter="rep", now=T0)
    out = cast_vote(out.request, r, routing(), approver="a", decision="approve", step_index=0, now=T0)
    row = current_step_state(out.request)
    assert row is not None and row.index == 1 and step_votes(out.request, row) == []


def test_ask_once_never_clears_a_step_held_by_someone_else() -> None:
    r = rule(step("first", "a"), step("second", "c"), step("third", "a"), same="ask_once")
    out = open_request(r, routing(), ctx(), record_ref="x", submitter="rep", now=T0)
    out = cast_vote(out.request, r, routing(), approver="a", decision="approve", step_index=0, now=T0)
    row = current_step_state(out.request)
    assert row is not None and row.index == 1 and step_votes(out.request, row) == []
    out = cast_vote(out.request, r, routing(), approver="c", decision="approve", step_index=1, now=T0)
    assert out.request.status == "approved"  # step three: a's automatic approval
    assert [v.auto_reason is not None for v in out.request.votes] == [False, False, True]


def test_ask_once_does_not_count_an_admin_override_or_a_step_sent_back() -> None:
    r = rule(step("first", "a"), step("second", "a"), same="ask_once")
    out = open_request(r, routing(), ctx(), record_ref="x", submitter="rep", now=T0)
    out = cast_vote(
        out.request, r, routing(), approver="root", decision="approve", step_index=0, now=T0, is_admin=True
    )
    row = current_step_state(out.request)
    assert row is not None and row.index == 1 and step_votes(out.request, row) == []
