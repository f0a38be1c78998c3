"""How many requests there are per status, rule and connection, without counting the table.

Triggers on approval_requests (migration 0023_request_counts) keep approval_request_counts
in the same transaction as every insert, status change and delete, so what this reads is
exact: the count a `count(*)` over approval_requests would give in the same snapshot. On
SQLite each key has one row; on PostgreSQL each writing statement appends a delta row per
key it changed (no shared row to wait for), and `compact` folds them into one row per key.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Select, func, select, text
from sqlalchemy.orm import Session

from connector.storage.db import transaction
from connector.storage.models import APPROVAL_REQUEST_COUNTS as COUNTS

if TYPE_CHECKING:
    from connector.runtime import Runtime


def count_requests(
    conn: Connection | Session,
    statuses: Collection[str] = (),
    rule: str | None = None,
    connection: str | None = None,
) -> int:
    """Requests with one of these statuses (any if none), of this rule and this connection (any if None)."""
    return int(conn.scalar(count_query(statuses, rule, connection)) or 0)


def count_query(
    statuses: Collection[str] = (), rule: str | None = None, connection: str | None = None
) -> Select[Any]:
    """The statement `count_requests` runs (for a caller that puts it in one of its own)."""
    query = select(func.coalesce(func.sum(COUNTS.c.n), 0))
    if statuses:
        query = query.where(COUNTS.c.status.in_(statuses))
    if rule is not None:
        query = query.where(COUNTS.c.rule_name == rule)
    if connection is not None:
        query = query.where(COUNTS.c.connection == connection)
    return query


def compact(session: Session) -> int:
    """Fold each key's delta rows into one row (dropping keys that count nothing); the rows
    folded. PostgreSQL only: SQLite's triggers keep one row per key already.

    Safe beside writers and another compaction: the DELETE takes the rows its snapshot sees
    (a concurrent compaction's rows are skipped once it commits), and re-inserts their sum
    in the same statement; rows written meanwhile stay as they are."""
    if session.get_bind().dialect.name != "postgresql":
        return 0
    key = "status, rule_name, connection"
    folded = session.execute(
        text(
            f"WITH gone AS (DELETE FROM approval_request_counts WHERE ({key}) IN ("
            f"SELECT {key} FROM approval_request_counts GROUP BY {key} HAVING count(*) > 1 OR sum(n) = 0"
            f") RETURNING {key}, n), "
            f"kept AS (INSERT INTO approval_request_counts ({key}, n) "
            f"SELECT {key}, sum(n) FROM gone GROUP BY {key} HAVING sum(n) <> 0) "
            "SELECT count(*) FROM gone"
        )
    ).scalar_one()
    return int(folded)


def sweep(runtime: Runtime) -> None:
    """The worker's sweep job: `compact` in its own short transaction. Upkeep, not work: it
    reports nothing, so the sweep's log line stays about what happened to requests."""
    with transaction(runtime.sessions) as session:
        compact(session)
