"""The documents table: one row per request and document, rewritten on each new version (the
CRM keeps one file per document too; `crm_ref` is what the next version replaces)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Index, Integer, LargeBinary, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from connector.storage.db import Base, UTCDateTime

# crm_status: what the CRM has of the current version
PENDING = "pending"  # this version still has to be attached
ATTACHED = "attached"
FAILED = "failed"  # the CRM refused it; crm_error has its message (retried on the next version)
UNSUPPORTED = "unsupported"  # this CRM connection cannot hold files (crm_error says why)


class RequestDocument(Base):
    __tablename__ = "request_documents"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_id: Mapped[str] = mapped_column(String(36))
    name: Mapped[str] = mapped_column(String(64))
    title: Mapped[str] = mapped_column(String(200))
    version: Mapped[int] = mapped_column(Integer)  # 1, 2, 3 ... each render
    source_seq: Mapped[int] = mapped_column(Integer)  # the request's last transition it shows
    filename: Mapped[str] = mapped_column(String(255))
    html: Mapped[str] = mapped_column(Text)
    pdf: Mapped[bytes] = mapped_column(LargeBinary)
    rendered_at: Mapped[datetime] = mapped_column(UTCDateTime)
    connection: Mapped[str] = mapped_column(String(64))
    object_type: Mapped[str] = mapped_column(String(128))
    record_id: Mapped[str] = mapped_column(String(128))
    crm_status: Mapped[str] = mapped_column(String(16), default=PENDING)
    crm_ref: Mapped[str | None] = mapped_column(String(300), nullable=True)  # the CRM's file id
    crm_version: Mapped[int | None] = mapped_column(Integer, nullable=True)  # version the CRM has
    crm_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    crm_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    crm_next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    attached_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    __table_args__ = (
        UniqueConstraint("request_id", "name", name="uq_request_document"),
        Index("ix_request_documents_crm", "crm_status", "id"),
    )
