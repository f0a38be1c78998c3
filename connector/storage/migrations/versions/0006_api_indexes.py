"""indexes for listing approval requests: newest first, by status, rule, connection, submitter, approver

Revision ID: 0006_api_indexes
Revises: 0001
"""

from __future__ import annotations

from alembic import op

revision = "0006_api_indexes"
down_revision = "0007_sync"
branch_labels = None
depends_on = None

REQUEST_INDEXES = {
    "ix_requests_submitted": ["submitted_at", "id"],
    "ix_requests_status_submitted": ["status", "submitted_at", "id"],
    "ix_requests_rule_submitted": ["rule_name", "submitted_at", "id"],
    "ix_requests_connection_submitted": ["connection", "submitted_at", "id"],
    "ix_requests_submitter_submitted": ["submitter", "submitted_at", "id"],
}


def upgrade() -> None:
    with op.batch_alter_table("approval_requests", schema=None) as batch_op:
        for name, columns in REQUEST_INDEXES.items():
            batch_op.create_index(name, columns, unique=False)
    if op.get_bind().dialect.name == "postgresql":
        # JSON containment (approvers @> '["u-1"]') only has an index on PostgreSQL.
        op.create_index(
            "ix_steps_approvers",
            "approval_steps",
            ["approvers"],
            postgresql_using="gin",
            postgresql_ops={"approvers": "jsonb_path_ops"},
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.drop_index("ix_steps_approvers", table_name="approval_steps")
    with op.batch_alter_table("approval_requests", schema=None) as batch_op:
        for name in REQUEST_INDEXES:
            batch_op.drop_index(name)
