"""ops: inbox replay marker, dead-letter resolution, index for open dead letters

Revision ID: 0003_ops
Revises: 0001
Create Date: 2026-11-30 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import connector.storage.db

revision = '0003_ops'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('inbox_events', schema=None) as batch_op:
        batch_op.add_column(sa.Column('replayed_at', connector.storage.db.UTCDateTime(timezone=True), nullable=True))
    with op.batch_alter_table('dead_letters', schema=None) as batch_op:
        batch_op.add_column(sa.Column('resolution', sa.String(length=16), nullable=True))
        batch_op.create_index('ix_dead_letters_open', ['resolved_at', 'created_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('dead_letters', schema=None) as batch_op:
        batch_op.drop_index('ix_dead_letters_open')
        batch_op.drop_column('resolution')
    with op.batch_alter_table('inbox_events', schema=None) as batch_op:
        batch_op.drop_column('replayed_at')
