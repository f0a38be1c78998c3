"""inbox events remember who made the change (votes from the CRM, record locking)

Revision ID: 0016_crm_votes
Revises: 0010_hardening
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016_crm_votes"
down_revision = "0017_scale"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("inbox_events") as batch:
        batch.add_column(sa.Column("modified_by", sa.String(255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("inbox_events") as batch:
        batch.drop_column("modified_by")
