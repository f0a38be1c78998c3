"""approval_assignees and approval_waiting (indexed visibility and pending lists), an index on
the approver of votes, and one for expiring the due approvals of a rule

Revision ID: 0018_expiry_api
Revises: 0010_hardening
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from connector.storage.db import UTCDateTime

revision = "0018_expiry_api"
down_revision = "0020_documents"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "approval_assignees",
        sa.Column("approver", sa.String(length=200), nullable=False),
        sa.Column("request_id", sa.String(length=36), nullable=False),
        sa.PrimaryKeyConstraint("approver", "request_id"),
    )
    op.create_table(
        "approval_waiting",
        sa.Column("request_id", sa.String(length=36), nullable=False),
        sa.Column("approver", sa.String(length=200), nullable=False),
        sa.Column("step_index", sa.Integer(), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("submitted_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("request_id", "approver"),
    )
    op.create_index(
        "ix_waiting_approver_submitted", "approval_waiting", ["approver", "submitted_at", "request_id"]
    )
    with op.batch_alter_table("approval_votes", schema=None) as batch_op:
        batch_op.create_index("ix_votes_approver", ["approver", "request_id"], unique=False)
    with op.batch_alter_table("approval_requests", schema=None) as batch_op:
        batch_op.create_index(
            "ix_requests_status_rule_expires", ["status", "rule_name", "expires_at"], unique=False
        )
    _backfill()


def _backfill() -> None:
    """Fill both tables from the steps and votes already stored, in SQL."""
    postgres = op.get_bind().dialect.name == "postgresql"
    members = "jsonb_array_elements_text(s.approvers) AS j(value)" if postgres else "json_each(s.approvers) AS j"
    op.execute(
        "INSERT INTO approval_assignees (approver, request_id) "
        f"SELECT DISTINCT j.value, s.request_id FROM approval_steps AS s, {members}"
    )
    op.execute(
        "INSERT INTO approval_waiting (request_id, approver, step_index, round, submitted_at) "
        'SELECT DISTINCT r.id, j.value, s."index", s.round, r.submitted_at '
        "FROM approval_requests AS r "
        'JOIN approval_steps AS s ON s.request_id = r.id AND s."index" = r.current_step '
        f"AND s.status = 'pending', {members} "
        "WHERE r.status = 'pending' AND NOT EXISTS (SELECT 1 FROM approval_votes AS v "
        'WHERE v.request_id = s.request_id AND v.step_index = s."index" AND v.round = s.round '
        "AND v.approver = j.value)"
    )


def downgrade() -> None:
    with op.batch_alter_table("approval_requests", schema=None) as batch_op:
        batch_op.drop_index("ix_requests_status_rule_expires")
    with op.batch_alter_table("approval_votes", schema=None) as batch_op:
        batch_op.drop_index("ix_votes_approver")
    op.drop_index("ix_waiting_approver_submitted", table_name="approval_waiting")
    op.drop_table("approval_waiting")
    op.drop_table("approval_assignees")
