"""The webhook hot path's database write: one group-commit batch in one transaction, on a
connection kept for it, at the driver level.

Profiled (docs/benchmarks.md, bench/ingest), SQLAlchemy's per-statement machinery (pool
checkout and pre-ping, events, execution context, result objects) cost more CPU than the
rest of a delivery put together, and on PostgreSQL each step was its own round trip. Here
the SQL is compiled by SQLAlchemy once per dialect, values go through the columns' own bind
processors (so rows are stored exactly as the ORM stores them), and a batch is:

- SQLite: the writer lock every SQLite writer takes (`db.writer_lock`), BEGIN IMMEDIATE, one
  multi-row INSERT per SQLITE_CHUNK events (in-process calls, no round trips), COMMIT (the
  WAL fsync);
- PostgreSQL: the whole batch as one statement on an autocommit connection (the rows as one
  JSON parameter, `_PostgresBatch`): one round trip, its implicit transaction committed
  before the answer comes back, the stored hashes it may need read in the same statement.

Only the group-commit leader writes, one batch at a time, so one connection per process is
enough. A commit still returns only once the database has made the batch durable
(`synchronous=FULL` on SQLite, `synchronous_commit` on PostgreSQL): acknowledged means on disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from sqlalchemy import Engine, bindparam, event, select
from sqlalchemy.dialects import postgresql, sqlite

from connector.storage.db import writer_lock
from connector.storage.models import InboxEvent

COLUMNS = (
    "dedupe_key",
    "source",
    "connection",
    "object_type",
    "record_id",
    "event_id",
    "change_type",
    "changed_fields",
    "values",
    "origin",
    "values_signed",
    "occurred_at",
    "received_at",
    "status",
    "attempts",
    "content_hash",
    "modified_by",
)
# Rows per SQLite INSERT: 58 rows of 17 parameters stay within 999, the smallest limit on
# parameters a SQLite build may have (SQLITE_MAX_VARIABLE_NUMBER; 32,766 since 3.32).
SQLITE_CHUNK = 999 // len(COLUMNS)


class InboxWriter:
    """Writes rows of `inbox_events` (dicts with every key of COLUMNS), ignoring those whose
    dedupe_key is stored already; tells which keys were new and the stored content hashes of
    the keys it is asked about. Not thread-safe: the group-commit leader is its only user."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.dialect = engine.dialect
        self.postgres = self.dialect.name == "postgresql"
        table = InboxEvent.__table__
        module: Any = postgresql if self.postgres else sqlite
        insert = module.insert(table).on_conflict_do_nothing(index_elements=["dedupe_key"])
        self._insert = _Compiled(insert.returning(table.c.dedupe_key), self.dialect, COLUMNS)  # SQLite
        self._lookup = _Compiled(
            select(table.c.content_hash).where(table.c.dedupe_key == bindparam("dedupe_key")),
            self.dialect,
            ("dedupe_key",),
        )
        if self.postgres:
            self._batch = _PostgresBatch(self.dialect)
        self._writer = writer_lock(engine)
        self._connection: Any = None
        self._driver: Any = None
        self._connection_pid = 0
        self._inherited: list[Any] = []
        self._pid_lock = threading.Lock()
        # Runtime.close() disposes of the engine: the kept connection goes with it.
        event.listen(engine, "engine_disposed", lambda _engine: self.close())

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        """The writer's turn: on SQLite the lock every writer takes (threads of this process and
        other processes alike); nothing on PostgreSQL, where batches commit side by side.
        `write` takes it too (it is re-entrant): the group-commit leader takes it first and
        only then collects its batch, so that what arrived while another process was
        committing goes into this commit instead of waiting for the next one."""
        if self._writer is None:
            yield
            return
        self._writer.acquire()
        try:
            yield
        finally:
            self._writer.release()

    def write(
        self, rows: Sequence[dict[str, Any]], hashes_of: Callable[[set[str]], set[str]]
    ) -> tuple[set[str], dict[str, str | None]]:
        """Insert `rows` in one transaction. `hashes_of(new_keys)` names the keys whose stored
        content hash the caller needs (read in the same transaction; on PostgreSQL in the same
        statement, and afresh for a key another process committed meanwhile). Returns the new
        keys and those hashes."""
        connection = self._connect()
        if self.postgres:
            return self._write_postgres(connection, rows, hashes_of)
        try:
            if self._writer is not None:
                self._writer.acquire()
            try:
                cursor = connection.cursor()
                try:
                    cursor.execute("BEGIN IMMEDIATE")
                    new_keys = self._insert_rows(cursor, rows)
                    stored: dict[str, str | None] = {}
                    for key in hashes_of(new_keys):
                        cursor.execute(self._lookup.sql, self._lookup.params({"dedupe_key": key}))
                        found = cursor.fetchone()
                        if found is not None:
                            stored[key] = found[0]
                    connection.commit()
                finally:
                    cursor.close()
            except BaseException:
                _rollback_quietly(connection)
                raise
            finally:
                if self._writer is not None:
                    self._writer.release()
        except self.dialect.loaded_dbapi.Error as exc:
            if self.dialect.is_disconnect(exc, connection, None):
                self._drop()  # the next batch connects afresh (a restarted database)
            raise
        return new_keys, stored

    def _write_postgres(
        self, connection: Any, rows: Sequence[dict[str, Any]], hashes_of: Callable[[set[str]], set[str]]
    ) -> tuple[set[str], dict[str, str | None]]:
        """The batch as ONE statement on an autocommit connection: one round trip, and its
        implicit transaction is committed (durably, with synchronous_commit) before the answer
        comes back; a failed statement leaves nothing. It inserts the rows and reads the stored
        hashes of the keys that may be needed as they were before it (its snapshot)."""
        written = {row["dedupe_key"]: row["content_hash"] for row in rows}
        try:
            with connection.cursor() as cursor:
                if not rows:
                    return set(), {}
                # hashes_of(no new key) names every key whose hash could be asked for
                cursor.execute(self._batch.sql, self._batch.params(rows, hashes_of(set())))
                found = cursor.fetchall()
                new_keys = {key for key, _hash, new in found if new}
                before = {key: content_hash for key, content_hash, new in found if not new}
                stored: dict[str, str | None] = {}
                for key in hashes_of(new_keys):
                    if key in new_keys:  # written just now by another delivery of this batch
                        stored[key] = written[key]
                    elif key in before:
                        stored[key] = before[key]
                    else:  # committed by another process after this statement's snapshot
                        cursor.execute(self._lookup.sql, self._lookup.params({"dedupe_key": key}))
                        again = cursor.fetchone()
                        if again is not None:
                            stored[key] = again[0]
        except self.dialect.loaded_dbapi.Error as exc:
            if self.dialect.is_disconnect(exc, connection, None):
                self._drop()  # the next batch connects afresh (a restarted database)
            raise
        return new_keys, stored

    def _insert_rows(self, cursor: Any, rows: Sequence[dict[str, Any]]) -> set[str]:
        """SQLite: the rows as multi-row INSERTs of up to SQLITE_CHUNK rows each (one statement
        for any batch a server gathers), instead of one statement per row: sqlite3 prepares,
        steps and resets one statement and builds one result per chunk, not per row."""
        new_keys: set[str] = set()
        params = self._insert.params
        for start in range(0, len(rows), SQLITE_CHUNK):
            chunk = rows[start : start + SQLITE_CHUNK]
            values: list[Any] = []
            for row in chunk:
                values += params(row)
            cursor.execute(self._insert.sql_for(len(chunk)), values)
            new_keys.update(key for (key,) in cursor.fetchall())
        return new_keys

    def _connect(self) -> Any:
        # A connection opened before a fork belongs to the parent: open our own (gunicorn
        # builds the app after forking, but a test or a tool may not).
        with self._pid_lock:
            if self._connection is not None and self._connection_pid != os.getpid():
                # Kept, never used or closed here: letting it be collected would have the pool
                # roll it back, on a socket the parent still uses.
                self._inherited.append(self._connection)
                self._connection = None
            if self._connection is None:
                # From the engine's pool, so its connect-time settings apply (WAL, FULL sync,
                # busy time-out on SQLite); kept checked out for the life of the process.
                fairy = self.engine.raw_connection()
                driver: Any = fairy.driver_connection
                if self.postgres:  # each batch is one statement, its own transaction
                    # Out of the pool for good, so never handed back to it in autocommit;
                    # `_drop` closes it.
                    fairy.detach()
                    driver.rollback()  # whatever the pool's checks left open
                    driver.autocommit = True
                self._connection, self._driver = fairy, driver
                self._connection_pid = os.getpid()
            return self._driver

    def _drop(self) -> None:
        with self._pid_lock:
            if self._connection is not None and self._connection_pid == os.getpid():
                if self.postgres:  # detached from the pool: closed here
                    with contextlib.suppress(Exception):
                        self._driver.close()
                else:
                    self._connection.invalidate()  # closes it
            elif self._connection is not None:
                self._inherited.append(self._connection)  # a parent's: left alone, as in _connect
            self._connection = None

    def close(self) -> None:
        self._drop()


class _Compiled:
    """A statement compiled once for a dialect: its SQL and a function from a row (by column
    name) to the driver's parameters, through each column type's bind processor."""

    def __init__(self, statement: Any, dialect: Any, names: Sequence[str]) -> None:
        compiled = statement.compile(dialect=dialect, column_keys=list(names))
        self.sql = str(compiled)
        self._by_rows: dict[int, str] = {1: self.sql}
        table = InboxEvent.__table__
        processors = {
            name: table.c[name].type.dialect_impl(dialect).bind_processor(dialect) for name in names
        }
        # qmark (sqlite3) takes a tuple in the compiled order; pyformat (psycopg) a dict.
        self._positional = compiled.positiontup is not None and dialect.positional
        order = list(compiled.positiontup or names) if self._positional else list(names)
        self._steps = tuple((name, processors[name]) for name in order)

    def sql_for(self, rows: int) -> str:
        """An INSERT's SQL with `rows` rows of values (its one VALUES group repeated), made once
        per row count; the rows' parameters follow one another in that order."""
        sql = self._by_rows.get(rows)
        if sql is None:
            head, values, tail = self.sql.partition(" VALUES ")
            group, close, rest = tail.partition(")")
            assert values and close and "(" not in group[1:], self.sql  # INSERT ... VALUES (?, ...) ...
            sql = self._by_rows[rows] = head + values + ", ".join([group + close] * rows) + rest
        return sql

    def params(self, row: dict[str, Any]) -> Any:
        # Once per event on the webhook hot path: one pass, straight into what the driver takes.
        if self._positional:
            return tuple(
                [row[name] if process is None else process(row[name]) for name, process in self._steps]
            )
        return {name: row[name] if process is None else process(row[name]) for name, process in self._steps}


class _PostgresBatch:
    """PostgreSQL: a whole batch in one statement with two parameters, the rows as one JSON
    array and the keys asked about, so one SQL text (prepared by psycopg after a few uses)
    serves every batch size and the driver adapts two values, not seventeen per row. Each
    column is taken out of the JSON as its type: text as text (its column's width still
    checked on assignment), JSON columns as jsonb (None as JSON null, as the ORM writes it),
    timestamps (UTC, through the column's bind processor) as timestamptz. It returns each
    new key, then (key, stored hash) for the keys asked about that were stored before it."""

    def __init__(self, dialect: Any) -> None:
        table = InboxEvent.__table__
        selected = []
        self._times = []
        for name in COLUMNS:
            kind = table.c[name].type.compile(dialect=dialect)
            if kind == "JSONB":
                selected.append(f"r->'{name}'")
            elif kind.startswith("VARCHAR"):
                selected.append(f"r->>'{name}'")
            else:  # BOOLEAN, INTEGER, TIMESTAMP WITH TIME ZONE
                selected.append(f"(r->>'{name}')::{kind}")
            if kind.startswith("TIMESTAMP"):
                self._times.append((name, table.c[name].type.dialect_impl(dialect).bind_processor(dialect)))
        columns = ", ".join(f'"{name}"' for name in COLUMNS)
        self.sql = (
            "WITH new AS ("
            f"INSERT INTO inbox_events ({columns}) SELECT {', '.join(selected)} "
            "FROM jsonb_array_elements(%(rows)s::jsonb) WITH ORDINALITY AS batch(r, position) "
            "ORDER BY position ON CONFLICT (dedupe_key) DO NOTHING RETURNING dedupe_key) "
            "SELECT dedupe_key, NULL::varchar, true FROM new UNION ALL "
            "SELECT dedupe_key, content_hash, false FROM inbox_events WHERE dedupe_key = ANY(%(asked)s)"
        )

    def params(self, rows: Sequence[dict[str, Any]], asked: set[str]) -> dict[str, Any]:
        out = []
        for row in rows:
            row = dict(row)
            for name, process in self._times:
                value = row[name] if process is None else process(row[name])
                row[name] = None if value is None else value.isoformat()
            out.append(row)
        return {"rows": json.dumps(out), "asked": sorted(asked)}


def _rollback_quietly(connection: Any) -> None:
    with contextlib.suppress(Exception):  # the connection may be gone; the error raised says why
        connection.rollback()
