"""The rows of requests opened while a batch of inbox events is applied, written together.

Opening a request writes a request row, its steps, history, assignee and waiting rows, an
outbox row per write-back action and a notification per recipient: one by one, each an ORM
flush, that was about ten statements per event. While a batch is applied
(connector/storage/inbox_batch.py calls the processor's `preload`, which calls `start`),
`approval_store.save`, `outbox.enqueue_update(later=True)` and the notification queue hand
the rows of each NEW request here instead, and they are written as one multi-row INSERT per
table (connector/storage/bulk.py).

Nothing can tell: the rows are written before the session runs any other statement (a
`do_orm_execute` hook), before any ORM flush writes something and before the commit, so
every read in the transaction sees them, as it would have seen them one by one. Outbox rows
take their records' locks (`outbox.lock_records`) and skip idempotency keys already used,
notifications skip dedupe keys already queued, both in one statement per table. A savepoint
must not start with rows waiting (its rollback would take them along): `before_savepoint`
writes them, and a savepoint started without it fails the batch, which the inbox then
applies one event at a time, where nothing is buffered.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import Table, event, select
from sqlalchemy.orm import ORMExecuteState, Session, SessionTransaction

from connector.storage.bulk import insert_rows

_KEY = "batch_writes"


@dataclass
class BatchWrites:
    """Rows waiting to be written, per table in the order first used (requests before their
    children, as the ORM would order them)."""

    transaction: SessionTransaction
    tables: dict[str, tuple[Table, list[dict[str, Any]]]] = field(default_factory=dict)
    outbox_keys: set[str] = field(default_factory=set)  # idempotency keys buffered
    notification_keys: set[str] = field(default_factory=set)  # dedupe keys buffered
    written: int = 0  # rows written so far (tests and the bench read it)

    def add(self, table: Any, row: Mapping[str, Any]) -> None:
        entry = self.tables.get(table.name)
        if entry is None:
            entry = self.tables[table.name] = (cast(Table, table), [])
        entry[1].append(dict(row))

    def __bool__(self) -> bool:
        return any(rows for _table, rows in self.tables.values())


def start(session: Session) -> BatchWrites:
    """Buffer the rows of new requests until the session's next statement (the caller's
    transaction must be open: the buffer belongs to it and ends with it)."""
    pending = BatchWrites(session.get_transaction() or session.begin())
    session.info[_KEY] = pending
    return pending


def of(session: Session) -> BatchWrites | None:
    """The buffer to add rows to, or None: write them at once (no batch, or in a savepoint)."""
    pending: BatchWrites | None = session.info.get(_KEY)
    if pending is None or session.in_nested_transaction():
        return None
    if pending.transaction is not session.get_transaction():
        session.info.pop(_KEY, None)  # left over from a transaction that ended
        return None
    return pending


def add(session: Session, table: Any, rows: Iterable[Mapping[str, Any]]) -> bool:
    """Buffer `rows` of `table` when a batch is buffering; False (nothing done) otherwise."""
    pending = of(session)
    if pending is None:
        return False
    for row in rows:
        pending.add(table, row)
    return True


def add_outbox(session: Session, row: Mapping[str, Any]) -> bool:
    """Buffer an outbox row (its idempotency key is checked when written); False when no
    batch is buffering or the key is already buffered."""
    from connector.storage.models import OutboxUpdate

    pending = of(session)
    if pending is None:
        return False
    key = row.get("idempotency_key")
    if key is not None:
        if key in pending.outbox_keys:
            return False
        pending.outbox_keys.add(key)
    pending.add(OutboxUpdate.__table__, row)
    return True


def add_notification(session: Session, row: Mapping[str, Any]) -> bool | None:
    """Buffer a notification row: True when buffered, False when its dedupe key already is,
    None when no batch is buffering (queue it the usual way)."""
    from connector.notify.models import Notification

    pending = of(session)
    if pending is None:
        return None
    if row["dedupe_key"] in pending.notification_keys:
        return False
    pending.notification_keys.add(row["dedupe_key"])
    pending.add(Notification.__table__, row)
    return True


def write(session: Session) -> int:
    """Write the buffered rows now (the hooks below call this); returns how many."""
    pending: BatchWrites | None = session.info.get(_KEY)
    if not pending:
        return 0
    tables, pending.tables = pending.tables, {}
    outbox_keys, pending.outbox_keys = pending.outbox_keys, set()
    notification_keys, pending.notification_keys = pending.notification_keys, set()
    written = 0
    for name, (table, rows) in tables.items():
        if name == "outbox_updates":
            rows = _new_outbox_rows(session, rows, outbox_keys)
        elif name == "notifications":
            rows = _new_notification_rows(session, rows, notification_keys)
        written += _insert(session, table, rows)
    pending.written += written
    return written


def before_savepoint(session: Session) -> None:
    """Call before `session.begin_nested()` in code that may run within a batch."""
    write(session)


def _new_outbox_rows(session: Session, rows: list[dict[str, Any]], keys: set[str]) -> list[dict[str, Any]]:
    from connector.storage.models import OutboxUpdate
    from connector.storage.outbox import lock_records

    lock_records(session, {(r["connection"], r["object_type"], r["record_id"]) for r in rows})
    used = _existing(session, OutboxUpdate.__table__.c.idempotency_key, keys)
    return [r for r in rows if r.get("idempotency_key") not in used]


def _new_notification_rows(
    session: Session, rows: list[dict[str, Any]], keys: set[str]
) -> list[dict[str, Any]]:
    from connector.notify.models import Notification

    used = _existing(session, Notification.__table__.c.dedupe_key, keys)
    return [r for r in rows if r["dedupe_key"] not in used]


def _existing(session: Session, column: Any, keys: set[str]) -> set[str]:
    found: set[str] = set()
    ordered = sorted(keys)
    for start in range(0, len(ordered), 500):
        found.update(session.scalars(select(column).where(column.in_(ordered[start : start + 500]))))
    return found


def _insert(session: Session, table: Table, rows: list[dict[str, Any]]) -> int:
    """Multi-row INSERTs, one per shape of row; Python-side column defaults are filled in
    as the ORM would, JSON columns serialised as the JSON type does (json.dumps)."""
    by_shape: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    defaults = [(c.name, c.default) for c in table.columns if c.default is not None]
    for row in rows:
        for name, default in defaults:
            if name not in row:
                arg = default.arg  # type: ignore[attr-defined]
                row[name] = arg(None) if default.is_callable else arg
        by_shape.setdefault(tuple(row), []).append(row)
    written = 0
    for columns, same in by_shape.items():
        json_columns = [name for name in columns if _is_json(table, name)]
        # None in a JSON column is JSON null unless the type says SQL NULL, as the ORM stores it
        sql_null = {name for name in json_columns if table.c[name].type.none_as_null}  # type: ignore[attr-defined]
        values = (
            [_json(row[name], name in sql_null) if name in json_columns else row[name] for name in columns]
            for row in same
        )
        written += insert_rows(session, table, columns, values, json_text=json_columns)
    return written


def _json(value: Any, none_as_null: bool) -> str | None:
    return None if value is None and none_as_null else json.dumps(value)


def _is_json(table: Table, name: str) -> bool:
    from sqlalchemy import JSON

    return isinstance(table.c[name].type, JSON)


# --- hooks: the rows are in the database before anything could look for them --------------


@event.listens_for(Session, "do_orm_execute")
def _before_statement(state: ORMExecuteState) -> None:
    write(state.session)


@event.listens_for(Session, "before_flush")
def _before_flush(session: Session, _context: Any, _instances: Any) -> None:
    write(session)


@event.listens_for(Session, "before_commit")
def _before_commit(session: Session) -> None:
    if not session.in_nested_transaction():
        write(session)


@event.listens_for(Session, "after_transaction_create")
def _savepoint_started(session: Session, transaction: SessionTransaction) -> None:
    pending: BatchWrites | None = session.info.get(_KEY)
    if transaction.nested and pending:
        raise RuntimeError(
            "a savepoint began with rows of the batch still buffered: call "
            "batch_writes.before_savepoint(session) before session.begin_nested()"
        )


@event.listens_for(Session, "after_transaction_end")
def _forget(session: Session, transaction: SessionTransaction) -> None:
    pending: BatchWrites | None = session.info.get(_KEY)
    if pending is not None and transaction is pending.transaction:
        session.info.pop(_KEY, None)  # committed (written) or rolled back (dropped)
