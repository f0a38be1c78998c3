"""request dependencies (waiting for a related approval) and service step jobs

Revision ID: 0019_company
Revises: 0010_hardening
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from connector.storage.db import UTCDateTime

revision = "0019_company"
down_revision = "0014_timers"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "request_dependencies",
        sa.Column("request_id", sa.String(36), primary_key=True),
        sa.Column("depends_on", sa.String(36), primary_key=True),
        sa.Column("created_at", UTCDateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_dependencies_depends_on", "request_dependencies", ["depends_on"])
    op.create_table(
        "service_step_jobs",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("request_id", sa.String(36), nullable=False),
        sa.Column("step_index", sa.Integer(), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("due_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("lease_until", UTCDateTime(timezone=True), nullable=True),
        sa.Column("deadline_at", UTCDateTime(timezone=True), nullable=True),
        sa.Column("callback_id", sa.String(64), nullable=False, unique=True),
        sa.Column("answer", JSON, nullable=True),
        sa.Column("outcome", sa.Text(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", UTCDateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("request_id", "step_index", "round", name="uq_service_job_once"),
    )
    op.create_index("ix_service_jobs_due", "service_step_jobs", ["status", "due_at"])


def downgrade() -> None:
    op.drop_index("ix_service_jobs_due", "service_step_jobs")
    op.drop_table("service_step_jobs")
    op.drop_index("ix_dependencies_depends_on", "request_dependencies")
    op.drop_table("request_dependencies")
