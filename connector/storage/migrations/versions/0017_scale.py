"""Scale-out: inbox claims (a lease per event, so several workers never prepare the same
event) and the shared CRM rate-limit buckets of the database backend.

Revision ID: 0017_scale
Revises: 0010_hardening
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0017_scale"
down_revision = "0010_hardening"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("inbox_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("claimed_until", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "rate_buckets",
        sa.Column("name", sa.String(length=200), primary_key=True),
        sa.Column("tokens", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.Column("capacity", sa.Float(), nullable=False),
        sa.Column("rate", sa.Float(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("rate_buckets")
    with op.batch_alter_table("inbox_events", schema=None) as batch_op:
        batch_op.drop_column("claimed_until")
