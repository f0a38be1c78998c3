"""audit chain triggers: one conditional UPDATE of the head per row (SQLite), one check per
statement (PostgreSQL)

Revision ID: 0022_audit_fast
Revises: 0018_expiry_api

The guarantee of 0002 stays: an insert into audit_log is refused unless it extends the chain
head (id = head id + 1, prev_hash = head hash), an insert may not replace a row, and the
head advances with every row. What changes is how much work that takes per row, which the
expiry sweep (two entries per approval, millions of rows) paid for:

* SQLite: 0002 fired three triggers per row (read the head twice, look the id up, update the
  head). Now one BEFORE INSERT trigger advances the head with
  `UPDATE ... WHERE last_id = NEW.id - 1 AND last_hash = NEW.prev_hash AND no row has NEW.id`
  and raises when that changed nothing: the check and the advance are one statement.
* PostgreSQL: 0002's per-row PL/pgSQL trigger locked, checked and updated the head once per
  row; within one transaction every update of the head row adds a version the next one walks
  past. Now a statement-level trigger (with the statement's new rows as a transition table)
  locks the head once, checks that the new rows are exactly head + 1, head + 2, ... each
  linking to the one before, and moves the head once to the last. A statement is atomic, so
  a row out of chain still never lands. Replacing a row still fails: `ON CONFLICT DO UPDATE`
  runs the append-only UPDATE trigger, a plain duplicate hits the primary key.

docs/decisions.md, "Audit chain checks per statement", says why this is the same guarantee.
"""

from __future__ import annotations

from alembic import op

revision = "0022_audit_fast"
down_revision = "0018_expiry_api"
branch_labels = None
depends_on = None

APPEND_ONLY = "audit_log is append-only"
HEAD_ID = 1  # connector.storage.audit.HEAD_ID, fixed here as the migration wrote it

SQLITE_OLD = {  # 0002's, restored by downgrade (created in this order, as 0002 did)
    "audit_log_extends_chain": (
        "BEFORE INSERT ON audit_log "
        f"WHEN NEW.id IS NOT (SELECT last_id + 1 FROM audit_chain_head WHERE id = {HEAD_ID}) "
        f"OR NEW.prev_hash IS NOT (SELECT last_hash FROM audit_chain_head WHERE id = {HEAD_ID}) "
        f"BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY}: a new row must extend the chain head "
        "(id = head id + 1, prev_hash = head hash)'); END"
    ),
    "audit_log_no_replace": (
        "BEFORE INSERT ON audit_log WHEN EXISTS (SELECT 1 FROM audit_log WHERE id = NEW.id) "
        f"BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY}: an insert may not replace an existing row'); END"
    ),
    "audit_log_advance_head": (
        "AFTER INSERT ON audit_log BEGIN UPDATE audit_chain_head "
        f"SET last_id = NEW.id, last_hash = NEW.row_hash WHERE id = {HEAD_ID}; END"
    ),
}
# changes() is the row count of the trigger's own UPDATE just before: 0 when the new row
# does not extend the head (or the head row is gone, or the id is taken).
SQLITE_NEW = {
    "audit_log_extends_chain": (
        "BEFORE INSERT ON audit_log BEGIN "
        f"UPDATE audit_chain_head SET last_id = NEW.id, last_hash = NEW.row_hash WHERE id = {HEAD_ID} "
        "AND last_id = NEW.id - 1 AND last_hash = NEW.prev_hash "
        "AND NOT EXISTS (SELECT 1 FROM audit_log WHERE id = NEW.id); "
        f"SELECT RAISE(ABORT, '{APPEND_ONLY}: an insert may not replace an existing row') "
        "WHERE changes() = 0 AND EXISTS (SELECT 1 FROM audit_log WHERE id = NEW.id); "
        f"SELECT RAISE(ABORT, '{APPEND_ONLY}: a new row must extend the chain head "
        "(id = head id + 1, prev_hash = head hash)') WHERE changes() = 0; END"
    ),
}

POSTGRES_OLD_FUNCTION = f"""
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
END"""
POSTGRES_OLD_TRIGGER = "BEFORE INSERT ON audit_log FOR EACH ROW EXECUTE FUNCTION audit_log_extend_chain()"

POSTGRES_NEW_FUNCTION = f"""
DECLARE
    head_id integer;
    head_hash varchar;
    broken integer;
    new_id integer;
    new_hash varchar;
BEGIN
    -- the lock serialises appenders, also ones that bypass the application
    SELECT last_id, last_hash INTO head_id, head_hash FROM audit_chain_head WHERE id = {HEAD_ID} FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION '{APPEND_ONLY}: the chain head row is missing';
    END IF;
    -- in id order, each new row must be the one before it + 1 and link to its hash; the
    -- first, to the head
    SELECT min(id) INTO broken FROM (
        SELECT id, prev_hash,
               lag(id, 1, head_id) OVER w AS before_id,
               lag(row_hash::text, 1, head_hash::text) OVER w AS before_hash
        FROM new_rows WINDOW w AS (ORDER BY id)
    ) AS linked
    WHERE id IS DISTINCT FROM before_id + 1 OR prev_hash IS DISTINCT FROM before_hash;
    IF broken IS NOT NULL THEN
        RAISE EXCEPTION '{APPEND_ONLY}: row % does not extend the chain head (row %)', broken, head_id;
    END IF;
    SELECT id, row_hash INTO new_id, new_hash FROM new_rows ORDER BY id DESC LIMIT 1;
    IF FOUND THEN
        UPDATE audit_chain_head SET last_id = new_id, last_hash = new_hash WHERE id = {HEAD_ID};
    END IF;
    RETURN NULL;
END"""
POSTGRES_NEW_TRIGGER = (
    "AFTER INSERT ON audit_log REFERENCING NEW TABLE AS new_rows "
    "FOR EACH STATEMENT EXECUTE FUNCTION audit_log_extend_chain()"
)


def _postgres() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def upgrade() -> None:
    if _postgres():
        _replace_postgres(POSTGRES_NEW_FUNCTION, POSTGRES_NEW_TRIGGER)
    else:
        for name in SQLITE_OLD:
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
        for name, definition in SQLITE_NEW.items():
            op.execute(f"CREATE TRIGGER {name} {definition}")


def downgrade() -> None:
    if _postgres():
        _replace_postgres(POSTGRES_OLD_FUNCTION, POSTGRES_OLD_TRIGGER)
    else:
        for name in SQLITE_NEW:
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
        for name, definition in SQLITE_OLD.items():
            op.execute(f"CREATE TRIGGER {name} {definition}")


def _replace_postgres(function: str, trigger: str) -> None:
    op.execute("DROP TRIGGER IF EXISTS audit_log_extend_chain ON audit_log")
    op.execute(
        "CREATE OR REPLACE FUNCTION audit_log_extend_chain() RETURNS trigger "
        f"AS $${function}$$ LANGUAGE plpgsql"
    )
    op.execute(f"CREATE TRIGGER audit_log_extend_chain {trigger}")
