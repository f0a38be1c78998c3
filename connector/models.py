"""Tables of the foundation: the durable inbox, the write-back outbox, the dead letters.

The inbox row is the truth about a webhook; huey tasks only nudge the worker.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from connector.db import Base, JSONType, UTCDateTime
from connector.events import utcnow

# inbox / outbox statuses
PENDING = "pending"
DONE = "done"
SENDING = "sending"
DEAD = "dead"


class InboxEvent(Base):
    __tablename__ = "inbox_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dedupe_key: Mapped[str] = mapped_column(String(300), unique=True)
    source: Mapped[str] = mapped_column(String(32))
    connection: Mapped[str] = mapped_column(String(64))
    object_type: Mapped[str] = mapped_column(String(128))
    record_id: Mapped[str] = mapped_column(String(128))
    event_id: Mapped[str] = mapped_column(String(300))
    change_type: Mapped[str] = mapped_column(String(16), default="updated")
    changed_fields: Mapped[list[str]] = mapped_column(JSONType, default=list)
    values: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    origin: Mapped[str | None] = mapped_column(String(64), nullable=True)
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    status: Mapped[str] = mapped_column(String(16), default=PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    processed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    result: Mapped[str | None] = mapped_column(Text, nullable=True)  # what processing did, for ops
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)

    __table_args__ = (
        Index("ix_inbox_status_id", "status", "id"),
        Index("ix_inbox_record", "connection", "object_type", "record_id"),
    )


class OutboxUpdate(Base):
    """One requested field update. Pending rows for the same record merge into one request."""

    __tablename__ = "outbox_updates"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    connection: Mapped[str] = mapped_column(String(64))
    object_type: Mapped[str] = mapped_column(String(128))
    record_id: Mapped[str] = mapped_column(String(128))
    fields: Mapped[dict[str, Any]] = mapped_column(JSONType)  # CRM API name -> value
    reason: Mapped[str | None] = mapped_column(String(300), nullable=True)  # e.g. "request 12: approve"
    idempotency_key: Mapped[str | None] = mapped_column(String(300), unique=True, nullable=True)
    status: Mapped[str] = mapped_column(String(16), default=PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    batch_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    done_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)

    __table_args__ = (
        Index("ix_outbox_status_id", "status", "id"),
        Index("ix_outbox_record", "connection", "object_type", "record_id"),
    )


class DeadLetter(Base):
    """Work that cannot succeed without a person: the CRM's own message says why."""

    __tablename__ = "dead_letters"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # "outbox" or "inbox"
    ref_id: Mapped[int] = mapped_column(Integer)
    connection: Mapped[str] = mapped_column(String(64))
    object_type: Mapped[str] = mapped_column(String(128))
    record_id: Mapped[str] = mapped_column(String(128))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONType)
    error_code: Mapped[str | None] = mapped_column(String(128), nullable=True)
    error_message: Mapped[str] = mapped_column(Text)
    error_fields: Mapped[list[str]] = mapped_column(JSONType, default=list)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    resolved_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
