"""The canonical record-change event every webhook is parsed into. Pure Python."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
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
    # SHA-256 of the delivery's body where its id must never come back with another body
    # (Standard Webhooks); None where redeliveries may legitimately differ (HubSpot's attemptNumber).
    content_hash: str | None = None
    # Set on an event read back from an inbox row that ops re-ran (replay, dead-letter retry):
    # when it first arrived. Not stored: the row's replayed_at/received_at carry it.
    replayed_since: datetime | None = field(default=None, compare=False)
    # The CRM user who made the change (Salesforce commitUser / LastModifiedById, HubSpot
    # sourceId userId / hs_updated_by_user_id, Zoho Modified_By, Bitrix24 MODIFY_BY_ID); None
    # when the delivery does not say: the pipeline then reads the adapter's modified-by field.
    modified_by: str | None = None

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
            "content_hash": self.content_hash,
            "modified_by": self.modified_by,
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
            content_hash=row.content_hash,
            replayed_since=_aware(row.received_at) if getattr(row, "replayed_at", None) is not None else None,
            modified_by=row.modified_by,
        )


def _aware(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


# Times outside this range are refused: no CRM change happens before the epoch or centuries
# ahead, and a datetime near year 1 or 9999 overflows as soon as anything adds an offset to it.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(3000, 1, 1, tzinfo=UTC)
_WHOLE_NUMBER = re.compile(r"-?[0-9]{1,30}")  # ASCII only: int() also takes "²" or Arabic digits


def parse_timestamp(value: Any) -> datetime:
    """Epoch seconds/milliseconds or ISO 8601 -> aware UTC datetime between EARLIEST and LATEST.
    Raises ValueError for anything else (NaN, infinities, huge numbers, years out of range)."""
    if isinstance(value, bool):
        raise ValueError(f"not a timestamp: {value!r}")
    if isinstance(value, str) and _WHOLE_NUMBER.fullmatch(value.strip()):
        value = int(value.strip())
    if isinstance(value, int) and abs(value) > 10**20:
        raise ValueError("not a timestamp: a number of more than 20 digits")
    if isinstance(value, int | float):
        number = float(value)
        if number > 1e11:  # milliseconds, as HubSpot and CDC send
            number /= 1000
        if not EARLIEST.timestamp() <= number < LATEST.timestamp():  # also NaN and the infinities
            raise ValueError(f"not a timestamp between {EARLIEST.year} and {LATEST.year - 1}: {value!r}")
        return EARLIEST + timedelta(seconds=number)
    if isinstance(value, str):
        text = value.strip().replace("Z", "+00:00")
        if not text.isascii():
            raise ValueError(f"not an ISO 8601 timestamp: {value[:40]!r}")
        try:
            parsed = datetime.fromisoformat(text)
            parsed = parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
        except OverflowError:  # year 1 or 9999 moved across the date line
            raise ValueError(f"timestamp out of range: {value[:40]!r}") from None
        return _in_range(parsed)
    raise ValueError(f"not a timestamp: a JSON {type(value).__name__}")


def _in_range(moment: datetime) -> datetime:
    if not EARLIEST <= moment < LATEST:
        raise ValueError(f"timestamp {moment.isoformat()} is outside {EARLIEST.year}..{LATEST.year - 1}")
    return moment
