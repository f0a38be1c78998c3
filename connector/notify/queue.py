"""Queueing notifications: rows written in the caller's transaction, sent later by the worker.

Who is told what:

* `step_opened`: every approver assigned to a step that opens (also after a restart or a
  send-back, as a new round);
* `approved`, `rejected`, `sent_back`, `recalled`, `expired`: the submitter (not when they
  did it themselves);
* `expiring`: the submitter, NOTIFY_EXPIRY_WARNING_DAYS before an approval runs out (sweep).

Each recipient gets an e-mail (when NOTIFY_EMAIL is on) and a chat message when chat URLs are
configured for them: their own (NOTIFY_USER_<ID>_URLS), else those of each role or group they
belong to in the mapping file (NOTIFY_ROLE_<NAME>_URLS, one message per event to that shared
channel), else the connection's (<CONNECTION>_NOTIFY_URLS, one message per event).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from connector.approvals.lifecycle import ApprovalRequest, Outcome, Transition
from connector.clock import utcnow
from connector.config import Settings, env_name
from connector.notify.models import PENDING, Notification
from connector.storage import batch_writes
from connector.storage.db import transaction
from connector.storage.models import ApprovalRequestRow

SUBMITTER_EVENTS = {  # transition kind -> event told to the submitter
    "approved": "approved",
    "rejected": "rejected",
    "sent_back": "sent_back",
    "recalled": "recalled",
    "expired": "expired",
}
EVENTS = ("step_opened", *SUBMITTER_EVENTS.values(), "expiring")
# events about an open step still waiting for the recipient: sent only while it waits for them,
# with one-click Approve / Reject links (connector/notify/timer_notices.py queues the last two)
WAITING_EVENTS = frozenset({"step_opened", "reminder", "escalated_to_you"})
CHANNELS = ("email", "chat")


def queue_message(
    session: Session,
    *,
    connection: str | None,
    user_id: str | None = None,
    email: str | None = None,
    template: str,
    context: Mapping[str, Any],
    dedupe_key: str,
    channel: str = "email",
    event: str | None = None,
    request_id: str | None = None,
) -> int | None:
    """Queue one message in the caller's transaction; the worker renders and sends it.

    `user_id` (with `connection`) addresses a person of the directory, who gets it in their
    language at their e-mail address; `email` addresses a mailbox directly (used when both
    are given). `context` must be JSON: it is stored and becomes the template's variables,
    with `recipient`, `links` (from context["links"]) and `base_url` added. A `dedupe_key`
    already queued adds nothing and returns None; otherwise the new row's id.
    """
    if channel not in CHANNELS:
        raise ValueError(f"channel must be one of {', '.join(CHANNELS)}, got {channel!r}")
    if user_id is None and email is None:
        raise ValueError("queue_message needs a user_id (with connection) or an email address")
    if user_id is not None and connection is None:
        raise ValueError("a user_id needs its connection")
    if channel == "chat" and user_id is None:
        raise ValueError("chat messages go to a user (NOTIFY_USER_<ID>_URLS); give user_id")
    existing = session.scalar(select(Notification.id).where(Notification.dedupe_key == dedupe_key))
    if existing is not None:
        return None
    row = Notification(
        dedupe_key=dedupe_key[:400],
        event=event or template,
        template=template,
        channel=channel,
        connection=connection,
        user_id=user_id,
        email=email,
        target=f"user:{env_name(user_id)}" if channel == "chat" and user_id else None,
        request_id=request_id,
        context=dict(context),
        status=PENDING,
        attempts=0,
        created_at=utcnow(),
    )
    session.add(row)
    session.flush()
    return row.id


STEP_HOLDER_EVENTS = ("entered", "delegated", "reassigned")


class NotificationQueue:
    """Turns approval outcomes into queued notifications (called by the ApprovalService)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def on_outcome(
        self,
        session: Session,
        *,
        connection: str,
        outcome: Outcome,
        roles: Mapping[str, tuple[str, ...]],
        step_labels: Mapping[int, str],
        step_count: int,
    ) -> int:
        """Queue what the outcome's transitions tell people; returns how many rows were added."""
        request = outcome.request
        # a request just opened has a fresh id, which every dedupe key starts with: while a
        # batch buffers its new requests' rows (connector/storage/batch_writes.py), these join them
        later = any(t.kind == "submitted" for t in outcome.transitions)
        added = 0
        for transition in outcome.transitions:
            # a step opened, or someone new holds a place on it (a deputy, an admin's reassignment):
            # everyone on it now is told once (the dedupe key is per step round and person)
            if transition.kind in STEP_HOLDER_EVENTS and transition.step_index is not None:
                rows = [s for s in request.steps if s.index == transition.step_index]
                step = max(rows, key=lambda s: s.round)
                facts = {
                    "step_index": step.index,
                    "round": step.round,
                    "step_label": step_labels.get(step.index, step.name),
                    "step_count": step_count,
                }
                key = f"{request.id}:step_opened:{step.index}:{step.round}"
                for approver in step.approvers:
                    added += self._queue(
                        session, connection, approver, "step_opened", key, facts, roles, request.id, later
                    )
            elif transition.kind in SUBMITTER_EVENTS:
                if transition.actor is not None and transition.actor == request.submitter:
                    continue  # nobody needs telling what they just did
                event = SUBMITTER_EVENTS[transition.kind]
                facts = _transition_facts(request, transition, step_labels, step_count)
                key = f"{request.id}:{event}:{transition.seq}"
                added += self._queue(
                    session, connection, request.submitter, event, key, facts, roles, request.id, later
                )
        return added

    def queue_expiry_warnings(self, sessions: sessionmaker[Session], now: datetime | None = None) -> int:
        """The sweep job: warn each submitter once per approval that expires within the window."""
        now = now or utcnow()
        days = self.settings.notify.expiry_warning_days
        if days <= 0:
            return 0
        added = 0
        with transaction(sessions) as session:
            rows = session.scalars(
                select(ApprovalRequestRow)
                .where(ApprovalRequestRow.status == "approved")
                .where(ApprovalRequestRow.superseded_by.is_(None))
                .where(ApprovalRequestRow.expires_at > now)
                .where(ApprovalRequestRow.expires_at <= now + timedelta(days=days))
            ).all()
            for row in rows:
                assert row.expires_at is not None
                key = f"{row.id}:expiring:{row.expires_at.isoformat()}"
                facts = {"expires_at": row.expires_at.isoformat()}
                added += self._queue(
                    session, row.connection, row.submitter, "expiring", key, facts, {}, row.id
                )
        return added

    def queue_event(
        self,
        session: Session,
        connection: str,
        user_id: str,
        event: str,
        event_key: str,
        facts: Mapping[str, Any],
        roles: Mapping[str, tuple[str, ...]],
        request_id: str,
    ) -> int:
        """Queue `event` (its template has the same name) for one user on each of their channels;
        `event_key` plus the recipient and channel make each row's dedupe key."""
        return self._queue(session, connection, user_id, event, event_key, facts, roles, request_id)

    def event_rows(
        self,
        connection: str,
        user_id: str,
        event: str,
        event_key: str,
        facts: Mapping[str, Any],
        roles: Mapping[str, tuple[str, ...]],
        request_id: str,
    ) -> list[dict[str, Any]]:
        """The rows `queue_event` would add, as column values, for a bulk INSERT that ignores
        dedupe keys already queued (connector.storage.db.insert_ignoring_conflicts)."""
        rows = []
        for channel, target in self.channels_for(connection, user_id, roles):
            # shared chat channels get one message per event, however many members it concerns
            recipient = target if channel == "chat" and not target.startswith("user:") else f"user:{user_id}"
            rows.append(
                {
                    "dedupe_key": f"{event_key}:{recipient}:{channel}"[:400],
                    "event": event,
                    "template": event,
                    "channel": channel,
                    "connection": connection,
                    "user_id": user_id,
                    "email": None,
                    "target": target or None,
                    "request_id": request_id,
                    "context": dict(facts),
                    "status": PENDING,
                    "attempts": 0,
                    "created_at": utcnow(),
                }
            )
        return rows

    def _queue(
        self,
        session: Session,
        connection: str,
        user_id: str,
        event: str,
        event_key: str,
        facts: Mapping[str, Any],
        roles: Mapping[str, tuple[str, ...]],
        request_id: str,
        later: bool = False,
    ) -> int:
        added = 0
        for row in self.event_rows(connection, user_id, event, event_key, facts, roles, request_id):
            buffered = batch_writes.add_notification(session, row) if later else None
            if buffered is not None:  # checked against the queued keys when the batch writes it
                added += buffered
                continue
            taken = select(Notification.id).where(Notification.dedupe_key == row["dedupe_key"])
            if session.scalar(taken) is not None:
                continue
            session.add(Notification(**row))
            session.flush()
            added += 1
        return added

    def channels_for(
        self, connection: str, user_id: str, roles: Mapping[str, tuple[str, ...]]
    ) -> list[tuple[str, str]]:
        """(channel, chat target) pairs for one recipient; the most specific chat setting wins."""
        notify = self.settings.notify
        found: list[tuple[str, str]] = [("email", "")] if notify.email else []
        user_target = f"user:{env_name(user_id)}"
        if user_target in notify.chat_urls:
            return [*found, ("chat", user_target)]
        role_targets = [
            f"role:{env_name(role)}"
            for role, members in sorted(roles.items())
            if user_id in members and f"role:{env_name(role)}" in notify.chat_urls
        ]
        if role_targets:
            return found + [("chat", target) for target in role_targets]
        config = self.settings.connections.get(connection)
        if config is not None and config.get_list("NOTIFY_URLS"):
            return [*found, ("chat", f"connection:{connection}")]
        return found

    def chat_urls(self, target: str) -> tuple[str, ...]:
        """The Apprise URLs of a chat target (from the environment, never from the database)."""
        kind, _, name = target.partition(":")
        if kind == "connection":
            config = self.settings.connections.get(name)
            return config.get_list("NOTIFY_URLS") if config is not None else ()
        return self.settings.notify.chat_urls.get(target, ())


def _transition_facts(
    request: ApprovalRequest, transition: Transition, step_labels: Mapping[int, str], step_count: int
) -> dict[str, Any]:
    index = transition.step_index
    if index is None and transition.kind == "rejected":  # the request's row names no step: find it
        rejected = [s for s in request.steps if s.status == "rejected"]
        index = max(rejected, key=lambda s: (s.left_at or s.entered_at, s.round)).index if rejected else None
    return {
        "actor": transition.actor,
        "comment": transition.comment,
        "step_index": index,
        "step_label": step_labels.get(index) if index is not None else None,
        "step_count": step_count,
        "at": transition.at.isoformat(),
    }
