"""Reminders, escalation and time-outs of an open step. Pure: ``now`` and the calendar are passed in.

A step's timer state is read from the request's own history, never kept beside it: the
``reminded``, ``escalated`` and ``timed_out`` transitions recorded since the step's latest
``entered`` transition say what has happened. So deciding twice on the same request version
decides the same thing, and once an outcome is saved (with the request's optimistic version
check) a second worker deciding on the old version fails to save and, reading again, finds
nothing due: each due moment acts exactly once.

Due moments, counted on the connection's calendar (``business_time``) from when the step opened:

* reminder k: ``remind_every`` after the previous reminder or escalation (the first: after the
  step opened), at most ``remind_max`` of them; a sweep that was down sends one reminder, not a
  burst;
* escalation: ``escalate_after`` after the step opened, once;
* time-out: ``timeout.after`` after the step opened, once.

When several are due at once the most decisive one acts alone: a time-out, else the
escalation, else a reminder (the escalation's notice is the reminder).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from connector.approvals.business_time import WorkingCalendar
from connector.approvals.lifecycle import (
    ApprovalRequest,
    Outcome,
    Roles,
    StepState,
    _advance,
    _snapshot_ctx,
    _Txn,
    current_step_state,
    is_active,
    step_votes,
)
from connector.approvals.modes import policy_for
from connector.approvals.spec import RuleSpec, StepSpec
from connector.approvals.timing import Escalation, EscalationTarget, StepTiming, describe_target

TimerKind = Literal["remind", "escalate", "timeout"]
_PRIORITY: dict[TimerKind, int] = {"timeout": 0, "escalate": 1, "remind": 2}


@dataclass(frozen=True)
class DueTimer:
    """The next thing a step's timing will do, and when."""

    kind: TimerKind
    at: datetime
    step_index: int
    round: int


@dataclass(frozen=True)
class TimerState:
    reminders: int
    last_reminder_at: datetime | None
    escalated: bool
    timed_out: bool
    escalated_at: datetime | None = None


@dataclass(frozen=True)
class Resolved:
    """Who an escalation target names; ``note`` says why nobody, when nobody."""

    users: tuple[str, ...]
    note: str | None = None


# (target, request, open step) -> the users it names; the service reads the user directory.
TargetResolver = Callable[[EscalationTarget, ApprovalRequest, StepState], Resolved]


@dataclass(frozen=True)
class TimerResult:
    """What a due timer did: the outcome to save plus who to tell."""

    outcome: Outcome
    due: DueTimer
    waiting: tuple[str, ...] = ()  # reminder: approvers of the step who have not voted
    added: tuple[str, ...] = ()  # escalation: new approvers
    removed: tuple[str, ...] = ()  # escalation (replace): approvers taken off the step
    previous: tuple[str, ...] = ()  # escalation: the step's approvers before it
    action: str | None = None  # time-out: its action
    reason: str | None = None


def step_spec(request: ApprovalRequest, rule: RuleSpec) -> tuple[StepState, StepSpec] | None:
    """The open step and its spec, when the request is pending on a step the rule still has."""
    row = current_step_state(request)
    if not is_active(request) or row is None or row.status != "pending" or row.index >= len(rule.steps):
        return None
    spec = rule.steps[row.index]
    return (row, spec) if spec.name == row.name else None


def timer_state(request: ApprovalRequest, row: StepState) -> TimerState:
    """What the open step's timing has done so far, from the history since the step opened."""
    entered = [t.seq for t in request.transitions if t.kind == "entered" and t.step_index == row.index]
    since = max(entered, default=0)
    mine = [t for t in request.transitions if t.seq > since and t.step_index == row.index]
    reminders = [t for t in mine if t.kind == "reminded"]
    escalations = [t for t in mine if t.kind == "escalated"]
    return TimerState(
        reminders=len(reminders),
        last_reminder_at=reminders[-1].at if reminders else None,
        escalated=bool(escalations),
        timed_out=any(t.kind == "timed_out" for t in mine),
        escalated_at=escalations[-1].at if escalations else None,
    )


def next_timer(request: ApprovalRequest, rule: RuleSpec, calendar: WorkingCalendar) -> DueTimer | None:
    """The open step's next due moment (earliest first), or None when nothing more will happen."""
    candidates = _candidates(request, rule, calendar)
    return min(candidates, key=lambda d: (d.at, _PRIORITY[d.kind])) if candidates else None


def due_timer(
    request: ApprovalRequest, rule: RuleSpec, calendar: WorkingCalendar, now: datetime
) -> DueTimer | None:
    """The timer to act on at ``now``: the most decisive of those due, or None."""
    due = [d for d in _candidates(request, rule, calendar) if d.at <= now]
    return min(due, key=lambda d: _PRIORITY[d.kind]) if due else None


def fire_due(
    request: ApprovalRequest,
    rule: RuleSpec,
    roles: Roles,
    calendar: WorkingCalendar,
    now: datetime,
    resolve: TargetResolver,
    due: DueTimer | None = None,
) -> TimerResult | None:
    """Act on the timer due at ``now`` (None when nothing is due). Raises ``ChainError`` (changing
    nothing) when a time-out moves the chain to a step nobody can approve. ``due``: what
    ``due_timer`` returned for the same request, calendar and ``now``, when the caller has it."""
    if due is None:
        due = due_timer(request, rule, calendar, now)
    found = step_spec(request, rule)
    if due is None or found is None:
        return None
    row, spec = found
    timing = spec.timing
    assert timing is not None  # a due timer needs timing
    if due.kind == "remind":  # adds one history row and changes nothing else: no deep copy needed
        reminded = copy.copy(request)
        reminded.transitions = list(request.transitions)
        return _remind(_Txn(reminded, now), due, row, timing)
    txn = _Txn(copy.deepcopy(request), now)
    if due.kind == "escalate":
        assert timing.escalation is not None
        reason = f"no decision within {timing.escalation.after}"
        return _escalate(txn, due, rule, timing.escalation, resolve, reason)
    return _time_out(txn, due, rule, roles, timing, resolve)


# --- internals -------------------------------------------------------------------------


def _candidates(request: ApprovalRequest, rule: RuleSpec, calendar: WorkingCalendar) -> list[DueTimer]:
    found = step_spec(request, rule)
    if found is None or found[1].timing is None:
        return []
    row, spec = found
    timing = spec.timing
    assert timing is not None
    state = timer_state(request, row)

    def due(kind: TimerKind, start: datetime, length: object) -> DueTimer:
        return DueTimer(kind, calendar.add(start, length), row.index, row.round)  # type: ignore[arg-type]

    out = []
    if timing.timeout is not None and not state.timed_out:
        out.append(due("timeout", row.entered_at, timing.timeout.after.length(calendar)))
    if timing.escalation is not None and not state.escalated:
        out.append(due("escalate", row.entered_at, timing.escalation.after.length(calendar)))
    reminders = timing.reminders
    if reminders is not None and (reminders.max is None or state.reminders < reminders.max):
        # an escalation's notice counts as a reminder: the next one is `every` after it
        start = max(t for t in (row.entered_at, state.last_reminder_at, state.escalated_at) if t is not None)
        out.append(due("remind", start, reminders.every.length(calendar)))
    return out


def _waiting(request: ApprovalRequest, row: StepState) -> tuple[str, ...]:
    voted = {v.approver for v in step_votes(request, row)}
    return tuple(a for a in row.approvers if a not in voted)


def _remind(txn: _Txn, due: DueTimer, row: StepState, timing: StepTiming) -> TimerResult:
    assert timing.reminders is not None
    number = timer_state(txn.request, row).reminders + 1
    waiting = _waiting(txn.request, row)
    of = f" of {timing.reminders.max}" if timing.reminders.max is not None else ""
    note = f"reminder {number}{of}: waiting for {', '.join(waiting)}"
    txn.transition("reminded", "pending", step_index=row.index, actor=None, comment=note)
    return TimerResult(txn.outcome(), due, waiting=waiting)


def _escalate(
    txn: _Txn,
    due: DueTimer,
    rule: RuleSpec,
    escalation: Escalation,
    resolve: TargetResolver,
    reason: str,
    *,
    action: str | None = None,
) -> TimerResult:
    row = txn.current_row()
    previous = row.approvers
    resolved = resolve(escalation.to, txn.request, row)
    voted = {v.approver for v in step_votes(txn.request, row)}
    if escalation.mode == "replace" and resolved.users:
        kept = tuple(a for a in previous if a in voted)
    else:
        kept = previous
    approvers = tuple(dict.fromkeys(kept + resolved.users))
    added = tuple(a for a in approvers if a not in previous)
    removed = tuple(a for a in previous if a not in approvers)
    target = describe_target(escalation.to)
    if added or removed:
        row.approvers = approvers
        row.required = policy_for(row.mode).required_approvals(rule.steps[row.index], len(approvers))
        txn.touch(row)
        note = f"{reason}; escalated to {target}: added {', '.join(added)}"
        if removed:
            note = f"{reason}; escalated to {target}: {', '.join(removed)} replaced by {', '.join(added)}"
    else:
        why = resolved.note or "they already approve this step"
        note = f"{reason}; escalation to {target} found nobody new ({why})"
    txn.transition("escalated", "pending", step_index=row.index, actor=None, comment=note)
    return TimerResult(
        txn.outcome(),
        due,
        added=added,
        removed=removed,
        previous=previous,
        waiting=_waiting(txn.request, row),
        action=action,
        reason=reason,
    )


def _time_out(
    txn: _Txn, due: DueTimer, rule: RuleSpec, roles: Roles, timing: StepTiming, resolve: TargetResolver
) -> TimerResult:
    timeout = timing.timeout
    assert timeout is not None
    row = txn.current_row()
    reason = timeout.reason or f"no decision within {timeout.after}"
    note = f"timed out ({timeout.action}): {reason}"
    txn.transition("timed_out", "pending", step_index=row.index, actor=None, comment=note)
    if timeout.action == "escalate":
        escalation = timing.timeout_escalation()
        assert escalation is not None  # the loader requires a target
        return _escalate(txn, due, rule, escalation, resolve, reason, action="escalate")
    row.left_at = txn.now
    txn.touch(row)
    if timeout.action == "reject":
        row.status = "rejected"
        txn.transition("step_rejected", "pending", step_index=row.index, actor=None, comment=reason)
        txn.close("rejected", "rejected", actor=None, comment=reason)
        txn.fire("reject", None, reason)
    else:
        ctx = _snapshot_ctx(txn.request, txn.now, None)
        if timeout.action == "approve":
            row.status = "approved"
            txn.transition("step_approved", "pending", step_index=row.index, actor=None, comment=reason)
        else:
            row.status = "skipped"
            txn.transition("skipped", "pending", step_index=row.index, actor=None, comment=reason)
        _advance(txn, rule, roles, ctx, start=row.index + 1, actor=None)
    return TimerResult(txn.outcome(), due, action=timeout.action, reason=reason)
