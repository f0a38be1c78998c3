"""approval timers: each open step's next due moment (reminders, escalation, time-outs)

Revision ID: 0014_timers
Revises: 0010_hardening
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import connector.storage.db

revision = "0014_timers"
down_revision = "0015_delegation"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "approval_timers",
        sa.Column("request_id", sa.String(length=36), nullable=False),
        sa.Column("step_index", sa.Integer(), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("due_at", connector.storage.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("claim_id", sa.String(length=32), nullable=True),
        sa.Column("lease_until", connector.storage.db.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("request_id"),
    )
    op.create_index("ix_timers_due", "approval_timers", ["due_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_timers_due", table_name="approval_timers")
    op.drop_table("approval_timers")
