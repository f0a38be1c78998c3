"""approval_request_counts: how many requests there are per (status, rule, connection), kept by
the database itself, so a list's exact `total` costs a few rows instead of a count of the table;
approval_waiting kept to pending requests (a deleted request, or one that leaves pending, waits
for nobody) and approval_assignees to existing ones, so an approver's pending count and a
user's visible count are counts of their own rows in those tables' indexes.

Triggers on approval_requests keep all three in the same transaction as the change, whoever
writes it (the approval store, set-based expiry, a hand-written UPDATE or DELETE):

* SQLite (one writer at a time): row triggers add to one row per key (an upsert).
* PostgreSQL (many writers at once): statement triggers with transition tables append one
  delta row per key a statement changed, never updating a shared row, so concurrent writers
  neither wait for each other nor deadlock on a counter; a key's count is the sum of its rows.
  The worker's sweep folds each key's rows into one (connector/storage/request_counts.py).

A later migration that rebuilds approval_requests on SQLite (a batch_alter_table that
recreates the table) drops its triggers and must create them again: see
tests/storage/test_request_counts.py, which checks the counts after every kind of change.

Revision ID: 0023_request_counts
Revises: 0022_audit_fast
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0023_request_counts"
down_revision = "0022_audit_fast"
branch_labels = None
depends_on = None

KEY = "status, rule_name, connection"

SQLITE_TRIGGERS = (
    f"""
    CREATE TRIGGER approval_requests_counted_insert AFTER INSERT ON approval_requests
    BEGIN
        INSERT INTO approval_request_counts ({KEY}, n) VALUES (NEW.status, NEW.rule_name, NEW.connection, 1)
        ON CONFLICT ({KEY}) DO UPDATE SET n = n + 1;
    END
    """,
    f"""
    CREATE TRIGGER approval_requests_counted_update
    AFTER UPDATE OF {KEY} ON approval_requests
    WHEN OLD.status IS NOT NEW.status OR OLD.rule_name IS NOT NEW.rule_name
        OR OLD.connection IS NOT NEW.connection
    BEGIN
        UPDATE approval_request_counts SET n = n - 1
        WHERE status = OLD.status AND rule_name = OLD.rule_name AND connection = OLD.connection;
        INSERT INTO approval_request_counts ({KEY}, n) VALUES (NEW.status, NEW.rule_name, NEW.connection, 1)
        ON CONFLICT ({KEY}) DO UPDATE SET n = n + 1;
        DELETE FROM approval_waiting WHERE request_id = OLD.id AND NEW.status <> 'pending';
    END
    """,
    """
    CREATE TRIGGER approval_requests_counted_delete AFTER DELETE ON approval_requests
    BEGIN
        UPDATE approval_request_counts SET n = n - 1
        WHERE status = OLD.status AND rule_name = OLD.rule_name AND connection = OLD.connection;
        DELETE FROM approval_waiting WHERE request_id = OLD.id;
        DELETE FROM approval_assignees WHERE request_id = OLD.id;
    END
    """,
)

# One function per operation: each reads the transition tables its trigger declares.
POSTGRES_FUNCTIONS = {
    "insert": f"""
        INSERT INTO approval_request_counts ({KEY}, n)
        SELECT {KEY}, count(*) FROM new_rows GROUP BY {KEY};
    """,
    "update": f"""
        INSERT INTO approval_request_counts ({KEY}, n)
        SELECT {KEY}, sum(d) FROM (
            SELECT {KEY}, -1 AS d FROM old_rows UNION ALL SELECT {KEY}, 1 AS d FROM new_rows
        ) AS moved GROUP BY {KEY} HAVING sum(d) <> 0;
        DELETE FROM approval_waiting AS w USING new_rows AS r
        WHERE w.request_id = r.id AND r.status <> 'pending';
    """,
    "delete": f"""
        INSERT INTO approval_request_counts ({KEY}, n)
        SELECT {KEY}, -count(*) FROM old_rows GROUP BY {KEY};
        DELETE FROM approval_waiting AS w USING old_rows AS r WHERE w.request_id = r.id;
        DELETE FROM approval_assignees AS a USING old_rows AS r WHERE a.request_id = r.id;
    """,
}
POSTGRES_TRANSITIONS = {
    "insert": "NEW TABLE AS new_rows",
    "update": "OLD TABLE AS old_rows NEW TABLE AS new_rows",
    "delete": "OLD TABLE AS old_rows",
}


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    op.create_table(
        "approval_request_counts",
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("rule_name", sa.String(length=200), nullable=False),
        sa.Column("connection", sa.String(length=64), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
    )
    # SQLite: one row per key (the upsert's target); PostgreSQL: delta rows, summed
    op.create_index(
        "ix_request_counts_key", "approval_request_counts", ["status", "rule_name", "connection"],
        unique=not postgres,
    )  # fmt: skip
    op.execute(
        f"INSERT INTO approval_request_counts ({KEY}, n) "
        f"SELECT {KEY}, count(*) FROM approval_requests GROUP BY {KEY}"
    )
    # before the triggers: from now on approval_waiting holds pending requests only, and
    # approval_assignees existing ones
    op.execute(
        "DELETE FROM approval_waiting WHERE request_id NOT IN "
        "(SELECT id FROM approval_requests WHERE status = 'pending')"
    )
    op.execute("DELETE FROM approval_assignees WHERE request_id NOT IN (SELECT id FROM approval_requests)")
    if not postgres:
        for statement in SQLITE_TRIGGERS:
            op.execute(statement)
        return
    for operation, body in POSTGRES_FUNCTIONS.items():
        op.execute(
            f"CREATE FUNCTION approval_requests_counted_{operation}() RETURNS trigger "
            f"LANGUAGE plpgsql AS $$ BEGIN {body} RETURN NULL; END $$"
        )
        op.execute(
            f"CREATE TRIGGER approval_requests_counted_{operation} AFTER {operation.upper()} "
            f"ON approval_requests REFERENCING {POSTGRES_TRANSITIONS[operation]} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION approval_requests_counted_{operation}()"
        )


def downgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    for operation in ("insert", "update", "delete"):
        if postgres:
            op.execute(f"DROP TRIGGER approval_requests_counted_{operation} ON approval_requests")
            op.execute(f"DROP FUNCTION approval_requests_counted_{operation}()")
        else:
            op.execute(f"DROP TRIGGER approval_requests_counted_{operation}")
    op.drop_index("ix_request_counts_key", table_name="approval_request_counts")
    op.drop_table("approval_request_counts")
