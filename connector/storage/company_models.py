"""Tables of issue 12: which request waits for which related approval, and the durable jobs of
steps the service runs itself (external checks, duplicate checks)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from connector.storage.db import Base, JSONType, UTCDateTime

# service step job statuses
JOB_DUE = "due"  # to call (or call again) at due_at
JOB_AWAITING = "awaiting"  # called; the answer comes to the callback endpoint before deadline_at
JOB_DONE = "done"


class RequestDependency(Base):
    """A `waiting` request (request_id) held until `depends_on` (another request) is decided."""

    __tablename__ = "request_dependencies"

    request_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    depends_on: Mapped[str] = mapped_column(String(36), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (Index("ix_dependencies_depends_on", "depends_on"),)


class ServiceStepJob(Base):
    """One run of a service step (request, step, round): claimed by a worker, called with no
    transaction open, its verdict saved with the request in one transaction."""

    __tablename__ = "service_step_jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_id: Mapped[str] = mapped_column(String(36))
    step_index: Mapped[int] = mapped_column(Integer)
    round: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))  # check / duplicate
    status: Mapped[str] = mapped_column(String(16), default=JOB_DUE)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    due_at: Mapped[datetime] = mapped_column(UTCDateTime)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    deadline_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    callback_id: Mapped[str] = mapped_column(String(64), unique=True)
    answer: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    outcome: Mapped[str | None] = mapped_column(Text, nullable=True)  # what happened, for people
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (
        UniqueConstraint("request_id", "step_index", "round", name="uq_service_job_once"),
        Index("ix_service_jobs_due", "status", "due_at"),
    )
