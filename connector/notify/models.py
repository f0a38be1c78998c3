"""The notification outbox: one row per message to one recipient on one channel."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from connector.clock import utcnow
from connector.storage.db import Base, JSONType, UTCDateTime

# statuses: pending -> sending -> done | pending (retry) | dead; skipped = nothing to send
PENDING = "pending"
SENDING = "sending"
DONE = "done"
DEAD = "dead"
SKIPPED = "skipped"


class Notification(Base):
    __tablename__ = "notifications"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # unique per (event, recipient, channel): queueing the same message twice adds nothing
    dedupe_key: Mapped[str] = mapped_column(String(400), unique=True)
    event: Mapped[str] = mapped_column(String(32))  # step_opened, approved, ..., sign_in
    template: Mapped[str] = mapped_column(String(64))  # templates/notifications/<lang>/<template>.*
    channel: Mapped[str] = mapped_column(String(16))  # email | chat
    connection: Mapped[str | None] = mapped_column(String(64), nullable=True)
    user_id: Mapped[str | None] = mapped_column(String(200), nullable=True)  # the recipient, if a user
    email: Mapped[str | None] = mapped_column(String(320), nullable=True)  # an address given directly
    target: Mapped[str | None] = mapped_column(String(200), nullable=True)  # chat: user:ID, role:NAME, ...
    request_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    context: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    status: Mapped[str] = mapped_column(String(16), default=PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    claim_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    done_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)

    __table_args__ = (
        Index("ix_notifications_status", "status", "next_attempt_at"),
        Index("ix_notifications_request", "request_id"),
    )
