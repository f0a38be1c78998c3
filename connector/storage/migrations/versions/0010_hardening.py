"""inbox_events.content_hash: a delivery id reused for another body is refused, not dropped

Revision ID: 0010_hardening
Revises: 0006_api_indexes
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010_hardening"
down_revision = "0013_trust"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("inbox_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("content_hash", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("inbox_events", schema=None) as batch_op:
        batch_op.drop_column("content_hash")
