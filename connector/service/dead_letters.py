"""Dead letters and replay: what ops do after fixing the data, a mapping or the CRM side.
Used by `crm-approvals dead-letters ...`, `crm-approvals replay` and /api/v1/dead-letters.

* **retry** an outbox dead letter (a write-back the CRM refused): a new outbox update is
  queued with the refused fields, minus any field a later write-back of the same record
  has set since (retrying an old `Status = Approved` must not overwrite a newer
  `Status = Pending`). The dead letter is resolved in the same transaction, and the new
  update carries the idempotency key `dead-letter:<id>`, so however often and from
  wherever retry is run, the update is queued once and the outbox sends it once.
* **retry** an inbox dead letter (an event that could not be processed, e.g. a step
  whose approvers resolve to nobody): the inbox event is re-run, as `replay` does.
* **discard**: resolve without doing anything (the record was fixed by hand, say).
* **replay** inbox events (by id, record or time range): each goes back to `pending`,
  marked as replayed, and is processed through the current mappings. The pipeline then
  judges it as it came even if its values are known by now, and leaves alone any rule
  that has a request submitted since the event arrived, so a replay never opens
  anything twice and replaying again changes nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Select, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from connector.clock import utcnow
from connector.errors import CrmApprovalsError
from connector.metrics import INBOX_EVENTS
from connector.runtime import Runtime
from connector.storage.approval_store import RecordKey
from connector.storage.db import transaction
from connector.storage.dead_letters import DeadLetterFilter
from connector.storage.inbox import process_one
from connector.storage.models import DEAD, DONE, PENDING, DeadLetter, InboxEvent, OutboxUpdate
from connector.storage.outbox import enqueue_update, flush

# --- reading ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Page:
    items: list[DeadLetter]
    total: int


def list_letters(
    sessions: sessionmaker[Session],
    where: DeadLetterFilter,
    *,
    limit: int = 100,
    offset: int = 0,
    now: datetime | None = None,
) -> Page:
    """Matching dead letters, oldest first, one page of them, and how many match in all."""
    query = where.select(now or utcnow())
    with sessions() as session:
        total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
        items = list(session.scalars(query.order_by(DeadLetter.id).limit(limit).offset(offset)))
    return Page(items, int(total))


def get_letter(sessions: sessionmaker[Session], letter_id: int) -> DeadLetter | None:
    with sessions() as session:
        return session.get(DeadLetter, letter_id)


# --- acting -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Action:
    """What retry or discard did to one dead letter (or would do, in a dry run)."""

    letter_id: int
    kind: str
    record: str
    action: str  # requeued | superseded | discarded | skipped
    detail: str
    outbox_id: int | None = None  # the update queued for an outbox retry
    event_id: int | None = None  # the inbox event re-run for an inbox retry


class _AlreadyResolved(CrmApprovalsError):
    pass


def retry(
    sessions: sessionmaker[Session],
    where: DeadLetterFilter,
    *,
    dry_run: bool = False,
    now: datetime | None = None,
) -> list[Action]:
    """Re-queue each matching open dead letter once (see the module docstring)."""
    return _each(sessions, where, dry_run, now or utcnow(), _retry_one)


def discard(
    sessions: sessionmaker[Session],
    where: DeadLetterFilter,
    *,
    dry_run: bool = False,
    now: datetime | None = None,
) -> list[Action]:
    """Resolve each matching open dead letter without sending or processing anything."""

    def discard_one(session: Session, letter: DeadLetter, now: datetime, dry_run: bool) -> Action:
        if not dry_run:
            _resolve(session, letter, now, "discarded")
        return _action(letter, "discarded", "resolved without retrying")

    return _each(sessions, where, dry_run, now or utcnow(), discard_one)


ActOnOne = Callable[[Session, DeadLetter, datetime, bool], Action]


def _each(
    sessions: sessionmaker[Session], where: DeadLetterFilter, dry_run: bool, now: datetime, act: ActOnOne
) -> list[Action]:
    # Named ids may be resolved already (that is reported); a filter picks open ones only.
    where = replace(where, state="all" if where.ids else "open")
    with sessions() as session:
        ids = list(
            session.scalars(where.select(now).with_only_columns(DeadLetter.id).order_by(DeadLetter.id))
        )
    missing = sorted(set(where.ids) - set(ids))
    actions = [Action(i, "-", "-", "skipped", "no such dead letter") for i in missing]
    for letter_id in ids:
        try:
            with transaction(sessions) as session:
                letter = session.get(DeadLetter, letter_id)
                assert letter is not None
                if letter.resolved_at is not None:
                    actions.append(_resolved_already(letter))
                    continue
                actions.append(act(session, letter, now, dry_run))
        except _AlreadyResolved:  # someone else resolved it between our read and our write
            with sessions() as session:
                letter = session.get(DeadLetter, letter_id)
                assert letter is not None
                actions.append(_resolved_already(letter))
    return sorted(actions, key=lambda a: a.letter_id)


def _retry_one(session: Session, letter: DeadLetter, now: datetime, dry_run: bool) -> Action:
    if letter.kind == "inbox":
        event = session.get(InboxEvent, letter.ref_id)
        if event is None:
            return _action(letter, "skipped", f"inbox event {letter.ref_id} is no longer stored")
        if not dry_run:
            _resolve(session, letter, now, "retried")
            _mark_for_replay(event, now)
        return _action(letter, "requeued", f"inbox event {event.id} re-runs", event_id=event.id)
    fields, newer = _fields_to_resend(session, letter)
    if not fields:
        if not dry_run:
            _resolve(session, letter, now, "superseded")
        return _action(
            letter, "superseded", f"later write-backs already set {', '.join(sorted(newer))}; nothing to send"
        )
    note = f" ({', '.join(sorted(newer))} left out: set by a later write-back)" if newer else ""
    if dry_run:
        return _action(letter, "requeued", f"would send {_fields_text(fields)}{note}")
    _resolve(session, letter, now, "retried")
    reason = letter.payload.get("reason") if isinstance(letter.payload, dict) else None
    row = enqueue_update(
        session,
        letter.connection,
        letter.object_type,
        letter.record_id,
        fields,
        reason=f"retry of dead letter {letter.id}" + (f": {reason}" if reason else ""),
        idempotency_key=f"dead-letter:{letter.id}",
    )
    if row is None:  # the key is taken: this dead letter was re-queued before
        raise _AlreadyResolved("the dead letter was resolved meanwhile")
    return _action(letter, "requeued", f"queued {_fields_text(fields)}{note}", outbox_id=row.id)


def _fields_to_resend(session: Session, letter: DeadLetter) -> tuple[dict[str, Any], set[str]]:
    """The refused fields, minus those a later, not refused write-back of the record set."""
    refused = session.get(OutboxUpdate, letter.ref_id)
    fields = dict(refused.fields if refused is not None else letter.payload.get("fields") or {})
    later = session.scalars(
        select(OutboxUpdate.fields)
        .where(OutboxUpdate.connection == letter.connection)
        .where(OutboxUpdate.object_type == letter.object_type)
        .where(OutboxUpdate.record_id == letter.record_id)
        .where(OutboxUpdate.id > letter.ref_id, OutboxUpdate.status != DEAD)
    )
    newer = {name.lower() for written in later for name in written}
    superseded = {name for name in fields if name.lower() in newer}
    return {k: v for k, v in fields.items() if k not in superseded}, superseded


def _resolve(session: Session, letter: DeadLetter, now: datetime, resolution: str) -> None:
    """Resolve only if still open (a conditional UPDATE: two concurrent retries cannot both win)."""
    result = session.execute(
        update(DeadLetter)
        .where(DeadLetter.id == letter.id, DeadLetter.resolved_at.is_(None))
        .values(resolved_at=now, resolution=resolution)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise _AlreadyResolved("the dead letter was resolved meanwhile")
    session.refresh(letter)


def _action(letter: DeadLetter, action: str, detail: str, **ids: int) -> Action:
    record = f"{letter.connection}:{letter.object_type}:{letter.record_id}"
    return Action(letter.id, letter.kind, record, action, detail, **ids)


def _resolved_already(letter: DeadLetter) -> Action:
    when = letter.resolved_at.isoformat(timespec="seconds") if letter.resolved_at else "?"
    return _action(letter, "skipped", f"already resolved ({letter.resolution or 'resolved'} at {when})")


def _fields_text(fields: dict[str, Any]) -> str:
    return ", ".join(f"{k} = {v!r}" for k, v in fields.items())


# --- replay ------------------------------------------------------------------------------


@dataclass(frozen=True)
class EventSelection:
    """Which inbox events to replay: every given criterion must hold (times are received_at)."""

    ids: tuple[int, ...] = ()
    record: RecordKey | None = None
    since: datetime | None = None
    until: datetime | None = None
    statuses: tuple[str, ...] = (DONE, DEAD)

    @property
    def narrows(self) -> bool:
        return bool(self.ids or self.record or self.since or self.until)

    def select(self) -> Select[InboxEvent]:
        query = select(InboxEvent).where(InboxEvent.status.in_(self.statuses))
        if self.ids:
            query = query.where(InboxEvent.id.in_(self.ids))
        if self.record is not None:
            query = query.where(InboxEvent.connection == self.record.connection)
            query = query.where(func.lower(InboxEvent.object_type) == self.record.object_type.lower())
            query = query.where(InboxEvent.record_id == self.record.record_id)
        if self.since is not None:
            query = query.where(InboxEvent.received_at >= self.since)
        if self.until is not None:
            query = query.where(InboxEvent.received_at < self.until)
        return query.order_by(InboxEvent.id)


@dataclass(frozen=True)
class Replayed:
    event_id: int
    record: str
    status_before: str
    received_at: datetime
    result: str | None  # what processing had said


def replay(
    sessions: sessionmaker[Session],
    selection: EventSelection,
    *,
    dry_run: bool = False,
    limit: int = 10_000,
    now: datetime | None = None,
) -> list[Replayed]:
    """Mark the selected events for re-processing; returns them. Pending ones are left as
    they are: they will be processed anyway."""
    now = now or utcnow()
    with sessions() as session:
        events = list(session.scalars(selection.select().limit(limit)))
    chosen = [_replayed(event) for event in events]
    if dry_run:
        return chosen
    marked = []
    for item in chosen:
        with transaction(sessions) as session:
            event = session.execute(
                select(InboxEvent).where(InboxEvent.id == item.event_id).with_for_update()
            ).scalar_one()
            if event.status == PENDING:
                continue  # marked by someone else meanwhile
            if event.status == DEAD:
                _resolve_event_letters(session, event.id, now)
            _mark_for_replay(event, now)
            marked.append(item)
    return marked


def _replayed(event: InboxEvent) -> Replayed:
    record = f"{event.connection}:{event.object_type}:{event.record_id}"
    return Replayed(event.id, record, event.status, event.received_at, event.result or event.last_error)


def _mark_for_replay(event: InboxEvent, now: datetime) -> None:
    event.status, event.attempts, event.next_attempt_at = PENDING, 0, None
    event.replayed_at = now


def _resolve_event_letters(session: Session, event_id: int, now: datetime) -> None:
    session.execute(
        update(DeadLetter)
        .where(DeadLetter.kind == "inbox", DeadLetter.ref_id == event_id, DeadLetter.resolved_at.is_(None))
        .values(resolved_at=now, resolution="retried")
        .execution_options(synchronize_session=False)
    )


# --- doing it now (the CLI; the API leaves it to the worker) -------------------------------


@dataclass
class RunReport:
    events: dict[int, tuple[str, str | None]] = field(default_factory=dict)  # id -> (status, result)
    updates: dict[int, tuple[str, str | None]] = field(default_factory=dict)  # id -> (status, error)


def run_now(runtime: Runtime, event_ids: Sequence[int] = (), outbox_ids: Sequence[int] = ()) -> RunReport:
    """Process the given inbox events, then flush the outbox, and say where each one ended up.

    An event or update the worker took first is simply reported as it stands."""
    settings = runtime.settings
    if event_ids:
        if runtime.processor is None:
            raise RuntimeError(
                "this runtime has no event processor (use connector.service.pipeline.build_runtime)"
            )
        for event_id in event_ids:
            outcome = process_one(
                runtime.sessions, runtime.processor, event_id, max_attempts=settings.inbox_max_attempts
            )
            if outcome:
                INBOX_EVENTS.labels(outcome).inc()
    flush(
        runtime.sessions,
        runtime.adapter,
        lease_seconds=settings.outbox_lease_seconds,
        max_attempts=settings.outbox_max_attempts,
    )
    report = RunReport()
    with runtime.sessions() as session:
        for event in session.scalars(select(InboxEvent).where(InboxEvent.id.in_(event_ids))):
            report.events[event.id] = (event.status, event.result or event.last_error)
        for row in session.scalars(select(OutboxUpdate).where(OutboxUpdate.id.in_(outbox_ids))):
            report.updates[row.id] = (row.status, row.last_error)
    return report


# --- reading arguments (shared by the CLI and the API) ------------------------------------

_AGE = re.compile(r"^\s*([0-9]{1,12})\s*(s|m|h|d|w)\s*$")  # ASCII digits: \d also matches "²"
MAX_AGE = timedelta(days=36525)  # a century; more would overflow a date subtracted from now
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
AGE_HINT = "an age such as 90s, 30m, 2h, 3d or 1w (m = minutes)"
TIME_HINT = "an ISO date or time such as 2026-11-23 or 2026-11-23T10:00:00Z (UTC if no zone), or " + AGE_HINT


def parse_age(text: str) -> timedelta:
    match = _AGE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not {AGE_HINT}")
    seconds = int(match.group(1)) * _SECONDS[match.group(2)]
    if seconds > MAX_AGE.total_seconds():
        raise ValueError(f"{text.strip()!r} is more than a century; give a shorter age")
    return timedelta(seconds=seconds)


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """An ISO date/time (UTC if it has no zone), or an age meaning that long ago."""
    if _AGE.match(text):
        return (now or utcnow()) - parse_age(text)
    try:
        parsed = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    except (ValueError, OverflowError):  # OverflowError: year 1 or 9999 moved across the date line
        raise ValueError(f"{text!r} is not {TIME_HINT}") from None


def parse_record(text: str) -> RecordKey:
    parts = text.split(":", 2)  # the record id itself may contain ':'
    if len(parts) != 3 or not all(p.strip() for p in parts):
        raise ValueError(f"{text!r} is not CONNECTION:OBJECT:ID, e.g. sandbox:deal:D-1001")
    return RecordKey(*(p.strip() for p in parts))


def letter_json(letter: DeadLetter) -> dict[str, Any]:
    """One dead letter as the CLI's --json and the API show it."""
    return {
        "id": letter.id,
        "kind": letter.kind,
        "ref_id": letter.ref_id,
        "record": {
            "connection": letter.connection,
            "object": letter.object_type,
            "id": letter.record_id,
            "ref": f"{letter.connection}:{letter.object_type}:{letter.record_id}",
        },
        "error": {
            "code": letter.error_code,
            "message": letter.error_message,
            "fields": list(letter.error_fields or ()),
        },
        "payload": letter.payload,
        "created_at": letter.created_at.isoformat(),
        "state": "open" if letter.resolved_at is None else "resolved",
        "resolved_at": letter.resolved_at.isoformat() if letter.resolved_at else None,
        "resolution": letter.resolution,
    }


def action_json(action: Action) -> dict[str, Any]:
    return {
        "id": action.letter_id,
        "kind": action.kind,
        "record": action.record,
        "action": action.action,
        "detail": action.detail,
        "outbox_id": action.outbox_id,
        "event_id": action.event_id,
    }
