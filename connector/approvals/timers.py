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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, NamedTuple

from connector.approvals.business_time import WorkingCalendar
from connector.approvals.lifecycle import (
    ACTIVE_STATUSES,
    ApprovalRequest,
    Outcome,
    Roles,
    StepState,
    _advance,
    _snapshot_ctx,
    _Txn,
    current_step_state,
    step_votes,
)
from connector.approvals.modes import policy_for
from connector.approvals.spec import RuleSpec, StepSpec
from connector.approvals.timing import Escalation, EscalationTarget, Reminders, StepTiming, describe_target

TimerKind = Literal["remind", "escalate", "timeout"]
_PRIORITY: dict[TimerKind, int] = {"timeout": 0, "escalate": 1, "remind": 2}


@dataclass(frozen=True)
class DueTimer:
    """The next thing a step's timing will do, and when."""

    kind: TimerKind
    at: datetime
    step_index: int
    round: int


class TimerState(NamedTuple):
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


class OpenStep(NamedTuple):
    """All a timer decision reads of a request: its open step (the latest round of the current
    step), who voted in that round, and the step's history rows of the kinds `timer_state`
    counts (every round, in `seq` order, as ``(seq, kind, at)``). `open_step` takes it from a
    whole request; the sweep reads it alone for each claimed request
    (connector/storage/timer_reads.py), so a reminder needs no whole request."""

    request_id: str
    request_status: str
    step_index: int
    round: int
    name: str
    status: str  # the step row's
    entered_at: datetime
    approvers: tuple[str, ...]
    voted: frozenset[str]
    history: Sequence[tuple[int, str, datetime | None]]  # `at` may be None but for reminded/escalated


HISTORY_KINDS = ("entered", "reminded", "escalated", "timed_out")  # the history an OpenStep keeps


class StepDecision(NamedTuple):
    """What `decide_step` found: the timer to act on now (None: nothing is due) and, when that
    is a reminder, the reminder; `next` is the step's next due moment once that is saved (a
    reminder's own included), or as it stands when nothing is due."""

    due: DueTimer | None
    next: DueTimer | None
    reminder: Reminder | None = None


class Reminder(NamedTuple):
    """A reminder decided on an `OpenStep`: its history row's comment and who it waits for."""

    number: int  # the step's reminders since it opened, this one included
    sent: int  # the step's reminders in every round, this one included (the notice says it)
    waiting: tuple[str, ...]
    note: str


def open_step(request: ApprovalRequest) -> OpenStep | None:
    """A whole request's `OpenStep` (None when it has no current step)."""
    row = current_step_state(request)
    if row is None:
        return None
    return OpenStep(
        request_id=request.id,
        request_status=request.status,
        step_index=row.index,
        round=row.round,
        name=row.name,
        status=row.status,
        entered_at=row.entered_at,
        approvers=row.approvers,
        voted=frozenset(v.approver for v in step_votes(request, row)),
        history=[
            (t.seq, t.kind, t.at)
            for t in request.transitions
            if t.step_index == row.index and t.kind in HISTORY_KINDS
        ],
    )


def open_spec(step: OpenStep | None, rule: RuleSpec) -> StepSpec | None:
    """The open step's spec, when the request is pending on a step the rule still has."""
    if (
        step is None
        or step.request_status not in ACTIVE_STATUSES
        or step.status != "pending"
        or step.step_index >= len(rule.steps)
    ):
        return None
    spec = rule.steps[step.step_index]
    return spec if spec.name == step.name else None


def history_state(history: Sequence[tuple[int, str, datetime | None]]) -> TimerState:
    """`timer_state` from one step's ``(seq, kind, at)`` history rows (every round, by seq)."""
    since = max((seq for seq, kind, _at in history if kind == "entered"), default=0)
    reminders = 0
    last_reminder_at = escalated_at = None
    escalated = timed_out = False
    for seq, kind, at in history:
        if seq <= since:
            continue
        if kind == "reminded":
            reminders += 1
            last_reminder_at = at
        elif kind == "escalated":
            escalated, escalated_at = True, at
        elif kind == "timed_out":
            timed_out = True
    return TimerState(reminders, last_reminder_at, escalated, timed_out, escalated_at)


def timer_state(request: ApprovalRequest, row: StepState) -> TimerState:
    """What the open step's timing has done so far, from the history since the step opened."""
    return history_state([(t.seq, t.kind, t.at) for t in request.transitions if t.step_index == row.index])


def next_timer(request: ApprovalRequest, rule: RuleSpec, calendar: WorkingCalendar) -> DueTimer | None:
    """The open step's next due moment (earliest first), or None when nothing more will happen."""
    return _earliest(_candidates(open_step(request), rule, calendar))


def due_timer(
    request: ApprovalRequest, rule: RuleSpec, calendar: WorkingCalendar, now: datetime
) -> DueTimer | None:
    """The timer to act on at ``now``: the most decisive of those due, or None."""
    return _most_decisive(_candidates(open_step(request), rule, calendar), now)


def decide_step(
    step: OpenStep | None, rule: RuleSpec, calendar: WorkingCalendar, now: datetime
) -> StepDecision:
    """`due_timer` on an `OpenStep`, and when it is a reminder what `fire_due` would remind
    (the same note, the same people) plus the step's next due moment after it; `next_timer`
    when nothing is due. Escalations and time-outs are only named (`due`): `fire_due` acts on
    them, on the whole request."""
    timed = _timed(step, rule)
    if step is None or timed is None:
        return StepDecision(None, None)
    timing, state = timed
    fixed = _fixed_candidates(step, timing, state, calendar)
    reminder = _reminder_candidate(step, timing, state, calendar)
    candidates = fixed if reminder is None else [*fixed, reminder]
    due = _most_decisive(candidates, now)
    if due is None:
        return StepDecision(None, _earliest(candidates))
    if due.kind != "remind":
        return StepDecision(due, None)
    assert timing.reminders is not None
    waiting = tuple(a for a in step.approvers if a not in step.voted)
    number = state.reminders + 1
    sent = sum(1 for _seq, kind, _at in step.history if kind == "reminded") + 1
    # after the reminder: the same time-out and escalation, the next reminder `every` after it
    after = TimerState(number, now, state.escalated, state.timed_out, state.escalated_at)
    then = _reminder_candidate(step, timing, after, calendar)
    following = _earliest(fixed if then is None else [*fixed, then])
    return StepDecision(
        due, following, Reminder(number, sent, waiting, reminder_note(timing.reminders, number, waiting))
    )


def step_next_timer(step: OpenStep | None, rule: RuleSpec, calendar: WorkingCalendar) -> DueTimer | None:
    """`next_timer` on an `OpenStep`."""
    return _earliest(_candidates(step, rule, calendar))


def reminder_note(reminders: Reminders, number: int, waiting: tuple[str, ...]) -> str:
    """The comment of a reminder's history row."""
    of = f" of {reminders.max}" if reminders.max is not None else ""
    return f"reminder {number}{of}: waiting for {', '.join(waiting)}"


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
    row = current_step_state(request)
    step = open_step(request)
    timed = _timed(step, rule)
    if row is None or step is None or timed is None:
        return None
    timing, state = timed
    if due is None:
        due = _most_decisive(_candidates_of(step, timing, state, calendar), now)
    if due is None:
        return None
    if due.kind == "remind":  # adds one history row and changes nothing else: no deep copy needed
        reminded = copy.copy(request)
        reminded.transitions = list(request.transitions)
        return _remind(_Txn(reminded, now), due, row, timing, state)
    txn = _Txn(copy.deepcopy(request), now)
    if due.kind == "escalate":
        assert timing.escalation is not None
        reason = f"no decision within {timing.escalation.after}"
        return _escalate(txn, due, rule, timing.escalation, resolve, reason)
    return _time_out(txn, due, rule, roles, timing, resolve)


# --- internals -------------------------------------------------------------------------


def _timed(step: OpenStep | None, rule: RuleSpec) -> tuple[StepTiming, TimerState] | None:
    """The open step's timing and what it has done so far, when the step has timing."""
    spec = open_spec(step, rule)
    if step is None or spec is None or spec.timing is None:
        return None
    return spec.timing, history_state(step.history)


def _candidates(step: OpenStep | None, rule: RuleSpec, calendar: WorkingCalendar) -> list[DueTimer]:
    timed = _timed(step, rule)
    if step is None or timed is None:
        return []
    return _candidates_of(step, *timed, calendar)


def _earliest(candidates: list[DueTimer]) -> DueTimer | None:
    if len(candidates) < 2:  # most steps have one kind of timing
        return candidates[0] if candidates else None
    return min(candidates, key=lambda d: (d.at, _PRIORITY[d.kind]))


def _most_decisive(candidates: list[DueTimer], now: datetime) -> DueTimer | None:
    due = [d for d in candidates if d.at <= now]
    if len(due) < 2:
        return due[0] if due else None
    return min(due, key=lambda d: _PRIORITY[d.kind])


def _candidates_of(
    step: OpenStep, timing: StepTiming, state: TimerState, calendar: WorkingCalendar
) -> list[DueTimer]:
    out = _fixed_candidates(step, timing, state, calendar)
    reminder = _reminder_candidate(step, timing, state, calendar)
    if reminder is not None:
        out.append(reminder)
    return out


def _fixed_candidates(
    step: OpenStep, timing: StepTiming, state: TimerState, calendar: WorkingCalendar
) -> list[DueTimer]:
    """The time-out and escalation, counted from when the step opened (a reminder leaves them)."""
    out = []
    if timing.timeout is not None and not state.timed_out:
        at = calendar.add(step.entered_at, timing.timeout.after.length(calendar))
        out.append(DueTimer("timeout", at, step.step_index, step.round))
    if timing.escalation is not None and not state.escalated:
        at = calendar.add(step.entered_at, timing.escalation.after.length(calendar))
        out.append(DueTimer("escalate", at, step.step_index, step.round))
    return out


def _reminder_candidate(
    step: OpenStep, timing: StepTiming, state: TimerState, calendar: WorkingCalendar
) -> DueTimer | None:
    reminders = timing.reminders
    if reminders is None or (reminders.max is not None and state.reminders >= reminders.max):
        return None
    # an escalation's notice counts as a reminder: the next one is `every` after it
    start = step.entered_at
    for moment in (state.last_reminder_at, state.escalated_at):
        if moment is not None and moment > start:
            start = moment
    at = calendar.add(start, reminders.every.length(calendar))
    return DueTimer("remind", at, step.step_index, step.round)


def _waiting(request: ApprovalRequest, row: StepState) -> tuple[str, ...]:
    voted = {v.approver for v in step_votes(request, row)}
    return tuple(a for a in row.approvers if a not in voted)


def _remind(txn: _Txn, due: DueTimer, row: StepState, timing: StepTiming, state: TimerState) -> TimerResult:
    assert timing.reminders is not None
    waiting = _waiting(txn.request, row)
    note = reminder_note(timing.reminders, state.reminders + 1, waiting)
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
