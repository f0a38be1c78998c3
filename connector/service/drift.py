"""Drift repair: put back the values we last wrote when the CRM no longer holds them.

A write-back that timed out is in doubt (docs/outbox.md): the outbox reads it back before
resending, but the CRM may still apply the timed-out call minutes later, on top of a newer
write. For every record we wrote in the last `window`, `repair_drift` compares the fields
we own (our last intended values) with the CRM's current values and re-queues the
difference through the outbox, with an audit entry. The worker's sweep runs it every
DRIFT_REPAIR_INTERVAL_MINUTES (`DriftRepairJob`); a `sync reconcile` command can share it.

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
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from connector.clock import utcnow
from connector.config import Settings
from connector.crm.errors import CRMError
from connector.runtime import Runtime
from connector.storage import audit
from connector.storage.db import transaction
from connector.storage.models import DEAD, DONE, OutboxUpdate
from connector.storage.outbox import AdapterLookup, RecordKey, enqueue_update, lock_record, norm_value

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
    intents = _intended_values(sessions, since)
    by_target: dict[tuple[str, str], list[RecordKey]] = defaultdict(list)
    for key in intents:
        by_target[key[:2]].append(key)
    drifts: list[Drift] = []
    for (connection, object_type), keys in by_target.items():
        names = sorted({name for key in keys for name in intents[key].fields})
        try:
            current = adapters(connection).get_records(object_type, [key[2] for key in keys], names)
        except CRMError as exc:
            log.warning(
                "drift repair: reading %s/%s failed, next run tries again: %s", connection, object_type, exc
            )
            continue
        for key in keys:
            values = current.get(key[2])
            if values is None:
                log.info("drift repair: %s/%s %s is gone from the CRM; nothing to repair", *key)
                continue
            intended, found = _differences(intents[key].fields, values)
            if intended:
                queued = not dry_run and _requeue(sessions, key, intents[key], intended, found)
                drifts.append(Drift(*key, intended=intended, found=found, queued=queued))
    return drifts


def _intended_values(sessions: sessionmaker[Session], since: datetime) -> dict[RecordKey, _Intent]:
    with sessions() as session:
        first_ids = session.execute(
            select(OutboxUpdate.connection, OutboxUpdate.object_type, OutboxUpdate.record_id, OutboxUpdate.id)
            .where(OutboxUpdate.status == DONE, OutboxUpdate.done_at >= since)
            .order_by(OutboxUpdate.id)
        ).all()
        first: dict[RecordKey, int] = {}
        for connection, object_type, record_id, row_id in first_ids:
            first.setdefault((connection, object_type, record_id), row_id)
        intents: dict[RecordKey, _Intent] = {}
        for key, first_id in first.items():
            rows = session.scalars(
                select(OutboxUpdate)
                .where(OutboxUpdate.connection == key[0], OutboxUpdate.object_type == key[1])
                .where(OutboxUpdate.record_id == key[2], OutboxUpdate.id >= first_id)
                .order_by(OutboxUpdate.id)
            ).all()
            intent = _intent_of(rows)
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
