"""Multi-row INSERTs of plain tuples, for writers of thousands of rows (set-based expiry).

SQLAlchemy's executemany processes every parameter of every row in Python; here each
column's own bind processor is applied (so dates are stored exactly as the ORM stores
them) and JSON columns take text the caller serialised once, cast to jsonb on PostgreSQL.
Bulk rows repeat their moments (a sweep stamps thousands of rows with one `created_at`), so a
date column's processing, and on SQLite the driver's adapter, runs once per distinct value.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Table
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from sqlalchemy.types import Date, DateTime

BATCH = 500  # rows per statement: 500 x 12 columns stays under SQLite's 32,766 parameters


def insert_rows(
    session: Session,
    table: Table,
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    json_text: Collection[str] = (),
    batch: int = BATCH,
    ignore_conflicts_on: str | None = None,
) -> int:
    """INSERT the rows (values in `columns` order) in the session's transaction; the columns
    named in `json_text` get JSON text. `ignore_conflicts_on`: a unique column; a row whose
    value there is taken is skipped (`ON CONFLICT (column) DO NOTHING`). `batch` rows per
    statement on SQLite; PostgreSQL takes them all in one COPY, unless conflicts are to be
    skipped. Returns how many rows were sent."""
    conn = session.connection()
    dialect = conn.dialect
    postgres = dialect.name == "postgresql"
    active = _processors(table, columns, dialect, json_text)
    if postgres and not ignore_conflicts_on:  # COPY has no ON CONFLICT: those take the INSERT below
        return _copy(conn, table, columns, rows, active)
    mark = "?" if dialect.paramstyle == "qmark" else "%s"
    marks = [f"CAST({mark} AS jsonb)" if postgres and name in json_text else mark for name in columns]
    one_row = "(" + ", ".join(marks) + ")"
    quote = dialect.identifier_preparer.quote
    head = f"INSERT INTO {quote(table.name)} ({', '.join(quote(name) for name in columns)}) VALUES "
    tail = f" ON CONFLICT ({quote(ignore_conflicts_on)}) DO NOTHING" if ignore_conflicts_on else ""
    statements: dict[int, str] = {}

    def send(count: int, params: list[Any]) -> int:
        sql = statements.get(count)
        if sql is None:
            sql = statements[count] = head + ", ".join([one_row] * count) + tail
        conn.exec_driver_sql(sql, tuple(params))
        return count

    return _in_batches(rows, active, batch, send)


def update_rows(
    session: Session,
    table: Table,
    keys: Sequence[str],
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    nulls: Sequence[str] = (),
    batch: int = BATCH,
) -> int:
    """UPDATE many rows, each to its own values, with one statement per `batch` rows:
    `UPDATE table SET column = v.columnN ... FROM (VALUES ...) AS v WHERE each key column =
    v.columnK` (the columns in `nulls` are set to NULL). A row's values: its `keys`, then
    its `columns`; a key column may also be a column (a version check and its bump). Values
    go through each column's bind processor, as in `insert_rows`. Returns the rows updated."""
    conn = session.connection()
    dialect = conn.dialect
    mark = "?" if dialect.paramstyle == "qmark" else "%s"
    names = [*keys, *columns]
    aliases = [f"column{i}" for i in range(1, len(names) + 1)]  # SQLite's names for VALUES columns
    # PostgreSQL names them column1... too, but only a derived table's column list makes them visible
    values_as = "v" if dialect.name == "sqlite" else f"v({', '.join(aliases)})"
    processors = _processors(table, names, dialect)
    quote = dialect.identifier_preparer.quote
    target = quote(table.name)
    sets = [f"{quote(name)} = v.{alias}" for name, alias in zip(columns, aliases[len(keys) :], strict=True)]
    sets += [f"{quote(name)} = NULL" for name in nulls]
    where = " AND ".join(
        f"{target}.{quote(name)} = v.{alias}" for name, alias in zip(keys, aliases, strict=False)
    )
    one_row = "(" + ", ".join([mark] * len(names)) + ")"
    statements: dict[int, str] = {}

    def send(count: int, params: list[Any]) -> int:
        sql = statements.get(count)
        if sql is None:
            sql = statements[count] = (
                f"UPDATE {target} SET {', '.join(sets)} "
                f"FROM (VALUES {', '.join([one_row] * count)}) AS {values_as} WHERE {where}"
            )
        return int(conn.exec_driver_sql(sql, tuple(params)).rowcount)

    return _in_batches(rows, processors, batch, send)


def _in_batches(
    rows: Iterable[Sequence[Any]],
    processors: Sequence[tuple[int, Callable[[Any], Any]]],
    batch: int,
    send: Callable[[int, list[Any]], int],
) -> int:
    """Each row's values through their processors, `batch` rows at a time handed to `send` as
    one flat parameter list (with the row count); returns the sum of what `send` returned."""
    total = 0
    pending: list[Any] = []
    count = 0
    for row in _processed(rows, processors):
        pending.extend(row)
        count += 1
        if count == batch:
            total += send(count, pending)
            pending, count = [], 0
    if count:
        total += send(count, pending)
    return total


def _processed(
    rows: Iterable[Sequence[Any]], processors: Sequence[tuple[int, Callable[[Any], Any]]]
) -> Iterator[Sequence[Any]]:
    """Each row with the values at the processors' positions put through them."""
    if not processors:
        yield from rows
        return
    for row in rows:
        values = list(row)
        for i, process in processors:
            values[i] = process(values[i])
        yield values


def _copy(
    conn: Connection,
    table: Table,
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    processors: Sequence[tuple[int, Callable[[Any], Any]]],
) -> int:
    """PostgreSQL: the rows as one `COPY ... FROM STDIN` (psycopg writes each row in C). A
    multi-row INSERT of 500 rows' parameters cost five times as much (parsing thousands of
    parameters, adapting each): 100 us a row against 20 for notifications. Insert triggers
    fire for COPY as for INSERT (the audit chain's statement-level check runs once)."""
    quote = conn.dialect.identifier_preparer.quote
    sql = f"COPY {quote(table.name)} ({', '.join(quote(name) for name in columns)}) FROM STDIN"
    driver = conn.connection.driver_connection
    assert driver is not None
    error = conn.dialect.loaded_dbapi.Error
    written = 0
    try:
        with driver.cursor() as cursor, cursor.copy(sql) as copy:
            for row in _processed(rows, processors):
                copy.write_row(row)
                written += 1
    except error as err:  # as SQLAlchemy raises the driver's errors for statements it runs
        raise DBAPIError.instance(sql, None, err, error) from err
    return written


def _processors(
    table: Table, names: Sequence[str], dialect: Any, json_text: Collection[str] = ()
) -> list[tuple[int, Callable[[Any], Any]]]:
    """(position, processor) of the columns whose values need processing (JSON text is given
    ready)."""
    return [
        (i, process)
        for i, name in enumerate(names)
        if name not in json_text and (process := _processor(table.c[name].type, dialect)) is not None
    ]


def _processor(type_: Any, dialect: Any) -> Callable[[Any], Any] | None:
    """The column's bind processor; for dates, memoised per distinct value and, on SQLite,
    followed by the adapter the driver would apply to the result (once, not per row)."""
    # the dialect's own processor: a TypeDecorator's bind_processor alone wraps the generic
    # type's, which on SQLite leaves datetimes to the driver (stored "+00:00", not as the ORM does)
    process = type_.dialect_impl(dialect).bind_processor(dialect)
    if not isinstance(getattr(type_, "impl", type_), Date | DateTime):
        return process
    adapt = _sqlite_adapter if dialect.name == "sqlite" else None
    if process is None and adapt is None:
        return None
    if adapt is not None and process is not None and _sqlite_utc_text(type_, dialect):
        return _sqlite_utc_datetime(process)  # text already: the driver's adapter leaves it be
    seen: dict[tuple[Any, Any], Any] = {}
    last: list[Any] = [None, None]  # the last value and its result: rows of a batch share one

    def memoised(value: Any) -> Any:
        if value is last[0]:
            return last[1]
        if value is None:
            return None
        # equal moments in other zones are equal datetimes but other text: key by the offset too
        key = (value, value.utcoffset() if isinstance(value, datetime) else None)
        done = seen.get(key)
        if done is None:
            done = process(value) if process is not None else value
            if adapt is not None:
                done = adapt(done)
            if len(seen) >= 4096:  # all different: stay flat
                seen.clear()
            seen[key] = done
        last[0], last[1] = value, done
        return done

    return memoised


_SQLITE_FORMAT = "%04d-%02d-%02d %02d:%02d:%02d.%06d"  # SQLAlchemy's SQLite DATETIME storage format


def _sqlite_utc_text(type_: Any, dialect: Any) -> bool:
    """Whether the column is our UTCDateTime over SQLite's DATETIME with its default storage
    format: its processing is the aware check and `_SQLITE_FORMAT` of the fields."""
    from sqlalchemy.dialects.sqlite import DATETIME

    from connector.storage.db import UTCDateTime

    if type(type_) is not UTCDateTime:
        return False
    inner = type_.dialect_impl(dialect).impl_instance  # type: ignore[attr-defined]  # a TypeDecorator
    return type(inner) is DATETIME and inner._storage_format == DATETIME()._storage_format


def _sqlite_utc_datetime(process: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """UTCDateTime's SQLite bind processing (the aware check, then SQLAlchemy's `%`-format of
    a dict of the fields) with the fields as a tuple: a third of the time. The memo above only
    added a lookup per value for rows whose moments all differ (each opened request stamps
    its own); a sweep's one moment is still formatted once."""
    last: list[Any] = [None, None]

    def formatted(value: Any) -> Any:
        if value is last[0]:
            return last[1]
        if type(value) is not datetime:
            return process(value)  # None, or whatever SQLAlchemy makes of it
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        # stored as UTC's fields, as UTCDateTime stores it
        at = value.astimezone(UTC) if value.utcoffset() else value
        done = _SQLITE_FORMAT % (at.year, at.month, at.day, at.hour, at.minute, at.second, at.microsecond)
        last[0], last[1] = value, done
        return done

    return formatted


def _sqlite_adapter(value: Any) -> Any:
    """What sqlite3 does with a value it is given: its registered adapter for the type."""
    import sqlite3

    adapter = sqlite3.adapters.get((type(value), sqlite3.PrepareProtocol))
    return adapter(value) if adapter is not None else value
