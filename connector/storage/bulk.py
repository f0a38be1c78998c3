"""Multi-row INSERTs of plain tuples, for writers of thousands of rows (set-based expiry).

SQLAlchemy's executemany processes every parameter of every row in Python; here each
column's own bind processor is applied (so dates are stored exactly as the ORM stores
them) and JSON columns take text the caller serialised once, cast to jsonb on PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from typing import Any

from sqlalchemy import Table
from sqlalchemy.orm import Session

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
    value there is taken is skipped (`ON CONFLICT (column) DO NOTHING`). Returns how many
    rows were sent."""
    conn = session.connection()
    dialect = conn.dialect
    postgres = dialect.name == "postgresql"
    mark = "?" if dialect.paramstyle == "qmark" else "%s"
    processors = [
        None if name in json_text else table.c[name].type.bind_processor(dialect) for name in columns
    ]
    marks = [f"CAST({mark} AS jsonb)" if postgres and name in json_text else mark for name in columns]
    one_row = "(" + ", ".join(marks) + ")"
    quote = dialect.identifier_preparer.quote
    head = f"INSERT INTO {quote(table.name)} ({', '.join(quote(name) for name in columns)}) VALUES "
    tail = f" ON CONFLICT ({quote(ignore_conflicts_on)}) DO NOTHING" if ignore_conflicts_on else ""
    statements: dict[int, str] = {}
    active = [(i, p) for i, p in enumerate(processors) if p is not None]
    written = 0
    pending: list[Any] = []
    count = 0

    def send() -> None:
        sql = statements.get(count)
        if sql is None:
            sql = statements[count] = head + ", ".join([one_row] * count) + tail
        conn.exec_driver_sql(sql, tuple(pending))

    for row in rows:
        if active:
            row = list(row)
            for i, process in active:
                row[i] = process(row[i])
        pending.extend(row)
        count += 1
        if count == batch:
            send()
            written += count
            pending, count = [], 0
    if count:
        send()
        written += count
    return written


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
    processors = [(i, p) for i, name in enumerate(names) if (p := table.c[name].type.bind_processor(dialect))]
    quote = dialect.identifier_preparer.quote
    target = quote(table.name)
    sets = [f"{quote(name)} = v.{alias}" for name, alias in zip(columns, aliases[len(keys) :], strict=True)]
    sets += [f"{quote(name)} = NULL" for name in nulls]
    where = " AND ".join(
        f"{target}.{quote(name)} = v.{alias}" for name, alias in zip(keys, aliases, strict=False)
    )
    one_row = "(" + ", ".join([mark] * len(names)) + ")"
    statements: dict[int, str] = {}
    updated = 0
    pending: list[Any] = []
    count = 0

    def send() -> int:
        sql = statements.get(count)
        if sql is None:
            sql = statements[count] = (
                f"UPDATE {target} SET {', '.join(sets)} "
                f"FROM (VALUES {', '.join([one_row] * count)}) AS {values_as} WHERE {where}"
            )
        return int(conn.exec_driver_sql(sql, tuple(pending)).rowcount)

    for row in rows:
        if processors:
            row = list(row)
            for i, process in processors:
                row[i] = process(row[i])
        pending.extend(row)
        count += 1
        if count == batch:
            updated += send()
            pending, count = [], 0
    if count:
        updated += send()
    return updated
