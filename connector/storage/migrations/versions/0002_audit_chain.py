"""audit log hash chain: prev_hash/row_hash, audit_chain_head, triggers against rewriting

Revision ID: 0002_audit_chain
Revises: 0001

Existing rows are chained in id order. From here on the database itself refuses UPDATE,
DELETE, TRUNCATE (PostgreSQL), replace-by-id (SQLite `INSERT OR REPLACE`, PostgreSQL
`ON CONFLICT DO UPDATE`) and any insert that does not extend the chain head; the insert
trigger advances the head. connector/storage/audit.py computes the hashes; docs/operations.md
says how to verify the chain and anchor its head outside the database.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from connector.storage.audit import GENESIS_HASH, HEAD_ID, row_hash
from connector.storage.db import JSONType, UTCDateTime

revision = "0002_audit_chain"
down_revision = "0003_ops"
branch_labels = None
depends_on = None

APPEND_ONLY = "audit_log is append-only"

# SQLite fires the triggers of one event newest first: the replace check is created last so
# that a replace-by-id is named as such.
SQLITE_TRIGGERS = {
    "audit_log_no_update": f"BEFORE UPDATE ON audit_log BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY}'); END",
    "audit_log_no_delete": f"BEFORE DELETE ON audit_log BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY}'); END",
    "audit_log_extends_chain": (
        "BEFORE INSERT ON audit_log "
        f"WHEN NEW.id IS NOT (SELECT last_id + 1 FROM audit_chain_head WHERE id = {HEAD_ID}) "
        f"OR NEW.prev_hash IS NOT (SELECT last_hash FROM audit_chain_head WHERE id = {HEAD_ID}) "
        f"BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY}: a new row must extend the chain head "
        "(id = head id + 1, prev_hash = head hash)'); END"
    ),
    # REPLACE deletes the old row without firing delete triggers (recursive_triggers is
    # off), so the insert itself is refused.
    "audit_log_no_replace": (
        "BEFORE INSERT ON audit_log WHEN EXISTS (SELECT 1 FROM audit_log WHERE id = NEW.id) "
        f"BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY}: an insert may not replace an existing row'); END"
    ),
    "audit_log_advance_head": (
        "AFTER INSERT ON audit_log BEGIN UPDATE audit_chain_head "
        f"SET last_id = NEW.id, last_hash = NEW.row_hash WHERE id = {HEAD_ID}; END"
    ),
    "audit_chain_head_no_insert": (
        "BEFORE INSERT ON audit_chain_head "
        "BEGIN SELECT RAISE(ABORT, 'audit_chain_head is append-only: it keeps its one row'); END"
    ),
    "audit_chain_head_no_delete": (
        "BEFORE DELETE ON audit_chain_head "
        "BEGIN SELECT RAISE(ABORT, 'audit_chain_head is append-only: it keeps its one row'); END"
    ),
    "audit_chain_head_forward": (
        "BEFORE UPDATE ON audit_chain_head WHEN NEW.id IS NOT OLD.id OR NEW.last_id <= OLD.last_id "
        "BEGIN SELECT RAISE(ABORT, 'audit_chain_head is append-only: it only moves forward'); END"
    ),
}

POSTGRES_FUNCTIONS = {
    "audit_log_extend_chain": f"""
DECLARE
    head_id integer;
    head_hash varchar;
BEGIN
    -- the lock serialises appenders, also ones that bypass the application
    SELECT last_id, last_hash INTO head_id, head_hash FROM audit_chain_head WHERE id = {HEAD_ID} FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION '{APPEND_ONLY}: the chain head row is missing';
    END IF;
    IF EXISTS (SELECT 1 FROM audit_log WHERE id = NEW.id) THEN
        RAISE EXCEPTION '{APPEND_ONLY}: an insert may not replace row %', NEW.id;
    END IF;
    IF NEW.id IS DISTINCT FROM head_id + 1 OR NEW.prev_hash IS DISTINCT FROM head_hash THEN
        RAISE EXCEPTION '{APPEND_ONLY}: row % does not extend the chain head (row %)', NEW.id, head_id;
    END IF;
    -- advanced here, not in an AFTER trigger: those run at the end of a multi-row INSERT
    UPDATE audit_chain_head SET last_id = NEW.id, last_hash = NEW.row_hash WHERE id = {HEAD_ID};
    RETURN NEW;
END""",
    "audit_chain_head_guard": """
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.id = OLD.id AND NEW.last_id > OLD.last_id THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'audit_chain_head is append-only: it keeps its one row and only moves forward';
END""",
}
POSTGRES_TRIGGERS = {
    "audit_log_append_only": "BEFORE UPDATE OR DELETE ON audit_log FOR EACH ROW "
    "EXECUTE FUNCTION audit_log_append_only()",
    "audit_log_no_truncate": "BEFORE TRUNCATE ON audit_log FOR EACH STATEMENT "
    "EXECUTE FUNCTION audit_log_append_only()",
    "audit_log_extend_chain": "BEFORE INSERT ON audit_log FOR EACH ROW EXECUTE FUNCTION audit_log_extend_chain()",
    "audit_chain_head_guard": "BEFORE INSERT OR UPDATE OR DELETE ON audit_chain_head FOR EACH ROW "
    "EXECUTE FUNCTION audit_chain_head_guard()",
    "audit_chain_head_no_truncate": "BEFORE TRUNCATE ON audit_chain_head FOR EACH STATEMENT "
    "EXECUTE FUNCTION audit_chain_head_guard()",
}

audit_log = sa.table(
    "audit_log",
    sa.column("id", sa.Integer),
    sa.column("at", UTCDateTime()),
    sa.column("kind", sa.String),
    sa.column("connection", sa.String),
    sa.column("object_type", sa.String),
    sa.column("record_id", sa.String),
    sa.column("request_id", sa.String),
    sa.column("actor", sa.String),
    sa.column("mapping_hash", sa.String),
    sa.column("detail", JSONType),
    sa.column("prev_hash", sa.String),
    sa.column("row_hash", sa.String),
)


def _postgres() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def upgrade() -> None:
    postgres = _postgres()
    if postgres:
        op.execute("DROP TRIGGER IF EXISTS audit_log_append_only ON audit_log")
    else:
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_update")
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_delete")
    with op.batch_alter_table("audit_log") as batch_op:
        batch_op.add_column(sa.Column("prev_hash", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("row_hash", sa.String(length=64), nullable=True))
    last_id, last_hash = _chain_existing_rows()
    with op.batch_alter_table("audit_log") as batch_op:
        batch_op.alter_column("prev_hash", existing_type=sa.String(length=64), nullable=False)
        batch_op.alter_column("row_hash", existing_type=sa.String(length=64), nullable=False)
    head = op.create_table(
        "audit_chain_head",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("last_id", sa.Integer(), nullable=False),
        sa.Column("last_hash", sa.String(length=64), nullable=False),
        sa.CheckConstraint("id = 1", name="ck_audit_chain_head_single_row"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.bulk_insert(head, [{"id": HEAD_ID, "last_id": last_id, "last_hash": last_hash}])
    if postgres:
        for name, body in POSTGRES_FUNCTIONS.items():
            op.execute(f"CREATE FUNCTION {name}() RETURNS trigger AS $${body}$$ LANGUAGE plpgsql")
        for name, definition in POSTGRES_TRIGGERS.items():
            op.execute(f"CREATE TRIGGER {name} {definition}")
    else:
        for name, definition in SQLITE_TRIGGERS.items():
            op.execute(f"CREATE TRIGGER {name} {definition}")


def _chain_existing_rows(page_size: int = 1000) -> tuple[int, str]:
    """Give every existing row its hashes, in id order; returns the new chain head."""
    bind = op.get_bind()
    last_id, last_hash = 0, GENESIS_HASH
    while True:
        page = (
            bind.execute(sa.select(audit_log).where(audit_log.c.id > last_id).order_by(audit_log.c.id).limit(page_size))
            .mappings()
            .all()
        )
        if not page:
            return last_id, last_hash
        hashes = []
        for row in page:
            digest = row_hash({**row, "prev_hash": last_hash})
            hashes.append({"row": row["id"], "prev": last_hash, "digest": digest})
            last_id, last_hash = row["id"], digest
        bind.execute(
            audit_log.update()
            .where(audit_log.c.id == sa.bindparam("row"))
            .values(prev_hash=sa.bindparam("prev"), row_hash=sa.bindparam("digest")),
            hashes,
        )


def downgrade() -> None:
    if _postgres():
        for name, definition in POSTGRES_TRIGGERS.items():
            table = "audit_chain_head" if "ON audit_chain_head" in definition else "audit_log"
            op.execute(f"DROP TRIGGER IF EXISTS {name} ON {table}")
        for name in POSTGRES_FUNCTIONS:
            op.execute(f"DROP FUNCTION IF EXISTS {name}()")
    else:
        for name in SQLITE_TRIGGERS:
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
    op.drop_table("audit_chain_head")
    with op.batch_alter_table("audit_log") as batch_op:
        batch_op.drop_column("row_hash")
        batch_op.drop_column("prev_hash")
    # back to 0001's append-only triggers
    if _postgres():
        op.execute(
            "CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log "
            "FOR EACH ROW EXECUTE FUNCTION audit_log_append_only()"
        )
    else:
        for name in ("audit_log_no_update", "audit_log_no_delete"):
            op.execute(f"CREATE TRIGGER {name} {SQLITE_TRIGGERS[name]}")
