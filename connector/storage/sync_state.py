"""State of the sync jobs (docs/operations.md#sync-jobs), kept in the database so that a job
interrupted by Ctrl-C or a crash continues where it stopped:

- `sync_checkpoints`: one row per job + connection + object, holding the run id (which the
  job's dedupe keys carry), the options the scan was started with, and the cursor of the
  page to fetch next.
- `zoho_channels`: each Zoho notification channel we keep alive, with the expiry Zoho last
  confirmed and the outcome of the last renewal attempt.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Integer, String, Text
from sqlalchemy.orm import Mapped, Session, mapped_column

from connector.clock import utcnow
from connector.storage.db import Base, JSONType, UTCDateTime


class SyncCheckpoint(Base):
    __tablename__ = "sync_checkpoints"

    job: Mapped[str] = mapped_column(String(32), primary_key=True)  # e.g. "backfill"
    connection: Mapped[str] = mapped_column(String(64), primary_key=True)
    object_type: Mapped[str] = mapped_column(String(128), primary_key=True)
    run_id: Mapped[str] = mapped_column(String(32))
    options: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)  # what the scan selects
    cursor: Mapped[Any] = mapped_column(JSONType, nullable=True)  # the page to fetch next; None = first
    records_done: Mapped[int] = mapped_column(Integer, default=0)
    counts: Mapped[dict[str, int]] = mapped_column(JSONType, default=dict)  # outcome -> records
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class ZohoChannel(Base):
    __tablename__ = "zoho_channels"

    connection: Mapped[str] = mapped_column(String(64), primary_key=True)
    channel_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    events: Mapped[list[str]] = mapped_column(JSONType, default=list)
    notify_url: Mapped[str] = mapped_column(String(500))
    channel_expiry: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)  # as Zoho confirmed
    renewed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)


@dataclass
class Checkpoint:
    """A job's position, detached from the session (the job saves it after every page)."""

    job: str
    connection: str
    object_type: str
    run_id: str
    options: dict[str, Any]
    cursor: Any = None
    records_done: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    started_at: datetime = field(default_factory=utcnow)
    finished_at: datetime | None = None

    @property
    def resumed(self) -> bool:
        return self.records_done > 0 or self.cursor is not None

    def count(self, outcome: str, n: int = 1) -> None:
        self.counts[outcome] = self.counts.get(outcome, 0) + n


def load_checkpoint(session: Session, job: str, connection: str, object_type: str) -> Checkpoint | None:
    row = session.get(SyncCheckpoint, (job, connection, object_type))
    if row is None:
        return None
    return Checkpoint(
        job=row.job,
        connection=row.connection,
        object_type=row.object_type,
        run_id=row.run_id,
        options=dict(row.options or {}),
        cursor=row.cursor,
        records_done=row.records_done,
        counts=dict(row.counts or {}),
        started_at=row.started_at,
        finished_at=row.finished_at,
    )


def new_checkpoint(job: str, connection: str, object_type: str, options: dict[str, Any]) -> Checkpoint:
    return Checkpoint(job, connection, object_type, run_id=uuid.uuid4().hex, options=options)


def save_checkpoint(session: Session, checkpoint: Checkpoint) -> None:
    values = {
        "run_id": checkpoint.run_id,
        "options": checkpoint.options,
        "cursor": checkpoint.cursor,
        "records_done": checkpoint.records_done,
        "counts": dict(checkpoint.counts),
        "started_at": checkpoint.started_at,
        "updated_at": utcnow(),
        "finished_at": checkpoint.finished_at,
    }
    key = (checkpoint.job, checkpoint.connection, checkpoint.object_type)
    row = session.get(SyncCheckpoint, key)
    if row is None:
        session.add(SyncCheckpoint(job=key[0], connection=key[1], object_type=key[2], **values))
    else:
        for name, value in values.items():
            setattr(row, name, value)
