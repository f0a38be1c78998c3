"""The write-back outbox: field updates are recorded first, then flushed in batches.

Exactly-once, even if the worker dies between sending and committing (docs/outbox.md):
1. Claim: the rows of one adapter call (at most the CRM's batch limit of records) are
   marked `sending` with a batch id and a lease, and committed, before anything is sent.
   A record with a batch in flight is never claimed again.
2. Send: that one call; its per-record results are committed, then the next call is claimed.
3. Recover: a `sending` row whose lease ran out is *in doubt* (the send may or may not
   have landed). It is read back from the CRM; where the CRM already holds the values it
   is marked done without resending, otherwise it returns to pending.
A call that timed out or lost its connection is in doubt the same way: its rows stay
`sending` with their lease ended, so nothing newer for those records is sent until the
read-back has settled them. A CRM may still apply such a call minutes later, over a newer
write: drift repair (connector/service/drift.py) puts our values back.
Pending rows for the same record merge into one request (later values win).
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, cast

from sqlalchemy import Select, Table, or_, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from connector.clock import utcnow
from connector.crm.base import CRMAdapter, RecordUpdate, UpdateResult
from connector.crm.errors import AuthError, CRMError, InDoubtError
from connector.errors import CrmApprovalsError, FatalError, RetriableError
from connector.metrics import OUTBOX_UPDATES, count_outcomes
from connector.storage import audit, batch_writes, dead_letters
from connector.storage.db import in_ids, transaction
from connector.storage.inbox import backoff_seconds
from connector.storage.models import DEAD, DONE, PENDING, SENDING, DeadLetter, OutboxUpdate

log = logging.getLogger(__name__)

RecordKey = tuple[str, str, str]  # connection, object type, record id
_OUTBOX = cast(Table, OutboxUpdate.__table__)
AdapterLookup = Callable[[str], CRMAdapter]


def enqueue_update(
    session: Session,
    connection: str,
    object_type: str,
    record_id: str,
    fields: dict[str, Any],
    *,
    reason: str | None = None,
    idempotency_key: str | None = None,
    later: bool = False,
) -> OutboxUpdate | None:
    """Record a field update in the caller's transaction. With an idempotency key already
    used, nothing is added and None is returned. `later`: while a batch buffers its new
    requests' rows (connector/storage/batch_writes.py), the row joins them and None is
    returned; it takes its record's lock and skips a used key when they are written."""
    values = {
        "connection": connection,
        "object_type": object_type,
        "record_id": record_id,
        "fields": fields,
        "reason": reason,
        "idempotency_key": idempotency_key,
        "status": PENDING,
        "attempts": 0,
        "created_at": utcnow(),
    }
    if later and batch_writes.of(session) is not None:
        batch_writes.add_outbox(session, values)
        return None
    lock_record(session, (connection, object_type, record_id))
    if idempotency_key is not None:
        existing = session.scalar(
            select(OutboxUpdate.id).where(OutboxUpdate.idempotency_key == idempotency_key)
        )
        if existing is not None:
            return None
    row = OutboxUpdate(**values)
    session.add(row)
    session.flush()
    return row


def lock_record(session: Session, key: RecordKey) -> None:
    """Serialise the transactions that add outbox rows for one record until they end, so
    the rows' ids follow the order of their commits (drift repair relies on it). SQLite's
    writer lock already serialises every writer; PostgreSQL takes an advisory lock."""
    if session.get_bind().dialect.name != "postgresql":
        return
    session.execute(text("SELECT pg_advisory_xact_lock(:lock_id)"), {"lock_id": _lock_id(key)})


def lock_records(session: Session, keys: Iterable[RecordKey]) -> None:
    """`lock_record` for many records in one statement, in lock-id order (two bulk writers
    cannot deadlock); for writers of thousands of outbox rows (set-based expiry)."""
    if session.get_bind().dialect.name != "postgresql":
        return
    ids = sorted({_lock_id(key) for key in keys})
    if ids:
        session.execute(
            text(
                "SELECT count(pg_advisory_xact_lock(k)) "
                "FROM (SELECT unnest(CAST(:ids AS bigint[])) AS k ORDER BY k) AS locks"
            ),
            {"ids": ids},
        )


def _lock_id(key: RecordKey) -> int:
    digest = hashlib.sha256("\x1f".join(key).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@dataclass
class FlushReport:
    sent_records: int = 0
    done: int = 0
    retried: int = 0
    dead: int = 0
    confirmed_by_read_back: int = 0
    in_doubt: int = 0  # calls that timed out: read back on the next flush


@dataclass
class _Claimed:
    key: RecordKey
    row_ids: list[int]
    fields: dict[str, Any]


def flush(
    sessions: sessionmaker[Session],
    adapters: AdapterLookup,
    *,
    limit: int = 2000,
    lease_seconds: int = 120,
    max_attempts: int = 10,
    now: datetime | None = None,
    full_batches_only: bool = False,
) -> FlushReport:
    """Recover in-doubt batches, then send due pending updates, one CRM call at a time.

    Each call claims only the rows it sends (at most the CRM's batch limit), so a worker
    that dies mid-flush leaves one call in doubt; everything it had not reached stays
    pending for the next flush. Each row is tried at most once per flush. Safe to run
    concurrently. `full_batches_only`: stop at the first call that would carry fewer records
    than the CRM's batch limit (a burst still being judged: its remainder waits for the end)."""
    now = now or utcnow()
    report = FlushReport()
    recover_in_doubt(sessions, adapters, report, now=now, max_attempts=max_attempts)
    # Each row is tried at most once per flush. Only the rows of this flush's calls that could
    # be due again are kept (retried ones, and in-doubt ones a recovery may set pending): a row
    # done or dead is never pending again, so the look-ups need not carry it (they carried
    # every row sent, thousands of ids per statement by the end of a burst's flush).
    tried: set[int] = set()
    while report.sent_records < limit:
        target = _next_target(sessions, now, tried)
        if target is None:
            break
        adapter = adapters(target[0])  # before claiming: a configuration error leaves the rows pending
        room = min(adapter.batch_limit, limit - report.sent_records)
        minimum = room if full_batches_only else 1
        batch_id, claimed = _claim(sessions, target, room, lease_seconds, now, tried, minimum)
        if not claimed:
            break  # another worker claimed them between the two looks: it is flushing too
        before = replace(report)
        tried.update(_send(sessions, adapter, target[1], claimed, batch_id, report, max_attempts))
        report.sent_records += len(claimed)
        counts = {name: getattr(report, name) - getattr(before, name) for name in ("done", "retried", "dead")}
        count_outcomes(OUTBOX_UPDATES, counts, connection=target[0])
    return report


def _due(now: datetime, tried: set[int], *columns: Any) -> Select[Any]:
    """Pending rows that are due and not yet tried in this flush, oldest first (`columns`
    of them: plain rows, no ORM objects to build and track)."""
    query = (
        select(*columns)
        .where(OutboxUpdate.status == PENDING)
        .where(or_(OutboxUpdate.next_attempt_at.is_(None), OutboxUpdate.next_attempt_at <= now))
        .order_by(OutboxUpdate.id)
    )
    return query.where(OutboxUpdate.id.not_in(tried)) if tried else query


def _held(session: Session, now: datetime, target: tuple[str, str] | None = None) -> set[RecordKey]:
    """Records that must wait: a batch of theirs is in flight, or an older row of theirs waits
    out its backoff. Either way a newer write sent now could be overtaken by the older one."""
    query = select(OutboxUpdate.connection, OutboxUpdate.object_type, OutboxUpdate.record_id).where(
        or_(
            OutboxUpdate.status == SENDING,
            (OutboxUpdate.status == PENDING) & (OutboxUpdate.next_attempt_at > now),
        )
    )
    if target is not None:
        query = query.where(OutboxUpdate.connection == target[0], OutboxUpdate.object_type == target[1])
    return {(r.connection, r.object_type, r.record_id) for r in session.execute(query)}


def _next_target(sessions: sessionmaker[Session], now: datetime, tried: set[int]) -> tuple[str, str] | None:
    """The (connection, object type) of the oldest due row whose record is not held."""
    with sessions() as session:
        held = _held(session, now)
        keys = _due(now, tried, OutboxUpdate.connection, OutboxUpdate.object_type, OutboxUpdate.record_id)
        for row in session.execute(keys.execution_options(yield_per=200)):
            if (row.connection, row.object_type, row.record_id) not in held:
                return row.connection, row.object_type
    return None


def _claim(
    sessions: sessionmaker[Session],
    target: tuple[str, str],
    max_records: int,
    lease_seconds: int,
    now: datetime,
    tried: set[int],
    min_records: int = 1,
) -> tuple[str, list[_Claimed]]:
    """Mark the rows of at most `max_records` records of one target `sending` and commit,
    before anything is sent; none when fewer than `min_records` records are due."""
    batch_id = uuid.uuid4().hex
    with transaction(sessions) as session:
        # A record with a batch in flight, or an older row waiting out its backoff, waits:
        # sending a newer row first would let the older one land over it later.
        held = [key[2] for key in _held(session, now, target)]
        query = _due(
            now, tried, OutboxUpdate.id, OutboxUpdate.connection, OutboxUpdate.object_type,
            OutboxUpdate.record_id, OutboxUpdate.fields,
        ).where(OutboxUpdate.connection == target[0], OutboxUpdate.object_type == target[1])  # fmt: skip
        if held:
            query = query.where(OutboxUpdate.record_id.not_in(held))
        # Several rows of one record merge into one update: look at more rows than records.
        # Plain rows and one UPDATE for the call (every claimed row gets the same values), not
        # an ORM object and a flushed UPDATE per row: the claim holds SQLite's writer lock.
        rows = session.execute(query.limit(max_records * 5).with_for_update(skip_locked=True)).all()
        merged: dict[RecordKey, _Claimed] = {}
        for row in rows:
            key = (row.connection, row.object_type, row.record_id)
            if key not in merged and len(merged) >= max_records:
                continue  # this call is full; the next one takes it
            item = merged.setdefault(key, _Claimed(key, [], {}))
            item.row_ids.append(row.id)
            item.fields.update(row.fields)  # rows come oldest first: later values win
        if len(merged) < min_records:
            return batch_id, []
        ids = [row_id for item in merged.values() for row_id in item.row_ids]
        if ids:  # locked above (FOR UPDATE on PostgreSQL, the writer lock on SQLite)
            table = _OUTBOX
            session.execute(
                update(table)
                .where(in_ids(table.c.id, session.get_bind().dialect.name, ids))
                .values(
                    status=SENDING,
                    batch_id=batch_id,
                    sent_at=now,
                    lease_expires_at=now + timedelta(seconds=lease_seconds),
                )
            )
    return batch_id, list(merged.values())


def _send(
    sessions: sessionmaker[Session],
    adapter: CRMAdapter,
    object_type: str,
    items: list[_Claimed],
    batch_id: str,
    report: FlushReport,
    max_attempts: int,
) -> list[int]:
    """Send one claimed call and record its results; returns the ids of its rows that may be
    pending again (not done or dead)."""
    updates = [RecordUpdate(item.key[2], item.fields) for item in items]
    try:
        results = adapter.update_records(object_type, updates)
    except InDoubtError as exc:
        # The CRM may have applied the call, or may still: read back before anything is resent.
        with transaction(sessions) as session:
            for item in items:
                _leave_in_doubt(session, item, batch_id, exc)
        report.in_doubt += len(items)
        return [row_id for item in items for row_id in item.row_ids]
    except (RetriableError, AuthError) as exc:
        # The whole call failed before the CRM applied anything: everything goes back.
        results = [_failed(u.record_id, exc, retriable=True) for u in updates]
    except FatalError as exc:
        results = [_failed(u.record_id, exc, retriable=False) for u in updates]
    with transaction(sessions) as session:
        dialect = session.get_bind().dialect.name
        # The records the CRM took: their rows are marked done by one UPDATE at the end (not
        # loaded as ORM objects and flushed one UPDATE each). The failed ones' rows are read
        # in one select (not one per record); their changes go out at the commit.
        done_ids = [row_id for item, r in zip(items, results, strict=True) if r.ok for row_id in item.row_ids]
        failed_ids = [
            row_id for item, r in zip(items, results, strict=True) if not r.ok for row_id in item.row_ids
        ]
        loaded = (
            {
                row.id: row
                for row in session.scalars(
                    select(OutboxUpdate).where(in_ids(OutboxUpdate.id, dialect, failed_ids))
                )
            }
            if failed_ids
            else {}
        )
        for item, result in zip(items, results, strict=True):
            if result.ok:
                _audit_result(session, item, result, "ok")
                report.done += 1
                continue
            rows = [loaded[row_id] for row_id in item.row_ids if row_id in loaded]
            outcome = _settle(
                session, item, rows, result, batch_id, max_attempts, getattr(result, "retry_after", None)
            )
            setattr(report, outcome, getattr(report, outcome) + 1)
        again = [row.id for row in loaded.values() if row.status not in (DONE, DEAD)]
        if done_ids:
            # only rows still in this call (a recovery may have settled some): those it did
            # not reach may be pending again, so this flush does not take them up once more
            marked = set(session.scalars(_mark_sent(dialect, done_ids, batch_id, utcnow())))
            again += [row_id for row_id in done_ids if row_id not in marked]
        return again


def _mark_sent(dialect: str, ids: list[int], batch_id: str, now: datetime) -> Any:
    """UPDATE the rows of a call's records that the CRM took to done (those still `sending`
    in the call `batch_id`), RETURNING their ids; the ids as one array on PostgreSQL."""
    table = _OUTBOX
    return (
        update(table)
        .where(in_ids(table.c.id, dialect, ids))
        .where(table.c.status == SENDING, table.c.batch_id == batch_id)
        .values(status=DONE, done_at=now, lease_expires_at=None, last_error=None)
        .returning(table.c.id)
    )


@dataclass(frozen=True)
class _FailedResult(UpdateResult):
    retry_after: float | None = None


def _failed(record_id: str, exc: CrmApprovalsError, *, retriable: bool) -> UpdateResult:
    return _FailedResult(
        record_id=record_id,
        ok=False,
        error_code=exc.code,
        message=str(exc),
        fields=exc.fields if isinstance(exc, CRMError) else (),
        retriable=retriable,
        retry_after=exc.retry_after if isinstance(exc, RetriableError) else None,
    )


def _settle(
    session: Session,
    item: _Claimed,
    rows: Sequence[OutboxUpdate],
    result: UpdateResult,
    batch_id: str,
    max_attempts: int,
    retry_after: float | None,
) -> str:
    """Record one record's result on its rows (`rows`: those of `item`, read in the caller's
    transaction)."""
    now = utcnow()
    live = [
        r for r in rows if r.status == SENDING and r.batch_id == batch_id
    ]  # a recovery may have settled them
    if result.ok:
        _audit_result(session, item, result, "ok")
        for row in live:
            row.status, row.done_at, row.lease_expires_at, row.last_error = DONE, now, None, None
        return "done"
    message = f"{result.error_code}: {result.message}" if result.error_code else (result.message or "failed")
    _audit_result(session, item, result, message)
    outcome = "retried"
    for row in live:
        row.attempts += 1
        row.last_error, row.lease_expires_at = message[:2000], None
        if result.retriable and row.attempts < max_attempts:
            row.status = PENDING
            row.next_attempt_at = now + timedelta(seconds=retry_after or backoff_seconds(row.attempts))
        else:
            row.status, outcome = DEAD, "dead"
            dead_letters.add(session, _dead_letter(row, result))
    return outcome


def _leave_in_doubt(session: Session, item: _Claimed, batch_id: str, exc: InDoubtError) -> None:
    """Keep the rows `sending` (so no newer write to the record is claimed) with their lease
    ended, so the next flush reads the record back (`recover_in_doubt`)."""
    now = utcnow()
    for row in session.scalars(select(OutboxUpdate).where(OutboxUpdate.id.in_(item.row_ids))):
        if row.status == SENDING and row.batch_id == batch_id:
            row.attempts += 1
            row.lease_expires_at = now
            row.last_error = f"in doubt: {exc}"[:2000]
    connection, object_type, record_id = item.key
    audit.record(
        session,
        "writeback_in_doubt",
        connection=connection,
        object_type=object_type,
        record_id=record_id,
        fields=item.fields,
        message=str(exc),
        outbox_ids=item.row_ids,
    )


def _audit_result(session: Session, item: _Claimed, result: UpdateResult, message: str) -> None:
    connection, object_type, record_id = item.key
    audit.record(
        session,
        "writeback_result",
        connection=connection,
        object_type=object_type,
        record_id=record_id,
        ok=result.ok,
        fields=item.fields,
        message=message,
        retriable=result.retriable,
        outbox_ids=item.row_ids,
    )


def _dead_letter(row: OutboxUpdate, result: UpdateResult) -> DeadLetter:
    return DeadLetter(
        kind="outbox",
        ref_id=row.id,
        connection=row.connection,
        object_type=row.object_type,
        record_id=row.record_id,
        payload={"fields": row.fields, "reason": row.reason},
        error_code=result.error_code,
        error_message=result.message or "the CRM rejected the update",
        error_fields=list(result.fields),
    )


def recover_in_doubt(
    sessions: sessionmaker[Session],
    adapters: AdapterLookup,
    report: FlushReport,
    *,
    now: datetime,
    max_attempts: int = 10,
) -> None:
    """Settle in-doubt batches (their worker died, or the call timed out): read the records
    back, then done where the CRM holds the values, else pending again (or dead after
    `max_attempts` calls that all ended in doubt)."""
    with sessions() as session:
        stale = session.scalars(
            select(OutboxUpdate)
            .where(OutboxUpdate.status == SENDING)
            .where(OutboxUpdate.lease_expires_at < now)
            .order_by(OutboxUpdate.id)
        ).all()
    groups: dict[RecordKey, list[OutboxUpdate]] = defaultdict(list)
    for row in stale:
        groups[(row.connection, row.object_type, row.record_id)].append(row)
    by_target: dict[tuple[str, str], list[RecordKey]] = defaultdict(list)
    for key in groups:
        by_target[key[:2]].append(key)
    for (connection, object_type), keys in by_target.items():
        wanted = {k: _merged_fields(groups[k]) for k in keys}
        field_names = sorted({name for fields in wanted.values() for name in fields})
        try:
            current = adapters(connection).get_records(object_type, [k[2] for k in keys], field_names)
        except CrmApprovalsError as exc:
            log.warning(
                "read-back for in-doubt %s/%s updates failed, will retry: %s", connection, object_type, exc
            )
            continue
        with transaction(sessions) as session:
            for key in keys:
                landed = same_values(wanted[key], current.get(key[2]) or {})
                for stale_row in groups[key]:
                    current_row = session.get(OutboxUpdate, stale_row.id)
                    if (
                        current_row is None
                        or current_row.status != SENDING
                        or current_row.batch_id != stale_row.batch_id
                    ):
                        continue
                    row = current_row
                    row.lease_expires_at = None
                    if landed:
                        row.status, row.done_at, row.last_error = DONE, utcnow(), None
                        report.confirmed_by_read_back += 1
                        OUTBOX_UPDATES.labels(connection, "confirmed").inc()
                    elif row.attempts >= max_attempts:
                        row.status = DEAD
                        report.dead += 1
                        dead_letters.add(session, _dead_letter(row, _in_doubt_result(row)))
                    else:  # again at once after a worker died, with backoff after a time-out
                        row.status = PENDING
                        row.next_attempt_at = (
                            now + timedelta(seconds=backoff_seconds(row.attempts)) if row.attempts else None
                        )


def _in_doubt_result(row: OutboxUpdate) -> UpdateResult:
    message = f"no answer from the CRM in {row.attempts} attempts, and the values never landed"
    return UpdateResult(row.record_id, False, "in_doubt", f"{message}; last: {row.last_error}")


def _merged_fields(rows: Sequence[OutboxUpdate]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for row in sorted(rows, key=lambda r: r.id):
        merged.update(row.fields)
    return merged


def same_values(wanted: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether the CRM already holds what we meant to write (loose on number and blank forms)."""
    lowered = {k.lower(): v for k, v in current.items()}
    return all(norm_value(value) == norm_value(lowered.get(name.lower())) for name, value in wanted.items())


def norm_value(value: Any) -> Any:
    """A comparable form of a CRM value: blank is None, numbers by value, booleans as text,
    date-times by instant (we send `...+00:00`, Salesforce answers `....000+0000`)."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float | Decimal):
        return Decimal(str(value)).normalize()
    text = str(value)
    try:
        return Decimal(text).normalize()
    except InvalidOperation:
        pass
    if text.lower() in ("true", "false"):
        return text.lower()
    if len(text) > 10 and text[10:11] == "T":
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            return text
        return moment.astimezone(UTC) if moment.tzinfo is not None else moment
    return text
