"""The canonical record-change event every webhook is parsed into. Pure Python."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

CHANGE_TYPES = ("created", "updated", "deleted", "undeleted")
# Not a CRM change: `sync backfill` asks for a record to be judged as if it had just been created.
BACKFILL = "backfill"


@dataclass(frozen=True)
class RecordChangeEvent:
    source: str  # CRM kind: salesforce, hubspot, zoho, bitrix24, sandbox
    connection: str  # configured connection name
    object_type: str  # as the CRM names it: Opportunity, deals, Deals, deal
    record_id: str
    event_id: str  # the CRM's own id for this delivery item
    occurred_at: datetime  # when the change happened, per the CRM (UTC)
    dedupe_key: str  # same key = same change redelivered
    change_type: str = "updated"
    changed_fields: tuple[str, ...] = ()  # CRM API names; empty = unknown (fetch everything)
    values: Mapping[str, Any] | None = field(default=None)  # API name -> value, when the payload has them
    origin: str | None = None  # who made the change, as the CRM says (CDC changeOrigin, HubSpot changeSource)
    # False when the delivery is not signed over its content (Outbound Messages, Zoho workflow
    # webhooks): its values are hints and the pipeline re-reads every mapped field from the CRM.
    values_signed: bool = True

    def to_row(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "connection": self.connection,
            "object_type": self.object_type,
            "record_id": self.record_id,
            "event_id": self.event_id,
            "occurred_at": self.occurred_at,
            "dedupe_key": self.dedupe_key,
            "change_type": self.change_type,
            "changed_fields": list(self.changed_fields),
            "values": dict(self.values) if self.values is not None else None,
            "origin": self.origin,
            "values_signed": self.values_signed,
        }

    @classmethod
    def from_row(cls, row: Any) -> RecordChangeEvent:
        occurred = row.occurred_at
        if occurred.tzinfo is None:  # SQLite drops the zone; we only ever store UTC
            occurred = occurred.replace(tzinfo=UTC)
        return cls(
            source=row.source,
            connection=row.connection,
            object_type=row.object_type,
            record_id=row.record_id,
            event_id=row.event_id,
            occurred_at=occurred,
            dedupe_key=row.dedupe_key,
            change_type=row.change_type,
            changed_fields=tuple(row.changed_fields or ()),
            values=row.values,
            origin=row.origin,
            values_signed=row.values_signed,
        )


def parse_timestamp(value: Any) -> datetime:
    """Epoch seconds/milliseconds or ISO 8601 -> aware UTC datetime. Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"not a timestamp: {value!r}")
    if isinstance(value, int | float) or (isinstance(value, str) and value.strip().lstrip("-").isdigit()):
        number = float(value)
        if number > 1e11:  # milliseconds, as HubSpot and CDC send
            number /= 1000
        return datetime.fromtimestamp(number, UTC)
    if isinstance(value, str):
        text = value.strip().replace("Z", "+00:00")
        parsed = datetime.fromisoformat(text)
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    raise ValueError(f"not a timestamp: {value!r}")
