"""people wiring: sign-in links go out through the notification outbox, not web_sign_in_links

Revision ID: 0012_people_wiring
Revises: 0005_web
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import connector.storage.db

revision = "0012_people_wiring"
down_revision = "0005_web"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("web_sign_in_links", schema=None) as batch_op:
        batch_op.drop_index("ix_web_sign_in_links_email")
    op.drop_table("web_sign_in_links")


def downgrade() -> None:
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
