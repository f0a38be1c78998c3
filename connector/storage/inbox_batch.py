"""Processing the inbox in claimed batches: several workers share a burst without
touching each other's events, and each batch costs few statements and few CRM reads.

claim (one short transaction):
    take up to `batch_size` due events nobody holds (`FOR UPDATE SKIP LOCKED` on PostgreSQL;
    on SQLite the write lock taken at BEGIN IMMEDIATE serialises claimers) and stamp
    `claimed_until` = now + lease, so no other worker prepares them: without the claim
    every worker read the CRM for the same events and all but one threw the reads away.
prepare (no transaction):
    the processor's `prepare_batch` reads every record the batch needs in as few CRM calls
    as the CRM's batch limits allow.
apply (one transaction for the whole batch):
    each event's effects plus its DONE mark. A failing event must not poison its batch: on
    any error the batch transaction is rolled back and its events are applied one by one,
    each in its own transaction as `process_one` does, reusing what was prepared.

A worker killed mid-batch leaves its events pending with a claim that expires after the
lease: then another worker takes them up; nothing is half-done (the apply is one
transaction) and nothing is done twice (apply re-checks the status under a row lock).

read ahead (the worker's reader thread, `process_in_batches(read_ahead=...)`):
    after a full batch (a burst), the next one is claimed before this one is applied and
    prepared in the reader thread meanwhile, so its CRM reads overlap our apply. Only claimed
    events are read; the reader has sessions of its own. The pass applies every batch it
    read ahead: a burst takes it past its limit (for `burst_seconds`), and a pass that fails
    hands the batch back.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Integer, Table, Text, bindparam, or_, select, text, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session, sessionmaker

from connector.clock import utcnow
from connector.events import RecordChangeEvent
from connector.metrics import INBOX_EVENTS
from connector.storage import bulk
from connector.storage.db import UTCDateTime, collector_paused, in_ids, transaction
from connector.storage.models import DONE, PENDING, InboxEvent

log = logging.getLogger(__name__)

BATCH_SIZE = 200  # events per claim: Salesforce's SOQL `IN` limit, twice the others'
# Events per apply transaction: bounds how long one transaction holds its locks (on SQLite the
# one writer lock the webhook intake waits for), while reads still cover the whole claim.
APPLY_CHUNK = 50
LEASE_SECONDS = 120  # outlives a batch's prepare (reads with retries); a dead worker's events wait this long


_INBOX = cast(Table, InboxEvent.__table__)
# What applying an event reads of its locked row: its status and attempts, and what
# `audit_received` records (not its values, which the claim already decoded).
_LOCKED_COLUMNS = tuple(
    _INBOX.c[name]
    for name in ("id", "status", "attempts", "connection", "object_type", "record_id", "source",
                 "event_id", "received_at", "changed_fields")
)  # fmt: skip


def _dialect(session: Session) -> str:
    return session.get_bind().dialect.name


@dataclass(frozen=True)
class Claimed:
    id: int  # the inbox row
    event: RecordChangeEvent
    received_at: datetime


def claim(
    sessions: sessionmaker[Session], limit: int, now: datetime, lease_seconds: float = LEASE_SECONDS
) -> list[Claimed]:
    """Claim up to `limit` due, unclaimed pending events, oldest first (two statements); the
    claim holds until `now` + `lease_seconds`. Plain rows, not ORM objects: they are only read."""
    with transaction(sessions) as session:
        query = (
            select(_INBOX)
            .where(_INBOX.c.status == PENDING)
            .where(or_(_INBOX.c.next_attempt_at.is_(None), _INBOX.c.next_attempt_at <= now))
            .where(or_(_INBOX.c.claimed_until.is_(None), _INBOX.c.claimed_until <= now))
            .order_by(_INBOX.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        rows = session.execute(query).all()
        if not rows:
            return []
        session.execute(
            update(_INBOX)
            .where(in_ids(_INBOX.c.id, _dialect(session), [r.id for r in rows]))
            .values(claimed_until=now + timedelta(seconds=lease_seconds))
        )
        return [Claimed(row.id, RecordChangeEvent.from_row(row), row.received_at) for row in rows]


def read_unit(processor: Any, batch_size: int) -> int:
    """Events per full CRM read call of the processor's connections (1 when it cannot say)."""
    unit = getattr(processor, "read_unit", None)
    value = unit() if unit is not None else 1
    return value if 1 <= value <= batch_size else 1


def release(sessions: sessionmaker[Session], claimed: Sequence[Claimed]) -> None:
    """Hand claimed events back: due again at once, for this worker or another."""
    with transaction(sessions) as session:
        session.execute(
            update(_INBOX)
            .where(in_ids(_INBOX.c.id, _dialect(session), [c.id for c in claimed]))
            .values(claimed_until=None)
        )


def claimed_elsewhere(sessions: sessionmaker[Session], now: datetime) -> bool:
    """Whether pending events are held by a live claim (another worker is judging them)."""
    with sessions() as session:
        query = (
            select(InboxEvent.id)
            .where(InboxEvent.status == PENDING)
            .where(InboxEvent.claimed_until > now)
            .limit(1)
        )
        return session.scalar(query) is not None


def prepare_all(processor: Any, events: Sequence[RecordChangeEvent]) -> list[Any]:
    """One prepared value or the exception per event, in order."""
    batch = getattr(processor, "prepare_batch", None)
    if batch is not None:
        return list(batch(events))
    results: list[Any] = []
    for event in events:
        try:
            results.append(processor.prepare(event))
        except Exception as exc:  # recorded per event by the caller
            results.append(exc)
    return results


def process_claimed(
    sessions: sessionmaker[Session],
    processor: Any,
    claimed: Sequence[Claimed],
    *,
    max_attempts: int,
    prepared: Sequence[Any] | None = None,
) -> dict[str, int]:
    """Prepare and apply a claimed batch; returns outcome -> count. `prepared`: what
    `prepare_all` gave for it already (a batch read ahead)."""
    from connector.storage.inbox import process_one  # the one-by-one path and its error handling

    outcomes: dict[str, int] = {}

    def count(outcome: str | None) -> None:
        if outcome:
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            INBOX_EVENTS.labels(outcome).inc()

    if prepared is None:
        prepared = prepare_all(processor, [c.event for c in claimed])
    ready = [(c, p) for c, p in zip(claimed, prepared, strict=True) if not isinstance(p, BaseException)]
    for item, failure in zip(claimed, prepared, strict=True):
        if isinstance(failure, BaseException):
            count(process_one(sessions, processor, item.id, max_attempts=max_attempts, failure=failure))
    for start in range(0, len(ready), APPLY_CHUNK):
        chunk = ready[start : start + APPLY_CHUNK]
        try:
            applied = _apply_together(sessions, processor, chunk)
        except Exception as exc:  # one bad event: fall back to one transaction per event
            log.info("batch of %d events failed (%s); applying them one by one", len(chunk), exc)
            for item, value in chunk:
                count(process_one(sessions, processor, item.id, max_attempts=max_attempts, prepared=value))
            continue
        for _ in range(applied):
            count(DONE)
    return outcomes


def _apply_together(sessions: sessionmaker[Session], processor: Any, ready: list[tuple[Claimed, Any]]) -> int:
    """Apply every event of the batch in ONE transaction; returns how many were applied.
    The cyclic garbage collector waits until it is committed (`collector_paused`)."""
    from connector.storage.inbox import audit_received

    with collector_paused(), transaction(sessions) as session:
        dialect = _dialect(session)
        ids = [c.id for c, _ in ready]
        query = select(*_LOCKED_COLUMNS).where(in_ids(_INBOX.c.id, dialect, ids))
        locked = {row.id: row for row in session.execute(query.with_for_update(skip_locked=True))}
        mine = [(item, value) for item, value in ready if _pending(locked.get(item.id))]
        preload = getattr(processor, "preload", None)
        if preload is not None:  # what the batch's events will look up, in a few selects
            preload(session, [item.event for item, _ in mine])
        done: list[tuple[int, int, str]] = []  # id, attempts before, result
        for item, value in mine:
            row = locked[item.id]
            audit_received(session, row)
            summary = processor.apply(session, item.event, value)
            done.append((row.id, row.attempts, summary[:2000]))
        mark_done(session, done, utcnow())
    return len(done)


def _pending(row: Any) -> bool:
    return row is not None and row.status == PENDING  # else another worker got there first


_MARK_DONE_POSTGRES = text(
    "UPDATE inbox_events SET status = :status, processed_at = :now, result = v.result, "
    "attempts = inbox_events.attempts + 1, claimed_until = NULL "
    "FROM unnest(CAST(:ids AS INTEGER[]), CAST(:results AS TEXT[])) AS v(id, result) "
    "WHERE inbox_events.id = v.id"
).bindparams(
    bindparam("ids", type_=ARRAY(Integer)),
    bindparam("results", type_=ARRAY(Text)),
    bindparam("now", type_=UTCDateTime()),
)


def mark_done(session: Session, done: Sequence[tuple[int, int, str]], now: datetime) -> None:
    """Mark applied events DONE in one statement (not an UPDATE, or an executemany row, per
    event): `done` holds each event's id, its attempts so far (read under the row's lock) and
    its result. On PostgreSQL the ids and results go as two arrays; on SQLite as a VALUES list
    (`bulk.update_rows`)."""
    if not done:
        return
    if _dialect(session) == "postgresql":
        ids = [event_id for event_id, _attempts, _result in done]
        results = [result for _id, _attempts, result in done]
        session.execute(_MARK_DONE_POSTGRES, {"status": DONE, "now": now, "ids": ids, "results": results})
        return
    rows = [(event_id, DONE, now, result, attempts + 1) for event_id, attempts, result in done]
    columns = ("status", "processed_at", "result", "attempts")
    bulk.update_rows(session, _INBOX, ("id",), columns, rows, nulls=("claimed_until",))


@dataclass(frozen=True)
class Batch:
    """A claimed batch and what preparing it gave: per event its prepared value or the error."""

    claimed: list[Claimed]
    prepared: list[Any]
    full: bool  # as many events as there was room for: a burst, more are likely due


def next_batch(
    sessions: sessionmaker[Session],
    processor: Any,
    *,
    room: int,
    unit: int,
    now: datetime,
    linger: float = 0.0,
    on_full_batch: Callable[[], None] | None = None,
    claimed: list[Claimed] | None = None,
    lease_seconds: float = LEASE_SECONDS,
) -> Batch | None:
    """Claim up to `room` events (whole read calls of `unit` while a burst still arrives, see
    `process_in_batches`) and prepare them (the CRM reads); None when no event is due.
    `claimed`: the first claim, made by the caller."""
    while True:
        if claimed is None:
            claimed = claim(sessions, room, now, lease_seconds)
        if not claimed:
            return None
        if linger > 0 and len(claimed) < room and _still_arriving(claimed, linger):
            # Events are still coming in: wait a moment so this batch's CRM reads carry more
            # records (fewer calls against the CRM's API allowance), as a producer's linger.
            time.sleep(linger)
            claimed += claim(sessions, room - len(claimed), now + timedelta(seconds=linger), lease_seconds)
        if (
            len(claimed) < unit
            and _still_arriving(claimed, linger)
            and (utcnow() - claimed[0].received_at).total_seconds() < 2 * linger
        ):
            # Not one full read yet (several workers share a trickle): hand them back and wait,
            # for at most two lingers since the oldest arrived; whoever claims next reads more.
            release(sessions, claimed)
            time.sleep(linger)
            claimed = None
            continue
        if len(claimed) > unit and len(claimed) % unit and _still_arriving(claimed, linger):
            # Still arriving: judge whole read calls now and hand the rest back, to be read
            # with what comes next instead of in a partial call of its own.
            keep = len(claimed) - len(claimed) % unit
            release(sessions, claimed[keep:])
            claimed = claimed[:keep]
        full = len(claimed) == room
        if full and on_full_batch is not None:
            on_full_batch()
        return Batch(claimed, prepare_all(processor, [c.event for c in claimed]), full)


def process_in_batches(
    sessions: sessionmaker[Session],
    processor: Any,
    *,
    limit: int,
    max_attempts: int,
    now: datetime,
    batch_size: int = BATCH_SIZE,
    on_full_batch: Callable[[], None] | None = None,
    after_full_batch: Callable[[], object] | None = None,
    linger: float = 0.0,
    read_ahead: Executor | None = None,
    burst_seconds: float = 0.0,
) -> tuple[dict[str, int], bool]:
    """Claim and process batches until `limit` events are handled or none is due.

    Returns (outcome -> count, whether due events may be left). `on_full_batch` runs after
    each full claim, before the batch is worked on: the worker uses it to nudge another
    worker to claim the next share in parallel; `after_full_batch` after such a batch is
    applied (the worker sends the write-back calls that are full). `linger`: when a claim is
    partial and events arrived within that many seconds, wait that long once and fill the
    batch up.

    `read_ahead` (the worker's thread for it): after a full batch, the next one is claimed
    here and read there while this one is applied, so the CRM's read time overlaps ours. A
    burst then goes on past `limit` for up to `burst_seconds` since the pass began: the batch
    read ahead is applied by this pass, never left for a next pass that another worker's
    nudge might run instead (it would wait, claimed, for a pass of this worker)."""
    outcomes: dict[str, int] = {}
    handled = 0
    unit = read_unit(processor, batch_size)
    batch_size -= batch_size % unit  # full read calls: 200 events are 2 HubSpot reads, ...
    limit = max(unit, limit - limit % unit)  # ... and 500 would be 2.5 Salesforce reads
    started = time.monotonic()

    def lease() -> float:  # from the claim on: `now` stays the pass's start (what is due)
        return LEASE_SECONDS + time.monotonic() - started

    fetch = functools.partial(
        next_batch, sessions, processor, unit=unit, now=now, linger=linger, on_full_batch=on_full_batch
    )
    batch = fetch(room=min(batch_size, limit))
    while batch is not None:
        handled += len(batch.claimed)
        room = min(batch_size, limit - handled)
        if room <= 0 and read_ahead is not None and time.monotonic() - started < burst_seconds:
            room = batch_size  # a burst: go on past the limit
        ahead = None
        if read_ahead is not None and batch.full and room > 0:
            # The next batch is claimed now, before anything of it is read (claims are this
            # worker's; each lease runs from its claim, not from the pass's start), and read
            # in the reader thread while this one is applied. The claim is made here, not there: on SQLite it
            # would wait for the apply's transactions, which hold the one writer lock.
            first = claim(sessions, room, now, lease())
            ahead = (
                read_ahead.submit(fetch, room=room, claimed=first, lease_seconds=lease()) if first else None
            )
        try:
            applied = process_claimed(
                sessions, processor, batch.claimed, max_attempts=max_attempts, prepared=batch.prepared
            )
            if batch.full and after_full_batch is not None:
                after_full_batch()
        except BaseException:
            if ahead is not None:
                _hand_back(sessions, ahead)
            raise
        for outcome, n in applied.items():
            outcomes[outcome] = outcomes.get(outcome, 0) + n
        if room <= 0:
            return outcomes, True
        batch = ahead.result() if ahead is not None else fetch(room=room, lease_seconds=lease())
    return outcomes, False


def _hand_back(sessions: sessionmaker[Session], ahead: Future[Batch | None]) -> None:
    """A pass that fails leaves no batch claimed ahead behind it: other workers (or its next
    pass) take the events up at once instead of after the lease."""
    try:
        batch = ahead.result()
        if batch is not None:
            release(sessions, batch.claimed)
    except Exception as exc:  # the failure being raised says more; the lease ends the claim
        log.warning("could not hand back the batch read ahead: %s", exc)


def _still_arriving(claimed: Sequence[Claimed], linger: float) -> bool:
    newest = max(c.received_at for c in claimed)
    return (utcnow() - newest).total_seconds() < linger
