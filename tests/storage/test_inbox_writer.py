"""The group-commit leader's driver-level write (connector/storage/inbox_writer.py), on SQLite
and PostgreSQL: rows read back exactly as the ORM path writes them, redeliveries are
ignored, a failed batch leaves nothing and no lock behind, a lost PostgreSQL connection is
replaced, and a batch is committed (visible to another connection) once `write` returns."""

from __future__ import annotations

import gc
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import create_engine, select, text

from connector.config import Settings
from connector.events import RecordChangeEvent
from connector.runtime import Runtime
from connector.storage.db import normalize_url, transaction, writer_lock
from connector.storage.inbox import GroupCommitInbox, _write_batch
from connector.storage.inbox_writer import SQLITE_CHUNK, InboxWriter
from connector.storage.models import InboxEvent


def event(i: int, *, content_hash: str | None = None, **values: Any) -> RecordChangeEvent:
    return RecordChangeEvent(
        source="sandbox",
        connection="sandbox",
        object_type="deal",
        record_id=f"D-{i}",
        event_id=f"msg-{i}",
        occurred_at=datetime(2026, 11, 23, 10, 0, 0, 123456, tzinfo=UTC) + timedelta(seconds=i),
        dedupe_key=f"sandbox:std:msg-{i}",
        changed_fields=("amount", "stage"),
        values=values or {"amount": 1000 + i, "stage": "Négociation", "nested": {"list": [1, 2.5, None]}},
        origin="api",
        values_signed=bool(i % 2),
        content_hash=content_hash,
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def any_runtime(
    request: pytest.FixtureRequest, runtime_factory: Callable[[Settings], Runtime], tmp_path: Any
) -> Runtime:
    if request.param == "sqlite":
        return runtime_factory(Settings(database_url=f"sqlite:///{tmp_path}/writer.db"))
    return runtime_factory(Settings(database_url=request.getfixturevalue("pg_url")))


COMPARED = (
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
    "status",
    "attempts",
    "content_hash",
    "next_attempt_at",
    "processed_at",
)


def stored(runtime: Runtime) -> dict[str, dict[str, Any]]:
    with runtime.sessions() as session:
        rows = session.scalars(select(InboxEvent).order_by(InboxEvent.id)).all()
        return {row.record_id: {name: getattr(row, name) for name in COMPARED} for row in rows}


def test_rows_read_back_as_the_orm_path_writes_them(any_runtime: Runtime) -> None:
    writer = InboxWriter(any_runtime.engine)
    _write_batch(any_runtime.sessions, [[event(1)], [event(2, content_hash="a" * 64)]], writer)
    _write_batch(any_runtime.sessions, [[event(3)], [event(4, content_hash="a" * 64)]])  # Core path
    rows = stored(any_runtime)
    own = ("record_id", "event_id", "occurred_at", "values")  # differ between events 1 and 3 by design
    assert {k: v for k, v in rows["D-1"].items() if k not in own} == {
        k: v for k, v in rows["D-3"].items() if k not in own
    }
    assert rows["D-1"]["values"] == {
        "amount": 1001,
        "stage": "Négociation",
        "nested": {"list": [1, 2.5, None]},
    }
    assert rows["D-1"]["occurred_at"] == datetime(2026, 11, 23, 10, 0, 1, 123456, tzinfo=UTC)
    assert rows["D-2"]["content_hash"] == rows["D-4"]["content_hash"] == "a" * 64
    assert (rows["D-2"]["values_signed"], rows["D-2"]["status"], rows["D-2"]["attempts"]) == (
        False,
        "pending",
        0,
    )


def test_redeliveries_are_ignored_and_a_reused_id_with_another_body_is_a_conflict(
    any_runtime: Runtime,
) -> None:
    inbox = GroupCommitInbox(any_runtime.sessions)
    first = inbox.accept([event(1, content_hash="a" * 64), event(2)])
    assert (first.accepted, first.duplicates, first.conflicts) == (2, 0, ())
    again = inbox.accept([event(1, content_hash="a" * 64), event(2)])
    assert (again.accepted, again.duplicates, again.conflicts) == (0, 2, ())
    reused = event(1, content_hash="b" * 64, amount=5)
    refused = inbox.accept([reused])
    assert (refused.accepted, refused.duplicates, refused.conflicts) == (0, 0, (reused,))
    assert stored(any_runtime)["D-1"]["values"]["amount"] == 1001


def test_a_failed_batch_writes_nothing_and_leaves_the_writer_usable(any_runtime: Runtime) -> None:
    writer = InboxWriter(any_runtime.engine)
    good = {**event(1).to_row(), "received_at": datetime.now(UTC), "status": "pending", "attempts": 0}
    broken = {**event(2).to_row(), "received_at": datetime.now(UTC), "status": "pending", "attempts": 0}
    broken["source"] = None  # NOT NULL: the whole batch must fail
    with pytest.raises(any_runtime.engine.dialect.loaded_dbapi.IntegrityError):
        writer.write([good, broken], lambda _new: set())
    assert stored(any_runtime) == {}
    # No lock or open transaction left behind: the ORM path and the writer both write again.
    with transaction(any_runtime.sessions) as session:
        session.add(InboxEvent(**{**event(3).to_row(), "received_at": datetime.now(UTC)}))
    assert writer.write([good], lambda _new: set()) == ({"sandbox:std:msg-1"}, {})
    assert set(stored(any_runtime)) == {"D-1", "D-3"}


def test_a_written_batch_is_committed_when_write_returns(any_runtime: Runtime) -> None:
    inbox = GroupCommitInbox(any_runtime.sessions)
    results: list[Any] = []
    threads = [
        threading.Thread(target=lambda i=i: results.append(inbox.accept([event(i)]))) for i in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.accepted for r in results) == [1] * 8
    # A separate engine (another process would see the same): every acknowledged row is there.
    other = create_engine(normalize_url(str(any_runtime.engine.url.render_as_string(hide_password=False))))
    try:
        with other.connect() as conn:
            assert conn.scalar(text("SELECT count(*) FROM inbox_events")) == 8
    finally:
        other.dispose()


def test_a_lost_postgresql_connection_is_replaced_for_the_next_batch(
    pg_url: str, runtime_factory: Callable[[Settings], Runtime]
) -> None:
    runtime = runtime_factory(Settings(database_url=pg_url))
    inbox = GroupCommitInbox(runtime.sessions)
    assert inbox.accept([event(1)]).accepted == 1
    pid = inbox.writer._connect().info.backend_pid
    with runtime.engine.connect() as conn:
        conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    with pytest.raises(runtime.engine.dialect.loaded_dbapi.OperationalError):
        inbox.accept([event(2)])  # this delivery is answered with an error: the CRM retries it
    assert inbox.accept([event(2)]).accepted == 1
    assert set(stored(runtime)) == {"D-1", "D-2"}


def test_a_forked_process_writes_on_a_connection_of_its_own(
    pg_url: str, runtime_factory: Callable[[Settings], Runtime]
) -> None:
    runtime = runtime_factory(Settings(database_url=pg_url))
    inbox = GroupCommitInbox(runtime.sessions)
    assert inbox.accept([event(1)]).accepted == 1
    parent_backend = inbox.writer._connect().info.backend_pid
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through its exit code
        code = 3
        try:
            accepted = inbox.accept([event(2)]).accepted
            code = 0 if accepted == 1 and inbox.writer._connect().info.backend_pid != parent_backend else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # The parent's connection was neither used nor rolled back by the child: it still writes.
    assert inbox.writer._connect().info.backend_pid == parent_backend
    assert inbox.accept([event(3)]).accepted == 1
    assert set(stored(runtime)) == {"D-1", "D-2", "D-3"}


def test_deliveries_that_arrive_while_the_leader_waits_for_the_writer_join_its_commit(
    runtime_factory: Callable[[Settings], Runtime], tmp_path: Any
) -> None:
    """SQLite: the leader collects its batch once it holds the writer lock, not before, so a
    delivery that arrives while another writer (another server process) commits is written
    in the same transaction: one commit, one `received_at`, for both."""
    runtime = runtime_factory(Settings(database_url=f"sqlite:///{tmp_path}/turn.db"))
    inbox = GroupCommitInbox(runtime.sessions)
    lock = writer_lock(runtime.engine)
    assert lock is not None
    held, done = threading.Event(), threading.Event()

    def other_writer() -> None:  # holds the writer lock as another process's commit would
        lock.acquire()
        held.set()
        done.wait(10)
        lock.release()

    def queued(record_id: str) -> bool:
        return any(d.events[0].record_id == record_id for d in inbox._queue)

    holder = threading.Thread(target=other_writer)
    holder.start()
    assert held.wait(10)
    results: list[Any] = []
    first = threading.Thread(target=lambda: results.append(inbox.accept([event(1)])))
    first.start()
    wait_until(lambda: inbox._writing)  # the first delivery leads, and waits for the lock
    second = threading.Thread(target=lambda: results.append(inbox.accept([event(2)])))
    second.start()
    wait_until(lambda: queued("D-2"))
    done.set()
    for thread in (holder, first, second):
        thread.join(10)
    assert [r.accepted for r in results] == [1, 1]
    with runtime.sessions() as session:
        received = session.scalars(select(InboxEvent.received_at)).all()
    assert len(received) == 2 and received[0] == received[1]


def wait_until(condition: Callable[[], bool], seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_an_id_another_process_commits_while_the_batch_waits_is_compared_with_its_hash(
    runtime_factory: Callable[[Settings], Runtime], pg_url: str
) -> None:
    """PostgreSQL: the batch is one statement whose snapshot predates a row another process
    commits while the statement waits on it (ON CONFLICT); the stored hash is then read
    afresh, so a reused id is still a conflict, not a duplicate."""
    runtime = runtime_factory(Settings(database_url=pg_url))
    inbox = GroupCommitInbox(runtime.sessions)
    first = event(1, content_hash="a" * 64)
    other = runtime.engine.connect()
    try:
        transaction_of_other = other.begin()
        other.execute(
            InboxEvent.__table__.insert().values(
                **first.to_row(), received_at=datetime.now(UTC), status="pending", attempts=0
            )
        )
        results: list[Any] = []
        reused = event(1, content_hash="b" * 64, amount=5)
        # The writer's own backend, watched by pid: other tests may share the database.
        writer_pid = inbox.writer._connect().info.backend_pid
        writer = threading.Thread(target=lambda: results.append(inbox.accept([reused])))
        writer.start()
        with runtime.engine.connect() as watcher:
            waiting = text("SELECT wait_event_type FROM pg_stat_activity WHERE pid = :pid")
            wait_until(lambda: watcher.scalar(waiting, {"pid": writer_pid}) == "Lock")
        transaction_of_other.commit()
        writer.join(10)
    finally:
        other.close()
    assert [(r.accepted, r.duplicates, r.conflicts) for r in results] == [(0, 0, (reused,))]
    assert stored(runtime)["D-1"]["content_hash"] == "a" * 64


def test_the_postgresql_writer_connection_never_goes_back_to_the_pool_in_autocommit(
    runtime_factory: Callable[[Settings], Runtime], pg_url: str
) -> None:
    """Its batches run in autocommit; were it handed back to the pool (a writer lost without
    `close`), an ORM transaction on it would commit statement by statement."""
    runtime = runtime_factory(Settings(database_url=pg_url))
    writer = InboxWriter(runtime.engine)
    row = {**event(1).to_row(), "received_at": datetime.now(UTC), "status": "pending", "attempts": 0}
    assert writer.write([row], lambda _new: set()) == ({"sandbox:std:msg-1"}, {})
    writer._connection = None  # lost without close(), as when the writer is collected
    gc.collect()
    with runtime.engine.connect() as conn:
        assert conn.connection.driver_connection.autocommit is False  # type: ignore[union-attr]


def test_a_delivery_that_arrives_during_a_commit_leads_the_next_one(
    runtime_factory: Callable[[Settings], Runtime], tmp_path: Any
) -> None:
    """The leader wakes the deliveries it wrote and hands the lead to the first one queued
    after it collected its batch: that one is written in a commit of its own, right after."""
    path = tmp_path / "lead.db"
    runtime = runtime_factory(Settings(database_url=f"sqlite:///{path}"))
    inbox = GroupCommitInbox(runtime.sessions)
    blocker = sqlite3.connect(path, isolation_level=None)  # not through our writer lock
    blocker.execute("BEGIN IMMEDIATE")  # the leader's BEGIN IMMEDIATE waits on this
    results: dict[str, Any] = {}
    first = threading.Thread(target=lambda: results.update(first=inbox.accept([event(1)])))
    first.start()
    wait_until(lambda: inbox._writing and not inbox._queue)  # collected, now writing
    second = threading.Thread(target=lambda: results.update(second=inbox.accept([event(2)])))
    second.start()
    wait_until(lambda: len(inbox._queue) == 1)
    time.sleep(0.05)
    blocker.rollback()
    blocker.close()
    for thread in (first, second):
        thread.join(10)
        assert not thread.is_alive()
    assert results["first"].accepted == results["second"].accepted == 1
    assert not inbox._writing and not inbox._queue
    with runtime.sessions() as session:
        received = session.scalars(select(InboxEvent.received_at).order_by(InboxEvent.id)).all()
    assert len(received) == 2 and received[0] < received[1]  # two commits


def test_many_concurrent_deliveries_are_each_answered_once(any_runtime: Runtime) -> None:
    """No delivery is left asleep (a lost wake-up would hang its thread) and each gets its
    own result, across many leader hand-overs."""
    inbox = GroupCommitInbox(any_runtime.sessions)
    results: dict[int, Any] = {}

    def deliver(first: int) -> None:
        for i in range(first, first + 5):
            results[i] = inbox.accept([event(i), event(i)])  # the same event twice in one delivery

    threads = [threading.Thread(target=deliver, args=(n * 5,)) for n in range(12)]  # event(i): i < 60
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive(), "a delivery was never woken"
    assert sorted(results) == list(range(60))
    assert {(r.accepted, r.duplicates) for r in results.values()} == {(1, 1)}
    assert not inbox._writing and not inbox._queue
    assert len(stored(any_runtime)) == 60


def test_a_batch_larger_than_a_chunk_stores_every_row_exactly_once_in_order(any_runtime: Runtime) -> None:
    """SQLite writes a batch as multi-row INSERTs of SQLITE_CHUNK rows: a batch spanning three
    of them (the last one short), some of its keys stored before, stores each new row exactly
    as the Core path does, in the batch's order, and reports exactly the new keys."""
    count = 2 * SQLITE_CHUNK + 14
    _write_batch(any_runtime.sessions, [[event(i, content_hash=f"{i:064x}")] for i in (5, 60, 120)])
    batch = [event(i, content_hash=f"{i:064x}") for i in range(count)]
    writer = InboxWriter(any_runtime.engine)
    results = _write_batch(any_runtime.sessions, [[e] for e in batch], writer)
    assert [(r.accepted, r.duplicates, r.conflicts) for r in results] == [
        (0, 1, ()) if i in (5, 60, 120) else (1, 0, ()) for i in range(count)
    ]
    rows = stored(any_runtime)
    assert len(rows) == count
    for i in range(count):
        e = batch[i]
        assert rows[f"D-{i}"] == {
            "source": "sandbox",
            "connection": "sandbox",
            "object_type": "deal",
            "record_id": f"D-{i}",
            "event_id": f"msg-{i}",
            "change_type": "updated",
            "changed_fields": ["amount", "stage"],
            "values": {"amount": 1000 + i, "stage": "Négociation", "nested": {"list": [1, 2.5, None]}},
            "origin": "api",
            "values_signed": bool(i % 2),
            "occurred_at": e.occurred_at,
            "status": "pending",
            "attempts": 0,
            "content_hash": f"{i:064x}",
            "next_attempt_at": None,
            "processed_at": None,
        }
    with any_runtime.sessions() as session:
        order = session.scalars(select(InboxEvent.record_id).order_by(InboxEvent.id)).all()
    assert order == ["D-5", "D-60", "D-120"] + [f"D-{i}" for i in range(count) if i not in (5, 60, 120)]
