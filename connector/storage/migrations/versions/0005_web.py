"""web app: sign-in links and used link nonces

Revision ID: 0005_web
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import connector.storage.db

revision = "0005_web"
down_revision = "0004_people"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "web_sign_in_links",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.String(length=200), nullable=False),
        sa.Column("email", sa.String(length=320), nullable=False),
        sa.Column("link", sa.Text(), nullable=False),
        sa.Column("created_at", connector.storage.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("expires_at", connector.storage.db.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("web_sign_in_links", schema=None) as batch_op:
        batch_op.create_index("ix_web_sign_in_links_email", ["email"], unique=False)
    op.create_table(
        "web_used_links",
        sa.Column("nonce", sa.String(length=64), nullable=False),
        sa.Column("purpose", sa.String(length=16), nullable=False),
        sa.Column("user_id", sa.String(length=200), nullable=False),
        sa.Column("used_at", connector.storage.db.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("nonce"),
    )


def downgrade() -> None:
    op.drop_table("web_used_links")
    with op.batch_alter_table("web_sign_in_links", schema=None) as batch_op:
        batch_op.drop_index("ix_web_sign_in_links_email")
    op.drop_table("web_sign_in_links")
