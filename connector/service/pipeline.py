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
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from connector.approvals.spec import EvalContext, MappingSpec
from connector.clock import utcnow
from connector.directory import Directory
from connector.errors import FatalError
from connector.events import BACKFILL, RecordChangeEvent
from connector.logs import log_event
from connector.notify.queue import NotificationQueue
from connector.rules import MappingSet
from connector.runtime import Runtime
from connector.service import dependencies, service_steps
from connector.service.approval_service import ApprovalService
from connector.storage import audit
from connector.storage.approval_store import RecordKey
from connector.storage.models import DONE, SENDING, InboxEvent, OutboxUpdate, RecordSnapshot
from connector.storage.outbox import norm_value

log = logging.getLogger(__name__)
ECHO_WINDOW = timedelta(hours=24)  # how long a write-back of ours may take to come back as a webhook


@dataclass(frozen=True)
class Prepared:
    specs: tuple[MappingSpec, ...]
    values: dict[str, Any] | None  # API name -> value; None when the record is gone
    own_change: bool | None  # the adapter's verdict; None = the CRM cannot tell
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
        )
        # issue 12: requests that wait for a related approval, and the steps the service runs
        self.approvals.gate = dependencies.Gate(mappings, build_context, self.approvals)
        self.approvals.after_save.append(self.approvals.gate.release)
        self.approvals.after_save.append(service_steps.queue_jobs)

    def refresh_mappings(self, min_interval: float = 2.0) -> None:
        refresh_mappings(self.mappings, min_interval)

    def prepare(self, event: RecordChangeEvent) -> Prepared:
        self.refresh_mappings()
        specs = tuple(self.mappings.for_object(event.connection, event.object_type))
        if not specs or event.change_type == "deleted":
            return Prepared(specs, dict(event.values or {}) or None, None)
        adapter = self.runtime.adapter(event.connection)
        values = dict(event.values or {})
        needed = sorted({name for spec in specs for name in spec.api_fields()})
        present = {k.lower() for k in values}
        # An unsigned delivery's values are hints: anyone who knows the URL could have written them.
        if not event.values_signed or any(name.lower() not in present for name in needed):
            fetched = adapter.get_record(event.object_type, event.record_id, needed)
            if fetched is None:
                return Prepared(specs, None, None)
            values.update(fetched)  # the CRM's current values win over the webhook's
        related = dependencies.read_related(adapter, self.mappings, specs, values)
        return Prepared(specs, values, adapter.is_own_change(event), related)

    def apply(self, session: Session, event: RecordChangeEvent, prepared: Prepared) -> str:
        if not prepared.specs:
            return f"no mapping for {event.connection}/{event.object_type}"
        if prepared.values is None:
            return "record deleted or no longer readable; nothing to approve"
        record = RecordKey(event.connection, event.object_type, event.record_id)
        replay_since = _replay_since(session, event)
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
                    session, record, spec, ctx, replay_since=replay_since, related=prepared.related
                )
            except FatalError as exc:  # nobody to approve, a broken template: the inbox dead-letters it
                exc.add_note(f"mapping file {spec.source_path}")  # so its message says which file to fix
                raise
        return "; ".join(summaries) or "no rule matched"


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


def _replay_since(session: Session, event: RecordChangeEvent) -> datetime | None:
    """For an event ops re-ran (replay, dead-letter retry): when it first arrived, else None."""
    row = session.execute(
        select(InboxEvent.replayed_at, InboxEvent.received_at).where(
            InboxEvent.dedupe_key == event.dedupe_key
        )
    ).first()
    return row.received_at if row is not None and row.replayed_at is not None else None


def _remember(session: Session, record: RecordKey, values: dict[str, Any]) -> dict[str, Any] | None:
    """Store the record's values; return what we had seen before (None the first time)."""
    row = session.get(RecordSnapshot, (record.connection, record.object_type, record.record_id))
    if row is None:
        session.add(RecordSnapshot(**vars(record), values=values, updated_at=utcnow()))
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
    rows = session.scalars(
        select(OutboxUpdate)
        .where(OutboxUpdate.connection == record.connection, OutboxUpdate.object_type == record.object_type)
        .where(OutboxUpdate.record_id == record.record_id, OutboxUpdate.status.in_((DONE, SENDING)))
        .where(OutboxUpdate.created_at >= utcnow() - ECHO_WINDOW)
        .order_by(OutboxUpdate.id)
    ).all()
    written: dict[str, Any] = {}
    for row in rows:
        written.update({k.lower(): v for k, v in row.fields.items()})
    current = {k.lower(): v for k, v in values.items()}
    return all(
        f.lower() in written and norm_value(current.get(f.lower())) == norm_value(written[f.lower()])
        for f in changed
    )
