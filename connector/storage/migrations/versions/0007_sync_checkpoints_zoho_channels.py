"""sync jobs: checkpoints of resumable jobs, Zoho notification channels kept alive

Revision ID: 0007_sync
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

import connector.storage.db

revision = "0007_sync"
down_revision = "0002_audit_chain"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
UTC_DATETIME = connector.storage.db.UTCDateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "sync_checkpoints",
        sa.Column("job", sa.String(length=32), nullable=False),
        sa.Column("connection", sa.String(length=64), nullable=False),
        sa.Column("object_type", sa.String(length=128), nullable=False),
        sa.Column("run_id", sa.String(length=32), nullable=False),
        sa.Column("options", JSON, nullable=False),
        sa.Column("cursor", JSON, nullable=True),
        sa.Column("records_done", sa.Integer(), nullable=False),
        sa.Column("counts", JSON, nullable=False),
        sa.Column("started_at", UTC_DATETIME, nullable=False),
        sa.Column("updated_at", UTC_DATETIME, nullable=False),
        sa.Column("finished_at", UTC_DATETIME, nullable=True),
        sa.PrimaryKeyConstraint("job", "connection", "object_type"),
    )
    op.create_table(
        "zoho_channels",
        sa.Column("connection", sa.String(length=64), nullable=False),
        sa.Column("channel_id", sa.String(length=32), nullable=False),
        sa.Column("events", JSON, nullable=False),
        sa.Column("notify_url", sa.String(length=500), nullable=False),
        sa.Column("channel_expiry", UTC_DATETIME, nullable=True),
        sa.Column("renewed_at", UTC_DATETIME, nullable=True),
        sa.Column("last_attempt_at", UTC_DATETIME, nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("connection", "channel_id"),
    )


def downgrade() -> None:
    op.drop_table("zoho_channels")
    op.drop_table("sync_checkpoints")
