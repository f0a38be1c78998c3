"""Reminders, escalation and time-outs of an open step (connector.approvals.timers), with a fake clock."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import holidays
import pytest

from connector.approvals.actions import render_outcome_actions
from connector.approvals.business_time import BusinessTime, CalendarTime, WorkingCalendar
from connector.approvals.lifecycle import ApprovalRequest, cast_vote, current_step_state, open_request
from connector.approvals.spec import ActionSpec, EvalContext, RuleSpec, StepSpec, UserApprovers
from connector.approvals.timers import (
    Resolved,
    TimerResult,
    decide_step,
    due_timer,
    fire_due,
    next_timer,
    open_step,
)
from connector.approvals.timing import (
    Escalation,
    EscalationTarget,
    ManagerTarget,
    Reminders,
    RoleTarget,
    StepTiming,
    Timeout,
    TimerDuration,
)

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)  # a Monday
CALENDAR = CalendarTime()
ROLES: dict[str, tuple[str, ...]] = {"directors": ("dir1", "dir2")}
MANAGERS = {"a": "boss-a", "b": "boss-b", "owner1": "boss-owner"}
ALWAYS: Any = type("Always", (), {"__call__": lambda self, ctx: True, "explain": lambda self, ctx: []})()


def hours(n: int) -> TimerDuration:
    return TimerDuration(n, "h")


def rule(timing: StepTiming, *, approvers: tuple[str, ...] = ("a",), mode: Any = "one") -> RuleSpec:
    return RuleSpec(
        "r",
        ALWAYS,
        (
            StepSpec("first", mode, (UserApprovers(approvers),), timing=timing),
            StepSpec("second", "one", (UserApprovers(("z",)),)),
        ),
        actions={
            "approve": ActionSpec({"status": lambda v: "Approved"}),
            "reject": ActionSpec({"status": lambda v: "Rejected"}),
            "step": ActionSpec({"progress": lambda v: "moved"}),
        },  # fmt: skip
    )


def opened(spec: RuleSpec) -> ApprovalRequest:
    ctx = EvalContext(
        values={"owner": "owner1"}, previous=None, changed_fields=frozenset(), today=T0.date(), now=T0
    )
    return open_request(spec, ROLES, ctx, record_ref="sandbox:deal:1", submitter="owner1", now=T0).request


def resolve(target: EscalationTarget, request: ApprovalRequest, row: Any) -> Resolved:
    """The directory's manager data, as a fake: a plain table."""
    if isinstance(target, RoleTarget):
        return Resolved(ROLES.get(target.role, ()))
    if target.of == "owner":
        boss = MANAGERS.get(str(request.record.get("owner")))
        return Resolved((boss,) if boss else (), None if boss else "no manager")
    voted = {v.approver for v in request.votes if (v.step_index, v.round) == (row.index, row.round)}
    bosses = tuple(MANAGERS[a] for a in row.approvers if a in MANAGERS and a not in voted)
    return Resolved(bosses, None if bosses else "no manager")


class Clock:
    """Runs the sweep at `step` intervals and records what fired when."""

    def __init__(self, spec: RuleSpec, request: ApprovalRequest, calendar: WorkingCalendar = CALENDAR):
        self.spec, self.request, self.calendar = spec, request, calendar
        self.fired: list[tuple[datetime, TimerResult]] = []

    def sweep(self, now: datetime) -> TimerResult | None:
        result = fire_due(self.request, self.spec, ROLES, self.calendar, now, resolve)
        if result is not None:
            self.request = result.outcome.request
            self.fired.append((now, result))
        return result

    def run(self, until: datetime, step: timedelta = timedelta(minutes=15)) -> None:
        now = T0
        while now <= until:
            while self.sweep(now) is not None:  # several may be due at one sweep after downtime
                pass
            now += step


def kinds(clock: Clock) -> list[tuple[datetime, str]]:
    return [(at, r.due.kind) for at, r in clock.fired]


def test_reminders_at_the_right_moments_and_no_more() -> None:
    spec = rule(StepTiming(reminders=Reminders(hours(24), max=2)))
    clock = Clock(spec, opened(spec))
    clock.run(T0 + timedelta(days=6))
    assert kinds(clock) == [(T0 + timedelta(hours=24), "remind"), (T0 + timedelta(hours=48), "remind")]
    comments = [t.comment for t in clock.request.transitions if t.kind == "reminded"]
    assert comments == ["reminder 1 of 2: waiting for a", "reminder 2 of 2: waiting for a"]
    assert clock.fired[0][1].waiting == ("a",)
    assert next_timer(clock.request, spec, CalendarTime()) is None  # nothing more will happen


def test_firing_twice_on_the_same_version_decides_the_same_and_a_saved_reminder_is_not_due_again() -> None:
    spec = rule(StepTiming(reminders=Reminders(hours(1))))
    request = opened(spec)
    now = T0 + timedelta(hours=1)
    first = fire_due(request, spec, ROLES, CalendarTime(), now, resolve)
    second = fire_due(request, spec, ROLES, CalendarTime(), now, resolve)
    assert first is not None and second is not None
    assert first.outcome.transitions == second.outcome.transitions  # same input, same decision
    assert fire_due(first.outcome.request, spec, ROLES, CalendarTime(), now, resolve) is None


def test_a_sweep_that_was_down_sends_one_reminder_not_a_burst() -> None:
    spec = rule(StepTiming(reminders=Reminders(hours(1), max=5)))
    clock = Clock(spec, opened(spec))
    assert clock.sweep(T0 + timedelta(hours=10)) is not None
    assert clock.sweep(T0 + timedelta(hours=10)) is None
    due = next_timer(clock.request, spec, CalendarTime())
    assert due is not None and due.at == T0 + timedelta(hours=11)


def test_reminders_stop_when_the_step_is_decided() -> None:
    spec = rule(StepTiming(reminders=Reminders(hours(1))))
    clock = Clock(spec, opened(spec))
    clock.sweep(T0 + timedelta(hours=1))
    voted = cast_vote(clock.request, spec, ROLES, approver="a", decision="approve", step_index=0, now=T0)
    # the second step has no timing: nothing is due for the request any more
    assert next_timer(voted.request, spec, CalendarTime()) is None
    assert fire_due(voted.request, spec, ROLES, CalendarTime(), T0 + timedelta(days=9), resolve) is None


def test_escalation_adds_the_approvers_manager_and_reminders_restart_after_it() -> None:
    timing = StepTiming(
        reminders=Reminders(hours(24)),
        escalation=Escalation(hours(48), ManagerTarget("approver")),
    )
    spec = rule(timing)
    clock = Clock(spec, opened(spec))
    clock.run(T0 + timedelta(hours=72))
    assert kinds(clock) == [
        (T0 + timedelta(hours=24), "remind"),
        (T0 + timedelta(hours=48), "escalate"),  # due with the 2nd reminder: the escalation acts alone
        (T0 + timedelta(hours=72), "remind"),
    ]
    escalation = clock.fired[1][1]
    assert (escalation.added, escalation.removed, escalation.previous) == (("boss-a",), (), ("a",))
    row = current_step_state(clock.request)
    assert row is not None and row.approvers == ("a", "boss-a") and row.required == 1
    [note] = [t.comment for t in clock.request.transitions if t.kind == "escalated"]
    assert note == "no decision within 48h; escalated to the approver's manager: added boss-a"
    # the manager may now decide the step
    voted = cast_vote(clock.request, spec, ROLES, approver="boss-a", decision="approve", step_index=0, now=T0)
    assert current_step_state(voted.request).name == "second"  # type: ignore[union-attr]


def test_escalation_replace_takes_off_only_those_who_have_not_voted() -> None:
    timing = StepTiming(escalation=Escalation(hours(8), ManagerTarget("approver"), mode="replace"))
    spec = rule(timing, approvers=("a", "b"), mode="all")
    request = opened(spec)
    request = cast_vote(request, spec, ROLES, approver="a", decision="approve", step_index=0, now=T0).request
    result = fire_due(request, spec, ROLES, CalendarTime(), T0 + timedelta(hours=8), resolve)
    assert result is not None
    row = current_step_state(result.outcome.request)
    assert row is not None
    # a already approved and stays; b is replaced by b's manager; an `all` step needs both
    assert (row.approvers, row.required) == (("a", "boss-b"), 2)
    assert (result.added, result.removed) == (("boss-b",), ("b",))


def test_escalation_to_the_owners_manager_and_to_a_role() -> None:
    spec = rule(StepTiming(escalation=Escalation(hours(1), ManagerTarget("owner"))))
    result = fire_due(opened(spec), spec, ROLES, CalendarTime(), T0 + timedelta(hours=1), resolve)
    assert result is not None and result.added == ("boss-owner",)
    spec = rule(StepTiming(escalation=Escalation(hours(1), RoleTarget("directors"))))
    result = fire_due(opened(spec), spec, ROLES, CalendarTime(), T0 + timedelta(hours=1), resolve)
    assert result is not None and result.added == ("dir1", "dir2")


def test_escalation_that_finds_nobody_says_so_and_changes_no_approver() -> None:
    spec = rule(
        StepTiming(escalation=Escalation(hours(1), ManagerTarget("approver"))), approvers=("nomanager",)
    )
    result = fire_due(opened(spec), spec, ROLES, CalendarTime(), T0 + timedelta(hours=1), resolve)
    assert result is not None and result.added == ()
    row = current_step_state(result.outcome.request)
    assert row is not None and row.approvers == ("nomanager",)
    [note] = [t.comment for t in result.outcome.request.transitions if t.kind == "escalated"]
    assert "found nobody new (no manager)" in (note or "")
    assert (
        fire_due(result.outcome.request, spec, ROLES, CalendarTime(), T0 + timedelta(days=3), resolve) is None
    )


@pytest.mark.parametrize(
    ("action", "status", "step_status", "events"),
    [
        ("approve", "pending", "approved", ("step",)),
        ("skip", "pending", "skipped", ("step",)),
        ("reject", "rejected", "rejected", ("reject", "step")),
    ],
)
def test_each_timeout_action_closes_the_step_with_its_reason_in_the_history(
    action: Any, status: str, step_status: str, events: tuple[str, ...]
) -> None:
    timing = StepTiming(timeout=Timeout(hours(72), action, reason="nobody answered for three days"))
    spec = rule(timing)
    clock = Clock(spec, opened(spec))
    clock.run(T0 + timedelta(days=5))
    [(at, result)] = clock.fired
    assert at == T0 + timedelta(hours=72) and result.action == action
    request = clock.request
    assert request.status == status
    first = [s for s in request.steps if s.index == 0][-1]
    assert first.status == step_status and first.left_at == at
    timed_out = [t for t in request.transitions if t.kind == "timed_out"]
    assert [t.comment for t in timed_out] == [f"timed out ({action}): nobody answered for three days"]
    assert all(t.actor is None for t in request.transitions if t.at == at)
    if action != "reject":  # the chain moved on to the second step
        assert current_step_state(request).name == "second"  # type: ignore[union-attr]
    else:
        assert request.transitions[-1].comment == "nobody answered for three days"
    rendered = render_outcome_actions(result.outcome, spec, at.date(), at)
    assert set(events) <= {a.event for a in rendered}


def test_timeout_approve_on_the_last_step_approves_the_request_and_fires_the_write_back() -> None:
    spec = RuleSpec(
        "r",
        ALWAYS,
        (
            StepSpec(
                "only",
                "one",
                (UserApprovers(("a",)),),
                timing=StepTiming(timeout=Timeout(hours(1), "approve")),
            ),
        ),
        actions={"approve": ActionSpec({"status": lambda v: "Approved"})},
    )
    result = fire_due(opened(spec), spec, ROLES, CalendarTime(), T0 + timedelta(hours=1), resolve)
    assert result is not None and result.outcome.request.status == "approved"
    [approved] = [t for t in result.outcome.transitions if t.kind == "approved"]
    assert approved.actor is None
    rendered = render_outcome_actions(result.outcome, spec, T0.date(), T0)
    assert [a.values for a in rendered if a.event == "approve"] == [{"status": "Approved"}]
    assert [t.comment for t in result.outcome.transitions if t.kind == "step_approved"] == [
        "no decision within 1h"
    ]


def test_timeout_escalate_uses_the_steps_target_once() -> None:
    timing = StepTiming(
        escalation=Escalation(hours(48), ManagerTarget("owner")),
        timeout=Timeout(hours(24), "escalate"),
    )
    spec = rule(timing)
    clock = Clock(spec, opened(spec))
    clock.run(T0 + timedelta(days=5))
    assert kinds(clock) == [(T0 + timedelta(hours=24), "timeout")]  # escalated once, not again at 48h
    assert current_step_state(clock.request).approvers == ("a", "boss-owner")  # type: ignore[union-attr]
    assert [t.kind for t in clock.request.transitions][-2:] == ["timed_out", "escalated"]


def test_business_hours_across_a_weekend_and_a_holiday() -> None:
    office = BusinessTime(
        zone=ZoneInfo("Europe/Warsaw"),
        opens=time(9),
        closes=time(17),
        holidays=holidays.country_holidays("PL"),
    )
    timing = StepTiming(reminders=Reminders(TimerDuration(1, "d"), max=3))
    spec = rule(timing)
    # opened Friday 6 Nov 2026 at 14:00 Warsaw time (13:00 UTC)
    start = datetime(2026, 11, 6, 13, tzinfo=UTC)
    ctx = EvalContext(values={}, previous=None, changed_fields=frozenset(), today=start.date(), now=start)
    request = open_request(spec, ROLES, ctx, record_ref="x", submitter="owner1", now=start).request
    clock = Clock(spec, request, office)
    now = start
    while now < start + timedelta(days=10):
        clock.sweep(now)
        now += timedelta(minutes=30)
    warsaw = [at.astimezone(ZoneInfo("Europe/Warsaw")).strftime("%a %d %H:%M") for at, _ in clock.fired]
    # 8 working hours each: Fri 14-17 + Mon 9-14; Mon 14-17 + Tue 9-14; Tue 14-17, Wed 11 Nov is
    # Independence Day, Thu 9-14
    assert warsaw == ["Mon 09 14:00", "Tue 10 14:00", "Thu 12 14:00"]


def test_due_timer_picks_the_most_decisive_of_those_due() -> None:
    timing = StepTiming(
        reminders=Reminders(hours(1)),
        escalation=Escalation(hours(2), ManagerTarget("approver")),
        timeout=Timeout(hours(3), "reject"),
    )
    spec = rule(timing)
    request = opened(spec)
    assert due_timer(request, spec, CalendarTime(), T0) is None
    assert due_timer(request, spec, CalendarTime(), T0 + timedelta(hours=1)).kind == "remind"  # type: ignore[union-attr]
    assert due_timer(request, spec, CalendarTime(), T0 + timedelta(hours=2)).kind == "escalate"  # type: ignore[union-attr]
    assert due_timer(request, spec, CalendarTime(), T0 + timedelta(days=1)).kind == "timeout"  # type: ignore[union-attr]
    first = next_timer(request, spec, CalendarTime())
    assert first is not None and (first.kind, first.at, first.step_index, first.round) == (
        "remind",
        T0 + timedelta(hours=1),
        0,
        1,
    )


def test_the_sweeps_decision_on_the_open_step_alone_is_fire_dues() -> None:
    """decide_step (what the sweep decides reminders on, from the open step's rows alone) says
    what fire_due does on the whole request at every moment: the same due timer, the same
    reminder note and people, and the next due moment after it (remind_max, escalation)."""
    timing = StepTiming(
        reminders=Reminders(hours(10), max=3),
        escalation=Escalation(hours(25), ManagerTarget("approver")),
    )
    spec = rule(timing, approvers=("a", "b"), mode="all")
    request = opened(spec)
    request = cast_vote(request, spec, ROLES, approver="a", decision="approve", step_index=0, now=T0).request
    seen: set[str] = set()
    now = T0
    while now <= T0 + timedelta(days=4):
        decision = decide_step(open_step(request), spec, CALENDAR, now)
        result = fire_due(request, spec, ROLES, CALENDAR, now, resolve)
        assert decision.due == (result.due if result is not None else None)
        if result is None:
            assert decision.next == next_timer(request, spec, CALENDAR)
            now += timedelta(minutes=30)
            continue
        seen.add(result.due.kind)
        if result.due.kind == "remind":
            [reminded] = result.outcome.transitions
            assert decision.reminder is not None
            assert (decision.reminder.note, decision.reminder.waiting) == (reminded.comment, result.waiting)
            assert "a" not in decision.reminder.waiting and "b" in decision.reminder.waiting  # "a" voted
            assert decision.next == next_timer(result.outcome.request, spec, CALENDAR)
        else:
            assert decision.reminder is None  # escalations are fire_due's, on the whole request
        request = result.outcome.request
    assert seen == {"remind", "escalate"}
    notes = [t.comment for t in request.transitions if t.kind == "reminded"]
    assert notes == [
        "reminder 1 of 3: waiting for b",
        "reminder 2 of 3: waiting for b",
        "reminder 3 of 3: waiting for b, boss-b",  # after the escalation at 25h; then no more
    ]
