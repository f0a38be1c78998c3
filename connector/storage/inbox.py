"""The durable inbox: webhooks are written here first and acknowledged only after commit.

huey is at-most-once, so the inbox row is the truth: a task only nudges the worker, and
the periodic sweep re-drives whatever a lost task left pending. Processing one event and
marking it done happen in one transaction, so a killed worker leaves it pending, never
half-done, and it is processed exactly once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from connector.clock import utcnow
from connector.errors import FatalError, RetriableError
from connector.events import RecordChangeEvent
from connector.storage import audit, dead_letters
from connector.storage.db import insert_ignoring_conflicts, transaction
from connector.storage.inbox_writer import InboxWriter
from connector.storage.models import DEAD, DONE, PENDING, DeadLetter, InboxEvent

log = logging.getLogger(__name__)


class EventProcessor(Protocol):
    """What the worker does with one event, split so no network call holds a DB lock."""

    def prepare(self, event: RecordChangeEvent) -> Any:
        """Outside any transaction: fetch what the event lacks from the CRM.

        Raise a connector.errors.RetriableError to be retried later, a FatalError to be
        dead-lettered at once; anything else counts as a bug (logged, retried, then dead)."""

    def apply(self, session: Session, event: RecordChangeEvent, prepared: Any) -> str:
        """Inside the event's transaction: record every effect; return a one-line summary."""


@dataclass(frozen=True)
class AcceptResult:
    accepted: int
    duplicates: int
    # Events whose dedupe key was already stored with another content_hash: not redeliveries
    # but a sender reusing an id for new content. Nothing is stored for them.
    conflicts: tuple[RecordChangeEvent, ...] = ()


def accept(sessions: sessionmaker[Session], events: Sequence[RecordChangeEvent]) -> AcceptResult:
    """Write a delivery's events in one transaction; redelivered ones (same dedupe key) are dropped."""
    [result] = _write_batch(sessions, [list(events)])
    return result


def _write_batch(
    sessions: sessionmaker[Session],
    deliveries: list[list[RecordChangeEvent]],
    writer: InboxWriter | None = None,
) -> list[AcceptResult]:
    """Several deliveries in ONE transaction (group commit); one result per delivery.

    This is the webhook hot path: with a `writer` (the group-commit inbox's) at the driver
    level, else on a Core connection rather than an ORM session.
    """
    unique: dict[str, RecordChangeEvent] = {}
    for events in deliveries:  # the first delivery carrying a key is the one stored
        for e in events:
            unique.setdefault(e.dedupe_key, e)
    now = utcnow()
    rows = [{**e.to_row(), "received_at": now, "status": PENDING, "attempts": 0} for e in unique.values()]

    def unsure(new_keys: set[str]) -> set[str]:
        """Hashed events whose own row was not just written: their stored hash is compared.
        (The usual case, a new id, needs no second query.)"""
        return {
            e.dedupe_key
            for events in deliveries
            for e in events
            if e.content_hash is not None and not (e.dedupe_key in new_keys and unique[e.dedupe_key] is e)
        }

    if writer is not None:
        new_keys, stored_hashes = writer.write(rows, unsure)
    else:
        new_keys, stored_hashes = _write_rows(sessions, rows, unsure)
    results = []
    for events in deliveries:  # a key new in this batch counts for the first delivery carrying it
        mine = {e.dedupe_key for e in events} & new_keys
        new_keys -= mine
        # A row stored before hashes were kept (None) cannot be compared: a duplicate, as before.
        conflicts = tuple(
            e
            for e in events
            if e.dedupe_key not in mine and stored_hashes.get(e.dedupe_key) not in (None, e.content_hash)
        )
        duplicates = len(events) - len(mine) - len(conflicts)
        results.append(AcceptResult(accepted=len(mine), duplicates=duplicates, conflicts=conflicts))
    return results


def _write_rows(
    sessions: sessionmaker[Session], rows: list[dict[str, Any]], unsure: Callable[[set[str]], set[str]]
) -> tuple[set[str], dict[str, str | None]]:
    table = InboxEvent.__table__
    engine = sessions.kw["bind"]
    with engine.begin() as conn:
        new_keys = insert_ignoring_conflicts(conn, table, rows, key="dedupe_key")
        keys = unsure(new_keys)
        stored_hashes: dict[str, str | None] = {}
        if keys:
            query = select(table.c.dedupe_key, table.c.content_hash).where(table.c.dedupe_key.in_(keys))
            stored_hashes = {key: content_hash for key, content_hash in conn.execute(query)}
    return new_keys, stored_hashes


class GroupCommitInbox:
    """Concurrent deliveries in one process share one transaction (leader/follower group
    commit): the first waiting thread writes everything queued so far and wakes the rest.
    Every delivery is still acknowledged only after its own events are committed.

    The leader collects its batch only once it holds the writer's turn (on SQLite, the lock
    it shares with the other server processes): deliveries that arrive while another
    process commits join this commit rather than wait for the one after it.

    Each waiting delivery sleeps on a lock of its own, and the leader wakes exactly the
    threads it wrote for plus the next leader: a condition's notify_all woke every waiting
    thread to re-check and contend for one lock, costing CPU the deliveries need."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        self.writer = InboxWriter(sessions.kw["bind"])
        self._lock = threading.Lock()
        self._queue: list[_Delivery] = []
        self._writing = False

    def accept(self, events: Sequence[RecordChangeEvent]) -> AcceptResult:
        delivery = _Delivery(list(events))
        with self._lock:
            self._queue.append(delivery)
            leading = not self._writing
            self._writing = True
        if not leading:
            delivery.wait()  # until written, or made the next leader
            if delivery.finished:
                return delivery.outcome()
        batch: list[_Delivery] = []
        try:
            with self.writer.turn():
                with self._lock:
                    batch, self._queue = self._queue, []
                results = _write_batch(self.sessions, [d.events for d in batch], self.writer)
            for d, result in zip(batch, results, strict=True):
                d.result = result
        except BaseException as exc:
            if not batch:  # the turn itself failed: what is queued (ours included) fails with it
                with self._lock:
                    batch, self._queue = self._queue, []
            for d in batch:
                d.error = exc
        finally:
            with self._lock:
                for d in batch:
                    d.finished = True
                successor = self._queue[0] if self._queue else None
                self._writing = successor is not None
            for d in batch:
                if d is not delivery:
                    d.wake()
            if successor is not None:
                successor.wake()
        return delivery.outcome()


class _Delivery:
    """One delivery's events and, once written, its result or error. `wait` blocks until
    `wake`: a plain lock held from birth, the cheapest one-shot signal between threads."""

    __slots__ = ("events", "finished", "result", "error", "_asleep")

    def __init__(self, events: list[RecordChangeEvent]) -> None:
        self.events = events
        self.finished = False
        self.result: AcceptResult | None = None
        self.error: BaseException | None = None
        self._asleep = threading.Lock()
        self._asleep.acquire()

    def wait(self) -> None:
        self._asleep.acquire()

    def wake(self) -> None:
        self._asleep.release()

    def outcome(self) -> AcceptResult:
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


@dataclass
class ProcessReport:
    done: int = 0
    retried: int = 0
    dead: int = 0
    more: bool = False  # due events may be left behind: process again at once


def process_pending(
    sessions: sessionmaker[Session],
    processor: EventProcessor,
    *,
    limit: int = 500,
    max_attempts: int = 10,
    now: datetime | None = None,
    on_full_batch: Callable[[], None] | None = None,
    after_full_batch: Callable[[], object] | None = None,
    linger: float = 0.0,
    read_ahead: Executor | None = None,
    burst_seconds: float = 0.0,
) -> ProcessReport:
    """Process due pending events, oldest first, in claimed batches (connector/storage/
    inbox_batch.py). Safe to run from any number of workers. `report.more` says whether due
    events may be left behind (the limit was reached): the caller should come back at once."""
    from connector.storage.inbox_batch import process_in_batches

    outcomes, more = process_in_batches(
        sessions, processor, limit=limit, max_attempts=max_attempts, now=now or utcnow(),
        on_full_batch=on_full_batch, after_full_batch=after_full_batch, linger=linger,
        read_ahead=read_ahead, burst_seconds=burst_seconds,
    )  # fmt: skip
    return ProcessReport(**outcomes, more=more)


_UNPREPARED: Any = object()


def process_one(
    sessions: sessionmaker[Session],
    processor: EventProcessor,
    event_id: int,
    *,
    max_attempts: int = 10,
    prepared: Any = _UNPREPARED,
    failure: BaseException | None = None,
) -> str | None:
    """Returns "done", "retried", "dead", or None when another worker got there first.

    A batch passes what it already prepared for the event (`prepared`), or the error its
    preparation raised (`failure`), so falling back to one by one reads the CRM no more."""
    with sessions() as session:
        row = session.get(InboxEvent, event_id)
        if row is None or row.status != PENDING:
            return None
        event = RecordChangeEvent.from_row(row)
    try:
        if failure is not None:
            raise failure
        if prepared is _UNPREPARED:
            prepared = processor.prepare(event)
        with transaction(sessions) as session:
            locked = session.execute(
                select(InboxEvent).where(InboxEvent.id == event_id).with_for_update(skip_locked=True)
            ).scalar_one_or_none()
            if locked is None or locked.status != PENDING:
                return None
            audit_received(session, locked)
            summary = processor.apply(session, event, prepared)
            locked.status, locked.processed_at, locked.result = DONE, utcnow(), summary[:2000]
            locked.attempts += 1
            locked.claimed_until = None
        return "done"
    except RetriableError as exc:
        return _record_failure(sessions, event_id, exc, max_attempts, retry_after=exc.retry_after)
    except FatalError as exc:
        return _record_failure(sessions, event_id, exc, max_attempts=0)
    except Exception as exc:  # a bug in processing must not wedge the queue: back off, then dead-letter
        log.exception("processing inbox event %s failed", event_id)
        return _record_failure(sessions, event_id, exc, max_attempts)


def _record_failure(
    sessions: sessionmaker[Session],
    event_id: int,
    exc: Exception,
    max_attempts: int,
    retry_after: float | None = None,
) -> str:
    with transaction(sessions) as session:
        row = session.get(InboxEvent, event_id)
        assert row is not None
        row.attempts += 1
        row.claimed_until = None  # its backoff, not the claim's lease, says when it is due again
        row.last_error = f"{type(exc).__name__}: {describe(exc)}"[:2000]
        if row.attempts < max_attempts:
            row.next_attempt_at = utcnow() + timedelta(seconds=retry_after or backoff_seconds(row.attempts))
            return "retried"
        row.status = DEAD
        audit_received(session, row)
        dead_letters.add(
            session,
            DeadLetter(
                kind="inbox",
                ref_id=row.id,
                connection=row.connection,
                object_type=row.object_type,
                record_id=row.record_id,
                payload=RecordChangeEvent.from_row(row).to_row()
                | {"occurred_at": row.occurred_at.isoformat()},
                error_code=getattr(exc, "code", None),
                error_message=describe(exc),
                error_fields=list(getattr(exc, "fields", ()) or ()),
            ),
        )
        return "dead"


def describe(exc: BaseException) -> str:
    """The error's message plus the notes a caller added on the way up (e.g. the mapping file)."""
    return "; ".join([str(exc), *getattr(exc, "__notes__", ())])


def audit_received(session: Session, row: Any) -> None:
    """Audited when the worker takes the event up, in its transaction: the webhook hot path
    then writes one row only, and the inbox row itself already proves receipt until then.
    `row`: the inbox row, an ORM object or a plain row of (at least) the columns read here."""
    audit.record(
        session,
        "webhook_received",
        connection=row.connection,
        object_type=row.object_type,
        record_id=row.record_id,
        source=row.source,
        event_id=row.event_id,
        received_at=row.received_at,
        changed_fields=row.changed_fields,
    )


def backoff_seconds(attempts: int) -> float:
    """5 s, 10 s, 20 s ... capped at one hour."""
    return float(min(5 * 2 ** max(attempts - 1, 0), 3600))
