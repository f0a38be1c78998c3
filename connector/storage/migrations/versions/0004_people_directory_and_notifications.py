"""people: the user directory cache and the notification outbox (issue 10)

Revision ID: 0004_people
Revises: 0001
Create Date: 2026-11-30 12:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import connector.storage.db
from sqlalchemy.dialects import postgresql

revision = '0004_people'
down_revision = '0006_api_indexes'
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql')
UTC = connector.storage.db.UTCDateTime(timezone=True)


def upgrade() -> None:
    op.create_table('directory_people',
    sa.Column('connection', sa.String(length=64), nullable=False),
    sa.Column('user_id', sa.String(length=200), nullable=False),
    sa.Column('name', sa.String(length=300), nullable=False),
    sa.Column('email', sa.String(length=320), nullable=True),
    sa.Column('email_lower', sa.String(length=320), nullable=True),
    sa.Column('locale', sa.String(length=32), nullable=True),
    sa.Column('manager_id', sa.String(length=200), nullable=True),
    sa.Column('active', sa.Boolean(), nullable=False),
    sa.Column('refreshed_at', UTC, nullable=False),
    sa.PrimaryKeyConstraint('connection', 'user_id')
    )
    op.create_index('ix_directory_email', 'directory_people', ['email_lower'], unique=False)
    op.create_table('directory_aliases',
    sa.Column('connection', sa.String(length=64), nullable=False),
    sa.Column('alias', sa.String(length=200), nullable=False),
    sa.Column('user_id', sa.String(length=200), nullable=False),
    sa.PrimaryKeyConstraint('connection', 'alias')
    )
    op.create_table('directory_refreshes',
    sa.Column('connection', sa.String(length=64), nullable=False),
    sa.Column('attempted_at', UTC, nullable=False),
    sa.Column('refreshed_at', UTC, nullable=True),
    sa.Column('people', sa.Integer(), nullable=False),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('connection')
    )
    op.create_table('notifications',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('dedupe_key', sa.String(length=400), nullable=False),
    sa.Column('event', sa.String(length=32), nullable=False),
    sa.Column('template', sa.String(length=64), nullable=False),
    sa.Column('channel', sa.String(length=16), nullable=False),
    sa.Column('connection', sa.String(length=64), nullable=True),
    sa.Column('user_id', sa.String(length=200), nullable=True),
    sa.Column('email', sa.String(length=320), nullable=True),
    sa.Column('target', sa.String(length=200), nullable=True),
    sa.Column('request_id', sa.String(length=36), nullable=True),
    sa.Column('context', JSON, nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', UTC, nullable=True),
    sa.Column('claim_id', sa.String(length=64), nullable=True),
    sa.Column('lease_expires_at', UTC, nullable=True),
    sa.Column('created_at', UTC, nullable=False),
    sa.Column('sent_at', UTC, nullable=True),
    sa.Column('done_at', UTC, nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('dedupe_key')
    )
    op.create_index('ix_notifications_status', 'notifications', ['status', 'next_attempt_at'], unique=False)
    op.create_index('ix_notifications_request', 'notifications', ['request_id'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_notifications_request', table_name='notifications')
    op.drop_index('ix_notifications_status', table_name='notifications')
    op.drop_table('notifications')
    op.drop_table('directory_refreshes')
    op.drop_table('directory_aliases')
    op.drop_index('ix_directory_email', table_name='directory_people')
    op.drop_table('directory_people')
