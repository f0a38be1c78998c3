"""delegation (deputies while away), CRM queues in the directory, deputy and automatic votes

Revision ID: 0015_delegation
Revises: 0010_hardening
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0015_delegation"
down_revision = "0016_crm_votes"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "delegations",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("connection", sa.String(64), nullable=False),
        sa.Column("user_id", sa.String(200), nullable=False),
        sa.Column("deputy_id", sa.String(200), nullable=False),
        sa.Column("starts_on", sa.Date(), nullable=False),
        sa.Column("ends_on", sa.Date(), nullable=False),
        sa.Column("rule_name", sa.String(200), nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("created_by", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("cancelled_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_delegations_user", "delegations", ["connection", "user_id", "ends_on"])
    op.create_table(
        "directory_queues",
        sa.Column("connection", sa.String(64), primary_key=True),
        sa.Column("queue_id", sa.String(200), primary_key=True),
        sa.Column("name", sa.String(300), nullable=False),
        sa.Column("members", JSON, nullable=False),
        sa.Column("refreshed_at", sa.DateTime(timezone=True), nullable=False),
    )
    with op.batch_alter_table("approval_steps") as batch:
        batch.add_column(sa.Column("on_behalf_of", JSON, server_default="{}", nullable=False))
    with op.batch_alter_table("approval_votes") as batch:
        batch.add_column(sa.Column("on_behalf_of", sa.String(200), nullable=True))
        batch.add_column(sa.Column("auto_reason", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("approval_votes") as batch:
        batch.drop_column("auto_reason")
        batch.drop_column("on_behalf_of")
    with op.batch_alter_table("approval_steps") as batch:
        batch.drop_column("on_behalf_of")
    op.drop_table("directory_queues")
    op.drop_index("ix_delegations_user", table_name="delegations")
    op.drop_table("delegations")
