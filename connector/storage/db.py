"""Database engine and sessions (SQLAlchemy 2). SQLite by default, PostgreSQL via DATABASE_URL."""

from __future__ import annotations

import gc
import json
import logging
import os
import threading
import weakref
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # not on Windows: SQLite's own busy handler still keeps writers apart
    fcntl = None  # type: ignore[assignment]

from sqlalchemy import (
    JSON,
    Connection,
    DateTime,
    Engine,
    any_,
    bindparam,
    create_engine,
    event,
    func,
    select,
    tuple_,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import InvalidatePoolError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.types import TypeDecorator

from connector.clock import utcnow


class Base(DeclarativeBase):
    pass


_ZERO = timedelta(0)


class UTCDateTime(TypeDecorator[Any]):
    """Always aware UTC in Python, whatever the backend keeps (SQLite keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        # SQLite keeps the fields and no zone, and they are read back as UTC: store UTC's
        return value if value.utcoffset() == _ZERO else value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


JSONType = JSON().with_variant(postgresql.JSONB(), "postgresql")
_DECODE = json.JSONDecoder().raw_decode


def json_loads(data: str | bytes) -> Any:
    """json.loads for the JSON columns' values as the database hands them over: one value with
    nothing around it (as jsonb and json.dumps write it) goes straight to the decoder's C
    scanner, without json.loads' encoding detection and whitespace checks (about 3.2 -> 1.4 µs
    a value; a page of 50 requests decodes 150). Anything else, json.loads as before."""
    try:
        text = data.decode() if isinstance(data, bytes) else data
        value, end = _DECODE(text)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError: json.loads says what is wrong
        return json.loads(data)
    return value if end == len(text) else json.loads(text)


def in_ids(column: Any, dialect: str, ids: Collection[Any] | None = None) -> Any:
    """`column IN (...)` of the given `ids`, or without them of the list given at execution
    as the parameter `ids`. On PostgreSQL `column = ANY(:ids)`: one array parameter, so the
    statement's text is the same for any number of ids (psycopg caches its conversion and
    prepares it, where SQLAlchemy would render an IN list of as many parameters, converted
    anew on every execution once they are over 50)."""
    if dialect == "postgresql":
        array = postgresql.ARRAY(column.type)
        if ids is None:
            return column == any_(bindparam("ids", type_=array))
        return column == any_(bindparam(None, list(ids), type_=array))
    if ids is None:
        return column.in_(bindparam("ids", expanding=True))
    return column.in_(list(ids))


def in_keys(columns: Sequence[Any], keys: Collection[Sequence[Any]], dialect: str) -> Any:
    """`(a, b, ...) IN ((...), ...)` for the given key tuples. On PostgreSQL the keys are one
    array parameter per column, unnested: the same statement text with as many parameters as
    columns for any number of keys, where an IN list of a batch's 50 keys is 150 parameters,
    which psycopg converts anew on every execution (it caches statements of up to 50)."""
    if dialect == "postgresql":
        ordered = list(keys)
        arrays = [
            bindparam(None, [key[n] for key in ordered], type_=postgresql.ARRAY(column.type))
            for n, column in enumerate(columns)
        ]
        names = [f"k{n}" for n in range(len(columns))]
        return tuple_(*columns).in_(select(func.unnest(*arrays).table_valued(*names).render_derived()))
    return tuple_(*columns).in_(list(keys))


_collector = threading.Lock()
_pauses = 0  # sections in progress, over all threads, that paused the collector
_resume = False  # whether the collector was on when the first of them began


@contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while a batch is worked on (an applied chunk of
    inbox events, a claimed batch of timers).

    A batch allocates tens of thousands of objects (ORM rows, requests, outcomes, statement
    parameters) that all live until its commit, so the collections those allocations trigger
    walk them again and again for nothing. Reference counting still frees whatever the batch
    lets go of. The collector is back on when the last section in progress ends (threads may
    overlap theirs), even when it ends with an exception; left off if it was off before the
    first began (the process's own choice)."""
    global _pauses, _resume
    with _collector:
        if _pauses == 0:
            _resume = gc.isenabled()
            gc.disable()
        _pauses += 1
    try:
        yield
    finally:
        with _collector:
            _pauses -= 1
            if _pauses == 0 and _resume:
                gc.enable()


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
        engine = create_engine(
            url, connect_args={"timeout": 30, "check_same_thread": False}, json_deserializer=json_loads
        )
        _make_sqlite_transactions_immediate(engine)
        return engine
    engine = create_engine(url, pool_size=10, max_overflow=20, json_deserializer=json_loads)
    _ping_on_checkout(engine)
    return engine


_UNPINGED = ContextVar("crm_approvals_unpinged_checkout", default=False)


@contextmanager
def unpinged_checkout() -> Iterator[None]:
    """Connections checked out in this block are not pinged first. Only for a caller whose
    first statement on the connection is a read that it runs again on a new connection when
    it fails with `connection_invalidated` (webhooks/api.py's token check): that statement is
    the ping, one round trip fewer. A dead connection is found by it as by a ping, and
    SQLAlchemy then invalidates it and every connection pooled before it, as after a failed
    ping."""
    reset = _UNPINGED.set(True)
    try:
        yield
    finally:
        _UNPINGED.reset(reset)


def _ping_on_checkout(engine: Engine) -> None:
    """SQLAlchemy's pool_pre_ping, but skipped in `unpinged_checkout()` (the pool's own flag
    holds for every checkout): a pooled connection is pinged (";" on psycopg) before it is
    handed out, and if it is dead, it and every connection pooled before it are dropped and
    a new one is made (a database restart kills them all). A connection just made is not
    pinged."""

    @event.listens_for(engine.pool, "connect")
    def _fresh(_dbapi_connection: Any, record: Any) -> None:
        record.info[_FRESH] = True

    @event.listens_for(engine.pool, "checkout")
    def _ping(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        if record.info.pop(_FRESH, False) or _UNPINGED.get():
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as error:
            if engine.dialect.is_disconnect(error, dbapi_connection, None):
                raise InvalidatePoolError() from error  # the pool drops it, and tries a new one
            raise


_FRESH = "crm_approvals_fresh"


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

    writer = WriterLock(_sqlite_path(str(engine.url)))
    _WRITER_LOCKS[engine] = writer

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
        writer.release()


_WRITER_LOCKS: weakref.WeakKeyDictionary[Engine, WriterLock] = weakref.WeakKeyDictionary()


def writer_lock(engine: Engine) -> WriterLock | None:
    """The lock every write transaction on this SQLite engine takes (None on PostgreSQL), for
    code that writes on a driver connection of its own (connector/storage/inbox_writer.py)."""
    return _WRITER_LOCKS.get(engine)


class WriterLock:
    """Serialises SQLite write transactions: threads on an RLock, processes on flock.

    Both wake a waiter the moment the lock is free, unlike SQLite's busy handler, which
    sleeps in growing steps (up to 100 ms) and wrecks throughput and tail latency when
    several gunicorn workers write at once. Re-entrant per thread, so a nested session
    cannot deadlock; a release by a thread that holds nothing is ignored (a rollback of
    a transaction it never began).
    """

    def __init__(self, db_path: str | None) -> None:
        self._threads = threading.RLock()
        self._local = threading.local()
        self._path = f"{db_path}.writer-lock" if db_path and fcntl is not None else None
        self._file: Any = None
        self._pid = 0

    def acquire(self) -> None:
        self._threads.acquire()
        depth = getattr(self._local, "depth", 0)
        if depth == 0 and self._path is not None:
            fcntl.flock(self._lock_file(), fcntl.LOCK_EX)
        self._local.depth = depth + 1

    def release(self) -> None:
        depth = getattr(self._local, "depth", 0)
        if depth == 0:
            return
        self._local.depth = depth - 1
        if depth == 1 and self._path is not None:
            fcntl.flock(self._lock_file(), fcntl.LOCK_UN)
        self._threads.release()

    def _lock_file(self) -> Any:
        # flock belongs to the open file: a descriptor inherited across fork would be shared
        # with the parent and exclude nothing, so each process opens its own.
        if self._file is None or self._pid != os.getpid():
            self._file = open(self._path, "a+")  # type: ignore[arg-type]  # noqa: SIM115
            self._pid = os.getpid()
        return self._file


def _sqlite_path(url: str) -> str | None:
    path = url.split("///", 1)[-1] if "///" in url else ""
    return path if path and path != ":memory:" else None


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any exception."""
    with factory() as session, session.begin():
        yield session


def sessions_on(sessions: sessionmaker[Session], conn: Connection) -> sessionmaker[Session]:
    """Sessions like `sessions`' but all on this one connection: each session's transaction
    is one on `conn` (begun and ended by the session), with no pool checkout of its own."""
    return sessionmaker(class_=sessions.class_, **{**sessions.kw, "bind": conn})


SWEEP_CHECKPOINT_PAGES = 20_000  # WAL pages (about 80 MB) between checkpoints during a sweep
SWEEP_CACHE_KB = 131_072  # a sweep's page cache: its chunks touch index pages all over the tables


@contextmanager
def sweep_sessions(sessions: sessionmaker[Session]) -> Iterator[sessionmaker[Session]]:
    """The sessions for a sweep's chunks (expiry, step timers). On SQLite, all on one connection
    that checkpoints its WAL every SWEEP_CHECKPOINT_PAGES instead of SQLite's 1,000 (about every
    chunk): the index and tail pages that every chunk touches are copied into the database
    file once per checkpoint, not once per chunk. Each commit is as durable as before (synchronous=FULL
    syncs the WAL at commit; a checkpoint only moves committed pages). The setting is put
    back and the WAL checkpointed when the sweep is done, before the connection returns to
    the pool."""
    bind = sessions.kw.get("bind")
    if not isinstance(bind, Engine) or bind.dialect.name != "sqlite":
        yield sessions
        return
    with bind.connect() as conn:
        # on the driver's connection (autocommit): through `conn` they would open a transaction
        driver = conn.connection.driver_connection
        assert driver is not None
        previous = driver.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
        cache = driver.execute("PRAGMA cache_size").fetchone()[0]
        driver.execute(f"PRAGMA wal_autocheckpoint = {SWEEP_CHECKPOINT_PAGES}")
        driver.execute(f"PRAGMA cache_size = -{SWEEP_CACHE_KB}")
        try:
            yield sessions_on(sessions, conn)
        finally:
            driver.execute(f"PRAGMA wal_autocheckpoint = {int(previous)}")
            driver.execute(f"PRAGMA cache_size = {int(cache)}")
            if not conn.in_transaction():
                driver.execute("PRAGMA wal_checkpoint(PASSIVE)")


_AFTER_COMMIT = "crm_approvals_after_commit"


def after_commit(session: Session, callback: Callable[[], None]) -> None:
    """Run `callback` once the session's transaction has committed; never if it rolls back.

    For what must only tell the truth (log lines of business events, metrics): a line
    written inside the transaction would lie when the transaction then fails."""
    session.info.setdefault(_AFTER_COMMIT, []).append(callback)


@event.listens_for(Session, "after_commit")
def _run_after_commit(session: Session) -> None:
    for callback in session.info.pop(_AFTER_COMMIT, []):
        try:
            callback()
        except Exception:  # the data is committed: a failing report must not turn that into an error
            logging.getLogger(__name__).exception("after-commit callback failed")


@event.listens_for(Session, "after_rollback")
def _drop_after_commit(session: Session) -> None:
    session.info.pop(_AFTER_COMMIT, None)


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
    "after_commit",
    "JSONType",
    "UTCDateTime",
    "insert_ignoring_conflicts",
    "make_engine",
    "make_session_factory",
    "transaction",
    "utcnow",
]
