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
) -> int:
    """INSERT the rows (values in `columns` order) in the session's transaction; the columns
    named in `json_text` get JSON text. Returns how many rows were inserted."""
    conn = session.connection()
    dialect = conn.dialect
    postgres = dialect.name == "postgresql"
    mark = "?" if dialect.paramstyle == "qmark" else "%s"
    # the dialect's own processor: a TypeDecorator's bind_processor alone wraps the generic
    # type's, which on SQLite leaves datetimes to the driver (stored "+00:00", not as the ORM does)
    processors = [
        None if name in json_text else table.c[name].type.dialect_impl(dialect).bind_processor(dialect)
        for name in columns
    ]
    marks = [f"CAST({mark} AS jsonb)" if postgres and name in json_text else mark for name in columns]
    one_row = "(" + ", ".join(marks) + ")"
    quote = dialect.identifier_preparer.quote
    head = f"INSERT INTO {quote(table.name)} ({', '.join(quote(name) for name in columns)}) VALUES "
    statements: dict[int, str] = {}
    active = [(i, p) for i, p in enumerate(processors) if p is not None]
    written = 0
    pending: list[Any] = []
    count = 0

    def send() -> None:
        sql = statements.get(count)
        if sql is None:
            sql = statements[count] = head + ", ".join([one_row] * count)
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
