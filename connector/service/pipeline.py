"""What the worker does with one inbox event (the EventProcessor):

prepare (outside any transaction, may call the CRM):
    find the mapping files for the record's connection and object, fetch the fields they
    need that the webhook did not carry (all of them when the delivery was not signed over its
    content), and ask the adapter whether the change is our own
apply (inside the event's transaction):
    remember the record's values (for changed/changed_from/changed_to), drop echoes of our
    own write-back, evaluate the rules and open, restart or leave approval requests.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from connector.approvals.spec import EvalContext, MappingSpec
from connector.clock import utcnow
from connector.directory import Directory
from connector.directory.service import remember_lookups
from connector.errors import FatalError
from connector.events import BACKFILL, RecordChangeEvent
from connector.logs import log_event
from connector.notify.queue import NotificationQueue
from connector.rules import MappingSet
from connector.runtime import Runtime
from connector.service import dependencies, service_steps
from connector.service.approval_service import ApprovalService
from connector.service.delegation import RoutingSource
from connector.storage import approval_store as store
from connector.storage import audit, batch_writes
from connector.storage.approval_store import RecordKey
from connector.storage.db import in_keys
from connector.storage.models import DONE, SENDING, OutboxUpdate, RecordSnapshot
from connector.storage.outbox import norm_value

log = logging.getLogger(__name__)
ECHO_WINDOW = timedelta(hours=24)  # how long a write-back of ours may take to come back as a webhook


@dataclass(frozen=True)
class Prepared:
    specs: tuple[MappingSpec, ...]
    values: dict[str, Any] | None  # API name -> value; None when the record is gone
    own_change: bool | None  # the adapter's verdict; None = the CRM cannot tell
    modified_by: str | None = None  # who made the change (CRM user id); None = unknown
    # issue 12: related records (`requires:`) read through the adapter: (object, id) -> values
    related: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)


class Pipeline:
    def __init__(self, runtime: Runtime, mappings: MappingSet) -> None:
        self.runtime = runtime
        self.mappings = mappings
        self.approvals = ApprovalService(
            mappings,
            people=Directory.from_runtime(runtime),
            notifications=NotificationQueue(runtime.settings),
            public_base_url=runtime.settings.public_base_url,
            admins=frozenset(runtime.settings.admin_users),
            routing=RoutingSource(runtime.sessions),  # issue 11: org chart, queues, deputies
        )
        # issue 12: requests that wait for a related approval, and the steps the service runs
        self.approvals.gate = dependencies.Gate(mappings, build_context, self.approvals)
        self.approvals.after_save.append(self.approvals.gate.release)
        self.approvals.after_save.append(service_steps.queue_jobs)

    def refresh_mappings(self, min_interval: float = 2.0) -> None:
        refresh_mappings(self.mappings, min_interval)

    def read_unit(self) -> int:
        """Events per full CRM read: the least common multiple of the read batch limits of the
        connections the mappings use (HubSpot 100, Salesforce 200, both 200). The inbox claims
        in multiples of it while a burst arrives (connector/storage/inbox_batch.py)."""
        limits = []
        for name in sorted({spec.connection for spec in self.mappings.mappings}):
            try:
                limits.append(self.runtime.adapter(name).read_batch_limit)
            except Exception:  # an unusable connection fails its own events, not the others'
                continue
        return math.lcm(*limits) if limits else 1

    def prepare(self, event: RecordChangeEvent) -> Prepared:
        [prepared] = self.prepare_batch([event])
        if isinstance(prepared, BaseException):
            raise prepared
        return prepared

    def prepare_batch(self, events: Sequence[RecordChangeEvent]) -> list[Prepared | Exception]:
        """Prepare a batch: every record it needs is read in one call per CRM batch limit
        (records of one connection and object asking for the same fields share calls).
        Returns, per event in order, its Prepared or the error that kept it from one."""
        self.refresh_mappings()
        out: list[Prepared | Exception | None] = [None] * len(events)
        reads: dict[tuple[str, str, tuple[str, ...]], list[int]] = {}
        specs_of: list[tuple[MappingSpec, ...]] = []
        trusted_modifier: list[str | None] = []
        for i, event in enumerate(events):
            specs = tuple(self.mappings.for_object(event.connection, event.object_type))
            specs_of.append(specs)
            trusted_modifier.append(event.modified_by if event.values_signed else None)
            if not specs or event.change_type == "deleted":
                out[i] = Prepared(specs, dict(event.values or {}) or None, None)
                continue
            needed_set = {name for spec in specs for name in spec.api_fields()}
            # Votes from the CRM and locked fields need to know who made the change; an unsigned
            # delivery's word for it is a hint, so it is read from the record then.
            if needs_modifier(specs) and trusted_modifier[i] is None:
                try:
                    adapter = self.runtime.adapter(event.connection)
                    modifier_field = adapter.modified_by_field(event.object_type)
                except Exception as exc:
                    out[i] = exc
                    continue
                if modifier_field is not None:
                    needed_set.add(modifier_field)
            needed = tuple(sorted(needed_set))
            present = {k.lower() for k in event.values or {}}
            # An unsigned delivery's values are hints: anyone who knows the URL could have written them.
            if not event.values_signed or any(name.lower() not in present for name in needed):
                reads.setdefault((event.connection, event.object_type, needed), []).append(i)
        fetched: dict[int, dict[str, Any] | None] = {}
        for (connection, object_type, needed), indexes in reads.items():
            try:
                found = self.runtime.adapter(connection).get_records(
                    object_type, [events[i].record_id for i in indexes], needed
                )
            except Exception as exc:  # every event of the failed read gets its error
                for i in indexes:
                    out[i] = exc
                continue
            for i in indexes:
                fetched[i] = found.get(events[i].record_id)
        for i, event in enumerate(events):
            if out[i] is not None:
                continue
            values = dict(event.values or {})
            if i in fetched:
                record = fetched[i]
                if record is None:
                    out[i] = Prepared(specs_of[i], None, None)
                    continue
                values.update(record)  # the CRM's current values win over the webhook's
            try:
                adapter = self.runtime.adapter(event.connection)
                own = adapter.is_own_change(event)
                modified_by = trusted_modifier[i] or adapter.modified_by(event.object_type, values)
                related = dependencies.read_related(adapter, self.mappings, specs_of[i], values)
            except Exception as exc:
                out[i] = exc
                continue
            out[i] = Prepared(specs_of[i], values, own, modified_by, related)
        return [p for p in out if p is not None]

    def preload(self, session: Session, events: Sequence[RecordChangeEvent]) -> None:
        """Called by the inbox for a batch applied in one transaction: besides what `preload`
        reads, the batch's new requests are written together (connector/storage/batch_writes.py),
        the records that have no request yet are known from one select, and directory look-ups
        are answered once per batch."""
        preload(session, events)
        store.preload_absent(session, {RecordKey(e.connection, e.object_type, e.record_id) for e in events})
        remember_lookups(session)
        batch_writes.start(session)

    def apply(self, session: Session, event: RecordChangeEvent, prepared: Prepared) -> str:
        if not prepared.specs:
            return f"no mapping for {event.connection}/{event.object_type}"
        if prepared.values is None:
            return "record deleted or no longer readable; nothing to approve"
        record = RecordKey(event.connection, event.object_type, event.record_id)
        replay_since = event.replayed_since  # read with the inbox row: no second select
        previous = _remember(session, record, prepared.values)
        backfill = event.change_type == BACKFILL
        if backfill:  # judged as if just created: no history, every field changed, not an echo
            previous = None
        changed = effective_changes(event.changed_fields, prepared.values, previous)
        if previous is not None and not changed:
            if replay_since is None:
                return "no field changed since last seen"
            # A replay judges the event as it came, even if its values are known by now.
            changed = set(event.changed_fields) or set(prepared.values)
        if not backfill and (
            prepared.own_change
            or (prepared.own_change is None and _echoes_our_write(session, record, changed, prepared.values))
        ):
            audit.record(session, "echo_ignored", **vars(record), fields=sorted(changed), origin=event.origin)
            return "echo of our own write-back; ignored"
        summaries = []
        for spec in prepared.specs:
            ctx = dependencies.with_states(
                session, record, spec, build_context(spec, prepared.values, previous, changed)
            )
            try:
                summaries += self.approvals.on_record_change(
                    session,
                    record,
                    spec,
                    ctx,
                    replay_since=replay_since,
                    modified_by=prepared.modified_by,
                    related=prepared.related,
                )
            except FatalError as exc:  # nobody to approve, a broken template: the inbox dead-letters it
                exc.add_note(f"mapping file {spec.source_path}")  # so its message says which file to fix
                raise
        return "; ".join(summaries) or "no rule matched"


def needs_modifier(specs: tuple[MappingSpec, ...]) -> bool:
    """Whether any rule votes from a CRM field or locks fields (both judge who made a change)."""
    return any(rule.crm_vote is not None or rule.lock is not None for spec in specs for rule in spec.rules)


def refresh_mappings(mappings: MappingSet, min_interval: float = 2.0) -> None:
    """Pick up edited mapping files; a broken edit keeps the last good set, loudly."""
    for error in mappings.reload_if_changed(min_interval) or ():
        log_mapping_error(error)


def log_mapping_error(error: object) -> None:
    log_event(
        log,
        logging.WARNING,
        "mapping_error",
        "mapping error; the last good set of mapping files stays active: %s",
        error,
        error=str(error),
    )


def effective_changes(
    reported: tuple[str, ...], values: Mapping[str, Any], previous: Mapping[str, Any] | None
) -> set[str]:
    """Fields that really changed: reported by the CRM and different from what we last saw.

    With no previous values everything reported (or known) counts; a CRM that reports no
    field list (Bitrix24, Outbound Messages send all fields) gets the difference from the
    last-seen values instead.
    """
    if previous is None:
        return set(reported) or set(values)
    old = {k.lower(): v for k, v in previous.items()}
    differs = {k.lower() for k, v in values.items() if norm_value(v) != norm_value(old.get(k.lower()))}
    if reported:
        known = {k.lower() for k in values}
        return {f for f in reported if f.lower() in differs or f.lower() not in known}
    return {k for k in values if k.lower() in differs}


def build_context(
    spec: MappingSpec, values: Mapping[str, Any], previous: Mapping[str, Any] | None, changed: set[str]
) -> EvalContext:
    now = utcnow()
    return EvalContext(
        values=spec.to_canonical(CaseInsensitive(values)),
        previous=spec.to_canonical(CaseInsensitive(previous)) if previous is not None else None,
        changed_fields=spec.canonical_names(changed),
        today=now.date(),
        now=now,
    )


class CaseInsensitive(dict[str, Any]):
    """CRMs differ in the case of API names between webhooks and reads."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        super().__init__({k.lower(): v for k, v in values.items()})

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(key.lower(), default)


_SNAPSHOTS = "pipeline_snapshots"  # Session.info: record key -> RecordSnapshot | None, preloaded
_WRITTEN = "pipeline_written"  # Session.info: record key -> recent DONE/SENDING outbox rows, preloaded


def preload(session: Session, events: Sequence[RecordChangeEvent]) -> None:
    """Read the snapshots and recent write-backs of a batch's records in one select each,
    so applying its events selects neither again (the inbox calls this per batch)."""
    keys = {(e.connection, e.object_type, e.record_id) for e in events}
    if not keys:
        return
    dialect = session.get_bind().dialect.name
    columns = (RecordSnapshot.connection, RecordSnapshot.object_type, RecordSnapshot.record_id)
    snapshots: dict[tuple[str, str, str], RecordSnapshot | None] = dict.fromkeys(keys)
    for row in session.scalars(select(RecordSnapshot).where(in_keys(columns, keys, dialect))):
        snapshots[(row.connection, row.object_type, row.record_id)] = row
    written: dict[tuple[str, str, str], list[OutboxUpdate]] = {key: [] for key in keys}
    outbox_columns = (OutboxUpdate.connection, OutboxUpdate.object_type, OutboxUpdate.record_id)
    for update in session.scalars(_recent_writes().where(in_keys(outbox_columns, keys, dialect))):
        written[(update.connection, update.object_type, update.record_id)].append(update)
    session.info[_SNAPSHOTS] = snapshots
    session.info[_WRITTEN] = written


def _recent_writes() -> Any:
    return (
        select(OutboxUpdate)
        .where(OutboxUpdate.status.in_((DONE, SENDING)))
        .where(OutboxUpdate.created_at >= utcnow() - ECHO_WINDOW)
        .order_by(OutboxUpdate.id)
    )


_BUFFERED: Any = object()  # in the preloaded snapshots: a new snapshot waiting in batch_writes


def _remember(session: Session, record: RecordKey, values: dict[str, Any]) -> dict[str, Any] | None:
    """Store the record's values; return what we had seen before (None the first time)."""
    key = (record.connection, record.object_type, record.record_id)
    known = session.info.get(_SNAPSHOTS)
    row = known[key] if known is not None and key in known else session.get(RecordSnapshot, key)
    if row is _BUFFERED:  # first seen earlier in this batch: its row is written now, and read
        batch_writes.write(session)
        row = known[key] = session.get(RecordSnapshot, key)  # type: ignore[index]
    if row is None:
        snapshot = {**vars(record), "values": values, "updated_at": utcnow()}
        if known is not None and batch_writes.add(session, RecordSnapshot.__table__, [snapshot]):
            # a batch is buffering: the record's first snapshot goes in with the batch's other
            # new rows, one INSERT (connector/storage/batch_writes.py), not an ORM object each
            known[key] = _BUFFERED
            return None
        row = RecordSnapshot(**snapshot)
        session.add(row)
        if known is not None:
            known[key] = row  # a later event of the batch for the same record sees it
        return None
    previous = dict(row.values)
    row.values, row.updated_at = {**previous, **values}, utcnow()
    return previous


def _echoes_our_write(
    session: Session, record: RecordKey, changed: set[str], values: Mapping[str, Any]
) -> bool:
    """True when every changed field holds exactly what our outbox recently wrote there."""
    if not changed:
        return False
    key = (record.connection, record.object_type, record.record_id)
    preloaded = session.info.get(_WRITTEN)
    if preloaded is not None and key in preloaded:
        rows = preloaded[key]
    else:
        rows = list(
            session.scalars(
                _recent_writes()
                .where(OutboxUpdate.connection == record.connection)
                .where(OutboxUpdate.object_type == record.object_type)
                .where(OutboxUpdate.record_id == record.record_id)
            )
        )
    written: dict[str, Any] = {}
    for row in rows:
        written.update({k.lower(): v for k, v in row.fields.items()})
    current = {k.lower(): v for k, v in values.items()}
    return all(
        f.lower() in written and norm_value(current.get(f.lower())) == norm_value(written[f.lower()])
        for f in changed
    )
