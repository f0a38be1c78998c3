"""documents: approval sheets and generated documents of requests, and their CRM attachments

Revision ID: 0020_documents
Revises: 0010_hardening
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from connector.storage.db import UTCDateTime

revision = "0020_documents"
down_revision = "0019_company"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "request_documents",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("request_id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("title", sa.String(length=200), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("source_seq", sa.Integer(), nullable=False),
        sa.Column("filename", sa.String(length=255), nullable=False),
        sa.Column("html", sa.Text(), nullable=False),
        sa.Column("pdf", sa.LargeBinary(), nullable=False),
        sa.Column("rendered_at", UTCDateTime(), nullable=False),
        sa.Column("connection", sa.String(length=64), nullable=False),
        sa.Column("object_type", sa.String(length=128), nullable=False),
        sa.Column("record_id", sa.String(length=128), nullable=False),
        sa.Column("crm_status", sa.String(length=16), nullable=False),
        sa.Column("crm_ref", sa.String(length=300), nullable=True),
        sa.Column("crm_version", sa.Integer(), nullable=True),
        sa.Column("crm_error", sa.Text(), nullable=True),
        sa.Column("crm_attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("crm_next_attempt_at", UTCDateTime(), nullable=True),
        sa.Column("attached_at", UTCDateTime(), nullable=True),
        sa.UniqueConstraint("request_id", "name", name="uq_request_document"),
    )
    op.create_index("ix_request_documents_crm", "request_documents", ["crm_status", "id"])


def downgrade() -> None:
    op.drop_index("ix_request_documents_crm", table_name="request_documents")
    op.drop_table("request_documents")
