"""Database engine and sessions (SQLAlchemy 2). SQLite by default, PostgreSQL via DATABASE_URL."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, Connection, DateTime, Engine, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.types import TypeDecorator

from connector.events import utcnow


class Base(DeclarativeBase):
    pass


class UTCDateTime(TypeDecorator[Any]):
    """Always aware UTC in Python, whatever the backend keeps (SQLite keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        from datetime import UTC

        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


JSONType = JSON().with_variant(postgresql.JSONB(), "postgresql")


def normalize_url(url: str) -> str:
    """Accept postgres:// and postgresql:// (as hosts hand them out) and use psycopg 3."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def make_engine(url: str) -> Engine:
    url = normalize_url(url)
    if url.startswith("sqlite"):
        _ensure_sqlite_dir(url)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        _make_sqlite_transactions_immediate(engine)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def _ensure_sqlite_dir(url: str) -> None:
    path = url.split("///", 1)[-1]
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)


def _make_sqlite_transactions_immediate(engine: Engine) -> None:
    """pysqlite's deferred BEGIN lets two writers read the same pending row; take the
    write lock at BEGIN instead (the SQLAlchemy-documented recipe), and use WAL so
    readers never block the webhook intake."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    # Threads of one process queue on this lock instead of in SQLite's busy handler,
    # which sleeps in growing steps (up to 100 ms) and wrecks tail latency under load.
    writer = threading.RLock()  # re-entrant: a nested session in one thread must not deadlock

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        writer.acquire()
        try:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        except BaseException:
            writer.release()
            raise

    @event.listens_for(engine, "commit")
    @event.listens_for(engine, "rollback")
    def _on_end(_conn: Any) -> None:
        with suppress(RuntimeError):  # a rollback of a transaction this thread never began
            writer.release()


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any exception."""
    with factory() as session, session.begin():
        yield session


def insert_ignoring_conflicts(
    conn: Connection | Session, table: Any, rows: list[dict[str, Any]], key: str
) -> set[Any]:
    """INSERT ... ON CONFLICT (key) DO NOTHING; returns the keys of the rows that were new."""
    if not rows:
        return set()
    dialect = conn.get_bind().dialect.name if isinstance(conn, Session) else conn.dialect.name
    module: Any = postgresql if dialect == "postgresql" else sqlite
    # Rows go as parameters, not .values(rows), so the compiled statement is cached;
    # RETURNING counts reliably on both backends (psycopg reports rowcount -1 here).
    stmt = module.insert(table).on_conflict_do_nothing(index_elements=[key]).returning(table.c[key])
    return set(conn.execute(stmt, rows).scalars().all())


__all__ = [
    "Base",
    "JSONType",
    "UTCDateTime",
    "insert_ignoring_conflicts",
    "make_engine",
    "make_session_factory",
    "transaction",
    "utcnow",
]
