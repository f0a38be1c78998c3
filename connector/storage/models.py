"""Tables of the foundation: the durable inbox, the write-back outbox, the dead letters.

The inbox row is the truth about a webhook; huey tasks only nudge the worker.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Boolean, CheckConstraint, Float, Index, Integer, String, Text, UniqueConstraint, true
from sqlalchemy.orm import Mapped, mapped_column

from connector.clock import utcnow
from connector.storage.db import Base, JSONType, UTCDateTime

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
    origin: Mapped[str | None] = mapped_column(String(255), nullable=True)
    values_signed: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    status: Mapped[str] = mapped_column(String(16), default=PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    processed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    result: Mapped[str | None] = mapped_column(Text, nullable=True)  # what processing did, for ops
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Set when ops re-ran the event (replay, dead-letter retry): it is then evaluated again
    # even if its values are already known, and rules with a request since it are left alone.
    replayed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # SHA-256 of the delivery's content, where the sender's id must never name two contents
    # (Standard Webhooks): the same id with another hash is refused, not dropped as a duplicate.
    content_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # A worker's claim (connector/storage/inbox_claims.py): until then no other worker takes
    # the event up, so no two prepare it (and read the CRM for it); expired = claimable again.
    claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # Who made the change, as the delivery says (RecordChangeEvent.modified_by).
    modified_by: Mapped[str | None] = mapped_column(String(255), nullable=True)

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
    resolution: Mapped[str | None] = mapped_column(String(16), nullable=True)  # see RESOLUTIONS

    __table_args__ = (Index("ix_dead_letters_open", "resolved_at", "created_at"),)


# how a dead letter was resolved (connector/service/dead_letters.py)
RESOLUTIONS = ("retried", "superseded", "discarded")


# --- approvals -------------------------------------------------------------------------
# Rows mirror the dataclasses of connector.approvals.lifecycle one to one.


class ApprovalRequestRow(Base):
    __tablename__ = "approval_requests"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    connection: Mapped[str] = mapped_column(String(64))
    object_type: Mapped[str] = mapped_column(String(128))
    record_id: Mapped[str] = mapped_column(String(128))
    rule_name: Mapped[str] = mapped_column(String(200))
    mapping_path: Mapped[str] = mapped_column(String(500))
    mapping_hash: Mapped[str] = mapped_column(String(64))
    submitter: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16))
    current_step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    record: Mapped[dict[str, Any]] = mapped_column(JSONType)
    record_previous: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    changed_fields: Mapped[list[str]] = mapped_column(JSONType, default=list)
    submitted_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    approved_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    expired_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    superseded_by: Mapped[str | None] = mapped_column(String(36), nullable=True)
    version: Mapped[int] = mapped_column(Integer, default=0)
    # Set while submitted/pending, NULL otherwise: the unique index allows one active
    # request per record and rule on every backend (no partial indexes needed).
    active_key: Mapped[str | None] = mapped_column(String(600), unique=True, nullable=True)

    # Listing (connector/service/request_query.py) pages newest first by (submitted_at, id);
    # each filter has an index that yields its rows in that order.
    __table_args__ = (
        Index("ix_requests_record", "connection", "object_type", "record_id", "rule_name"),
        Index("ix_requests_status_expires", "status", "expires_at"),
        Index("ix_requests_submitted", "submitted_at", "id"),
        Index("ix_requests_status_submitted", "status", "submitted_at", "id"),
        Index("ix_requests_rule_submitted", "rule_name", "submitted_at", "id"),
        Index("ix_requests_connection_submitted", "connection", "submitted_at", "id"),
        Index("ix_requests_submitter_submitted", "submitter", "submitted_at", "id"),
        # set-based expiry takes the due approvals of one rule, soonest first
        Index("ix_requests_status_rule_expires", "status", "rule_name", "expires_at"),
    )


class ApprovalStepRow(Base):
    __tablename__ = "approval_steps"

    request_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    mode: Mapped[str] = mapped_column(String(16))
    approvers: Mapped[list[str]] = mapped_column(JSONType)
    required: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    entered_at: Mapped[datetime] = mapped_column(UTCDateTime)
    left_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # deputy -> approver they stand in for (delegation, connector.approvals.routing)
    on_behalf_of: Mapped[dict[str, str]] = mapped_column(JSONType, default=dict, server_default="{}")

    # Who is assigned where (visibility, pending_for): `approvers @> '["user"]'` on PostgreSQL.
    __table_args__ = (
        Index(
            "ix_steps_approvers",
            "approvers",
            postgresql_using="gin",
            postgresql_ops={"approvers": "jsonb_path_ops"},
        ).ddl_if(dialect="postgresql"),
    )


class ApprovalVoteRow(Base):
    __tablename__ = "approval_votes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_id: Mapped[str] = mapped_column(String(36))
    step_index: Mapped[int] = mapped_column(Integer)
    round: Mapped[int] = mapped_column(Integer)
    approver: Mapped[str] = mapped_column(String(200))
    decision: Mapped[str] = mapped_column(String(16))
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    acting_admin: Mapped[bool] = mapped_column(default=False)
    on_behalf_of: Mapped[str | None] = mapped_column(String(200), nullable=True)  # voter is their deputy
    auto_reason: Mapped[str | None] = mapped_column(Text, nullable=True)  # cast by the engine, and why

    __table_args__ = (
        UniqueConstraint("request_id", "step_index", "round", "approver", name="uq_vote_once"),
        Index("ix_votes_approver", "approver", "request_id"),  # a person's decisions
    )


class ApprovalTransitionRow(Base):
    __tablename__ = "approval_transitions"

    request_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    from_status: Mapped[str | None] = mapped_column(String(16), nullable=True)
    to_status: Mapped[str] = mapped_column(String(16))
    step_index: Mapped[int | None] = mapped_column(Integer, nullable=True)
    actor: Mapped[str | None] = mapped_column(String(200), nullable=True)
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    acting_admin: Mapped[bool] = mapped_column(default=False)


class RecordSnapshot(Base):
    """Last-seen values of a record (CRM API names), for changed / changed_from / changed_to."""

    __tablename__ = "record_snapshots"

    connection: Mapped[str] = mapped_column(String(64), primary_key=True)
    object_type: Mapped[str] = mapped_column(String(128), primary_key=True)
    record_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    values: Mapped[dict[str, Any]] = mapped_column(JSONType)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class AuditEntry(Base):
    """Append-only and hash-chained (connector/storage/audit.py): the migrations add triggers
    refusing UPDATE, DELETE, TRUNCATE, replace-by-id and inserts that do not extend the chain."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))
    connection: Mapped[str | None] = mapped_column(String(64), nullable=True)
    object_type: Mapped[str | None] = mapped_column(String(128), nullable=True)
    record_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    request_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    actor: Mapped[str | None] = mapped_column(String(200), nullable=True)
    mapping_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    detail: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    prev_hash: Mapped[str] = mapped_column(String(64))  # row_hash of the row before
    row_hash: Mapped[str] = mapped_column(String(64))  # sha256 of this row's content and prev_hash

    __table_args__ = (
        Index("ix_audit_record", "connection", "object_type", "record_id"),
        Index("ix_audit_request", "request_id"),
    )


class AuditChainHead(Base):
    """The one row naming the last audit row and its hash; the insert trigger advances it."""

    __tablename__ = "audit_chain_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    last_id: Mapped[int] = mapped_column(Integer)
    last_hash: Mapped[str] = mapped_column(String(64))

    __table_args__ = (CheckConstraint("id = 1", name="ck_audit_chain_head_single_row"),)


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[str] = mapped_column(String(200))  # the approver identity the token acts as
    label: Mapped[str] = mapped_column(String(200))
    is_admin: Mapped[bool] = mapped_column(default=False)
    token_hash: Mapped[str] = mapped_column(
        String(64), unique=True
    )  # sha256 hex; the token itself is never stored
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class RateBucket(Base):
    """A CRM rate-limit token bucket shared by every process (connector/crm/rate_limits.py),
    when the queue is not Redis."""

    __tablename__ = "rate_buckets"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)  # connection:limit
    tokens: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)  # epoch seconds of the last refill
    capacity: Mapped[float] = mapped_column(Float)
    rate: Mapped[float] = mapped_column(Float)  # tokens per second


class ApprovalAssigneeRow(Base):
    """Who was ever assigned to a step of a request (any round): who may see it, by index
    (connector/service/request_query.py). Kept by connector/storage/assignments.py."""

    __tablename__ = "approval_assignees"

    approver: Mapped[str] = mapped_column(String(200), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(36), primary_key=True)


class ApprovalWaitingRow(Base):
    """One row per approver whose vote the open step of a pending request still awaits: the
    approver's pending list, newest or oldest first, straight from one index. Pending requests
    only: migration 0023's triggers drop a request's rows when it leaves pending or is deleted
    (as connector/storage/assignments.py does on every save), so its count is the list's total."""

    __tablename__ = "approval_waiting"

    request_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    approver: Mapped[str] = mapped_column(String(200), primary_key=True)
    step_index: Mapped[int] = mapped_column(Integer)
    round: Mapped[int] = mapped_column(Integer)
    submitted_at: Mapped[datetime] = mapped_column(UTCDateTime)  # the request's, for the page order

    __table_args__ = (Index("ix_waiting_approver_submitted", "approver", "submitted_at", "request_id"),)


# How many requests there are per (status, rule, connection): kept by triggers on
# approval_requests (migration 0023_request_counts), read by connector/storage/request_counts.py.
# SQLite keeps one row per key (the migration makes this index unique there, for its upsert);
# PostgreSQL appends delta rows (no unique key), summed. No primary key: never an ORM row.
APPROVAL_REQUEST_COUNTS = sa.Table(
    "approval_request_counts",
    Base.metadata,
    sa.Column("status", String(16), nullable=False),
    sa.Column("rule_name", String(200), nullable=False),
    sa.Column("connection", String(64), nullable=False),
    sa.Column("n", Integer, nullable=False),
    Index("ix_request_counts_key", "status", "rule_name", "connection"),
)
