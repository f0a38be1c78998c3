"""Drift repair: put back the values we last wrote when the CRM no longer holds them.

A write-back that timed out is in doubt (docs/outbox.md): the outbox reads it back before
resending, but the CRM may still apply the timed-out call minutes later, on top of a newer
write. For every record we wrote in the last `window`, `repair_drift` compares the fields
we own (our last intended values) with the CRM's current values and re-queues the
difference through the outbox, with an audit entry. The worker's sweep runs it every
DRIFT_REPAIR_INTERVAL_MINUTES (`DriftRepairJob`); `crm-approvals sync reconcile` runs the
same comparison (`Reconcile`) over every record we wrote to, paged and resumable.

"Our last intended value" of a field is the value of the newest outbox row that set it,
among the record's rows from its first write inside the window on. A record with a row
still pending or in flight is skipped (the outbox is still on it), and so is a field whose
newest row was dead-lettered (the CRM refused it: a person must look).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from connector.clock import utcnow
from connector.config import Settings
from connector.crm.base import CRMAdapter
from connector.crm.errors import CRMError, FatalError
from connector.runtime import Runtime
from connector.storage import audit, sync_state
from connector.storage.db import transaction
from connector.storage.models import DEAD, DONE, OutboxUpdate
from connector.storage.outbox import AdapterLookup, RecordKey, enqueue_update, lock_record, norm_value
from connector.storage.sync_state import Checkpoint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Drift:
    """A record whose CRM values differ from what we last meant them to be."""

    connection: str
    object_type: str
    record_id: str
    intended: dict[str, Any]  # our last intended values of the fields that differ (API names)
    found: dict[str, Any]  # what the CRM holds in those fields
    queued: bool  # re-queued through the outbox (False on a dry run, or a newer write came first)


@dataclass(frozen=True)
class _Intent:
    fields: dict[str, Any]
    last_row_id: int  # the newest row considered: a newer one makes the comparison stale


def repair_drift(
    sessions: sessionmaker[Session],
    adapters: AdapterLookup,
    *,
    window: timedelta,
    dry_run: bool = False,
    now: datetime | None = None,
) -> list[Drift]:
    """Compare, and re-queue the differences (unless `dry_run`); returns every difference."""
    since = (now or utcnow()) - window
    with sessions() as session:
        first_ids = session.execute(
            select(OutboxUpdate.connection, OutboxUpdate.object_type, OutboxUpdate.record_id, OutboxUpdate.id)
            .where(OutboxUpdate.status == DONE, OutboxUpdate.done_at >= since)
            .order_by(OutboxUpdate.id)
        ).all()
        first: dict[RecordKey, int] = {}
        for connection, object_type, record_id, row_id in first_ids:
            first.setdefault((connection, object_type, record_id), row_id)
        intents = _intents_from(session, first)
    by_target: dict[tuple[str, str], dict[RecordKey, _Intent]] = defaultdict(dict)
    for key, intent in intents.items():
        by_target[key[:2]][key] = intent
    drifts: list[Drift] = []
    for (connection, object_type), target in by_target.items():
        try:
            drifts.extend(_compare(sessions, adapters(connection), target, dry_run=dry_run))
        except CRMError as exc:
            log.warning(
                "drift repair: reading %s/%s failed, next run tries again: %s", connection, object_type, exc
            )
    return drifts


def reconcile_records(
    sessions: sessionmaker[Session],
    adapter: CRMAdapter,
    connection: str,
    object_type: str,
    record_ids: Sequence[str],
    *,
    since: datetime | None,
    dry_run: bool = False,
) -> list[Drift]:
    """`sync reconcile`'s step: compare the given records (one `get_records` call when they fit
    the adapter's read batch) and re-queue the differences unless `dry_run`. Our intended
    values come from the record's outbox rows from its first write since `since` on (None:
    every row); a CRMError is raised for the caller to stop and resume later."""
    with sessions() as session:
        query = (
            select(OutboxUpdate.record_id, func.min(OutboxUpdate.id))
            .where(OutboxUpdate.connection == connection, OutboxUpdate.object_type == object_type)
            .where(OutboxUpdate.record_id.in_(list(record_ids)))
            .group_by(OutboxUpdate.record_id)
        )
        if since is not None:
            query = query.where(OutboxUpdate.status == DONE, OutboxUpdate.done_at >= since)
        first = {(connection, object_type, rid): first_id for rid, first_id in session.execute(query)}
        intents = _intents_from(session, first)
    return _compare(sessions, adapter, intents, dry_run=dry_run) if intents else []


def reconciled_record_ids(
    session: Session,
    connection: str,
    object_type: str,
    *,
    since: datetime | None,
    after: str | None = None,
    limit: int | None = None,
) -> list[str]:
    """The records whose approval fields we own (every record we wrote to; with `since`, those
    written since then), in id order after `after`: the pages `sync reconcile` walks."""
    query = (
        select(OutboxUpdate.record_id)
        .where(OutboxUpdate.connection == connection, OutboxUpdate.object_type == object_type)
        .distinct()
        .order_by(OutboxUpdate.record_id)
    )
    if since is not None:
        query = query.where(OutboxUpdate.status == DONE, OutboxUpdate.done_at >= since)
    if after is not None:
        query = query.where(OutboxUpdate.record_id > after)
    if limit is not None:
        query = query.limit(limit)
    return list(session.scalars(query))


def reconciled_object_types(session: Session, connection: str) -> list[str]:
    """The objects of `connection` we have written approval fields to."""
    query = select(OutboxUpdate.object_type).where(OutboxUpdate.connection == connection).distinct()
    return sorted(session.scalars(query))


def _compare(
    sessions: sessionmaker[Session], adapter: CRMAdapter, intents: dict[RecordKey, _Intent], *, dry_run: bool
) -> list[Drift]:
    """Read the records of one connection and object, compare, re-queue what differs."""
    (connection, object_type, _), *_ = intents
    names = sorted({name for intent in intents.values() for name in intent.fields})
    current = adapter.get_records(object_type, [key[2] for key in intents], names)
    drifts: list[Drift] = []
    for key, intent in intents.items():
        values = current.get(key[2])
        if values is None:
            log.info("drift repair: %s/%s %s is gone from the CRM; nothing to repair", *key)
            continue
        intended, found = _differences(intent.fields, values)
        if intended:
            queued = not dry_run and _requeue(sessions, key, intent, intended, found)
            drifts.append(Drift(*key, intended=intended, found=found, queued=queued))
    return drifts


def _intents_from(session: Session, first: dict[RecordKey, int]) -> dict[RecordKey, _Intent]:
    """Each record's intent from its rows with id >= the given first row id."""
    intents: dict[RecordKey, _Intent] = {}
    for key, first_id in first.items():
        rows = session.scalars(
            select(OutboxUpdate)
            .where(OutboxUpdate.connection == key[0], OutboxUpdate.object_type == key[1])
            .where(OutboxUpdate.record_id == key[2], OutboxUpdate.id >= first_id)
            .order_by(OutboxUpdate.id)
        ).all()
        intent = _intent_of(list(rows))
        if intent is not None:
            intents[key] = intent
    return intents


def _intent_of(rows: Sequence[OutboxUpdate]) -> _Intent | None:
    """Newest value per field; None while a row is pending or in flight."""
    if any(row.status not in (DONE, DEAD) for row in rows):
        return None
    newest: dict[str, tuple[Any, str]] = {}
    for row in rows:  # oldest first: later rows win
        for name, value in row.fields.items():
            newest[name] = (value, row.status)
    fields = {name: value for name, (value, status) in newest.items() if status == DONE}
    return _Intent(fields, rows[-1].id) if fields else None


def _differences(intended: dict[str, Any], current: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(our values, the CRM's values) of the fields that differ; names compared without case."""
    lowered = {name.lower(): value for name, value in current.items()}
    differing = [
        name for name, value in intended.items() if norm_value(value) != norm_value(lowered.get(name.lower()))
    ]
    return {n: intended[n] for n in differing}, {n: lowered.get(n.lower()) for n in differing}


def _requeue(
    sessions: sessionmaker[Session],
    key: RecordKey,
    intent: _Intent,
    intended: dict[str, Any],
    found: dict[str, Any],
) -> bool:
    """Queue our values again, unless a newer write to the record came in since we looked."""
    connection, object_type, record_id = key
    with transaction(sessions) as session:
        lock_record(session, key)  # a concurrent vote's row commits before or after ours, not around it
        newest = session.scalar(
            select(OutboxUpdate.id)
            .where(OutboxUpdate.connection == connection, OutboxUpdate.object_type == object_type)
            .where(OutboxUpdate.record_id == record_id)
            .order_by(OutboxUpdate.id.desc())
            .limit(1)
        )
        if newest != intent.last_row_id:
            return False  # the outbox has newer intent for this record: the next run compares again
        enqueue_update(
            session,
            connection,
            object_type,
            record_id,
            intended,
            reason="drift repair: the CRM held other values",
        )
        audit.record(
            session,
            "drift_repaired",
            connection=connection,
            object_type=object_type,
            record_id=record_id,
            fields=intended,
            found=found,
        )
    return True


RECONCILE_JOB = "reconcile"  # its rows in sync_checkpoints


class ReconcileRefused(FatalError):
    """An unfinished run was started with other options: continuing it would mix selections."""


@dataclass
class ReconcileResult:
    connection: str
    object_type: str
    checkpoint: Checkpoint | None  # None for a dry run
    resumed: bool = False
    compared: int = 0  # records compared by this invocation
    drifts: list[Drift] = field(default_factory=list)
    finished: bool = False


class Reconcile:
    """`sync reconcile` over one connection and object: the records whose approval fields we
    own, `adapter.read_batch_limit` per page (one `get_records` call each), the position saved
    in sync_checkpoints after every page so that a rerun after Ctrl-C or a crash continues
    there. Doing a page twice (a crash before its position was saved) repeats nothing: a
    repaired record has a newer outbox row, so it is skipped or matches."""

    def __init__(
        self,
        runtime: Runtime,
        connection: str,
        object_type: str,
        *,
        since: datetime | None = None,
        on_page: Callable[[Sequence[str], list[Drift]], None] | None = None,
    ) -> None:
        self.runtime = runtime
        self.connection = connection
        self.object_type = object_type
        self.since = since
        self.on_page = on_page

    @property
    def options(self) -> dict[str, Any]:
        return {"since": self.since.isoformat() if self.since else None}

    def total(self, after: str | None = None) -> int:
        with self.runtime.sessions() as session:
            return len(self._ids(session, after, None))

    def saved(self) -> Checkpoint | None:
        with self.runtime.sessions() as session:
            return sync_state.load_checkpoint(session, RECONCILE_JOB, self.connection, self.object_type)

    def run(self, *, dry_run: bool = False, restart: bool = False) -> ReconcileResult:
        checkpoint = None if dry_run else self._checkpoint(restart)
        result = ReconcileResult(
            self.connection, self.object_type, checkpoint, resumed=bool(checkpoint and checkpoint.resumed)
        )
        adapter = self.runtime.adapter(self.connection)
        after = checkpoint.cursor if checkpoint else None
        while True:
            with self.runtime.sessions() as session:
                ids = self._ids(session, after, adapter.read_batch_limit)
            if not ids:
                break
            drifts = reconcile_records(
                self.runtime.sessions,
                adapter,
                self.connection,
                self.object_type,
                ids,
                since=self.since,
                dry_run=dry_run,
            )
            after = ids[-1]
            result.compared += len(ids)
            result.drifts.extend(drifts)
            if checkpoint is not None:
                checkpoint.cursor = after
                checkpoint.records_done += len(ids)
                checkpoint.count("drifted", len(drifts))
                checkpoint.count("requeued", sum(d.queued for d in drifts))
                self._save(checkpoint)
            if self.on_page is not None:
                self.on_page(ids, drifts)
        if checkpoint is not None:
            checkpoint.finished_at = utcnow()
            self._save(checkpoint)
        result.finished = True
        return result

    def _ids(self, session: Session, after: str | None, limit: int | None) -> list[str]:
        return reconciled_record_ids(
            session, self.connection, self.object_type, since=self.since, after=after, limit=limit
        )

    def _checkpoint(self, restart: bool) -> Checkpoint:
        saved = self.saved()
        fresh = sync_state.new_checkpoint(RECONCILE_JOB, self.connection, self.object_type, self.options)
        if saved is None or restart or saved.finished_at is not None:
            return fresh  # a finished run is not repeated: a new one compares again
        if saved.options != self.options:
            raise ReconcileRefused(
                f"an unfinished reconcile of {self.connection}/{self.object_type} was started "
                f"{saved.started_at:%Y-%m-%d %H:%M} UTC with since={saved.options.get('since')}; "
                "repeat its options to continue it, or add --restart to start over"
            )
        return saved

    def _save(self, checkpoint: Checkpoint) -> None:
        with transaction(self.runtime.sessions) as session:
            sync_state.save_checkpoint(session, checkpoint)


class DriftRepairJob:
    """The sweep's drift repair: at most every `interval`, over records written in `window`."""

    def __init__(
        self, window: timedelta, interval: timedelta, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.window = window
        self.interval = interval
        self._clock = clock
        self._last_run: float | None = None

    def __call__(self, runtime: Runtime) -> dict[str, int] | None:
        if self.window <= timedelta(0):
            return None  # DRIFT_REPAIR_WINDOW_HOURS=0 turns it off
        started = self._clock()
        if self._last_run is not None and started - self._last_run < self.interval.total_seconds():
            return None
        self._last_run = started
        drifts = repair_drift(runtime.sessions, runtime.adapter, window=self.window)
        return {"drifted": len(drifts), "requeued": sum(d.queued for d in drifts)}

    @classmethod
    def from_settings(cls, settings: Settings) -> DriftRepairJob:
        return cls(
            timedelta(hours=settings.drift_repair_window_hours),
            timedelta(minutes=settings.drift_repair_interval_minutes),
        )
