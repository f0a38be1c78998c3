"""Who is told what when a step's timer acts (connector.approvals.timers), queued in the
transaction that saves it:

* reminder: each approver of the open step who has not voted (`reminder`, with one-click links);
* escalation: each new approver (`escalated_to_you`, with links); the step's earlier approvers and
  the submitter (`escalated`: who it waits for now, and why);
* time-out that approves, rejects or skips: the step's approvers who had not voted (`timed_out`);
  the submitter hears of the approval or rejection as for any decision.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy.orm import Session

from connector.approvals.timers import DueTimer, TimerResult
from connector.notify.queue import NotificationQueue

TIMER_EVENTS = ("reminder", "escalated_to_you", "escalated", "timed_out")
TIMER_TRANSITIONS = ("reminded", "escalated", "timed_out")


def queue_timer_notices(
    queue: NotificationQueue,
    session: Session,
    *,
    connection: str,
    result: TimerResult,
    roles: Mapping[str, tuple[str, ...]],
    step_labels: Mapping[int, str],
    step_count: int,
) -> int:
    """Queue the notices of one timer result in the caller's transaction; returns rows added."""
    request_id = result.outcome.request.id
    added = 0
    for user, event, key, facts in timer_notices(result, step_labels, step_count):
        added += queue.queue_event(session, connection, user, event, key, facts, roles, request_id)
    return added


def timer_notices(
    result: TimerResult, step_labels: Mapping[int, str], step_count: int
) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(recipient, event, event key, facts) for each notice a timer result sends."""
    request, due = result.outcome.request, result.due
    seq = next(t.seq for t in result.outcome.transitions if t.kind in TIMER_TRANSITIONS)
    sent = sum(1 for t in request.transitions if t.kind == "reminded" and t.step_index == due.step_index)
    facts = notice_facts(due, step_labels, step_count, sent, reason=result.reason, action=result.action)

    def tell(users: tuple[str, ...] | list[str], event: str) -> list[tuple[str, str, str, dict[str, Any]]]:
        return [(user, event, f"{request.id}:{event}:{seq}", facts) for user in users]

    if due.kind == "remind":
        return reminder_notices(request.id, seq, result.waiting, facts)
    if result.added or result.removed or due.kind == "escalate" or result.action == "escalate":
        others = [u for u in (*result.previous, request.submitter) if u not in result.added]
        return tell(result.added, "escalated_to_you") + tell(list(dict.fromkeys(others)), "escalated")
    voted = {v.approver for v in request.votes if v.step_index == due.step_index and v.round == due.round}
    row = next(s for s in request.steps if s.index == due.step_index and s.round == due.round)
    return tell([a for a in row.approvers if a not in voted], "timed_out")


def notice_facts(
    due: DueTimer,
    step_labels: Mapping[int, str],
    step_count: int,
    reminders_sent: int,
    *,
    reason: str | None = None,
    action: str | None = None,
) -> dict[str, Any]:
    """What a timer's notices say (`reminders_sent`: the step's reminded rows, every round)."""
    return {
        "step_index": due.step_index,
        "round": due.round,
        "step_label": step_labels.get(due.step_index),
        "step_count": step_count,
        "reason": reason,
        "action": action,
        "reminder": reminders_sent,
    }


def reminder_notices(
    request_id: str, seq: int, waiting: tuple[str, ...], facts: dict[str, Any]
) -> list[tuple[str, str, str, dict[str, Any]]]:
    """A reminder's notices: one `reminder` to each approver it waits for, keyed by its
    history row (`seq`); the sweep's reminders come here without a TimerResult."""
    return [(user, "reminder", f"{request_id}:reminder:{seq}", facts) for user in waiting]
