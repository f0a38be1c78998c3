"""The scale-out backends for real: PostgreSQL via DATABASE_URL, Redis via QUEUE_URL.
Skipped when the servers are unreachable, except under CI=true where they must run."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import func, select

from connector.config import Settings
from connector.runtime import Runtime
from connector.storage.inbox import accept, process_pending
from connector.storage.models import InboxEvent, OutboxUpdate
from connector.storage.outbox import flush
from connector.worker import NUDGE_WINDOW, Tasks, make_huey
from tests.fakes import MemoryCRM
from tests.processors import CountingProcessor
from tests.storage.test_inbox import event

pytestmark = pytest.mark.xdist_group("services")


@pytest.fixture
def pg_runtime(pg_url: str, runtime_factory: Callable[[Settings], Runtime]) -> Runtime:
    return runtime_factory(Settings(database_url=pg_url))


def test_postgres_inbox_dedupes_and_processes(pg_runtime: Runtime) -> None:
    assert pg_runtime.engine.dialect.name == "postgresql"
    assert accept(pg_runtime.sessions, [event(1), event(1), event(2)]).accepted == 2
    assert accept(pg_runtime.sessions, [event(2)]).duplicates == 1
    assert process_pending(pg_runtime.sessions, CountingProcessor()).done == 2
    crm = MemoryCRM()
    assert flush(pg_runtime.sessions, lambda _name: crm).done == 2
    assert crm.records == {"D-1": {"Seen": "msg-1"}, "D-2": {"Seen": "msg-2"}}


def test_postgres_concurrent_workers_process_each_event_exactly_once(pg_runtime: Runtime) -> None:
    total = 200
    accept(pg_runtime.sessions, [event(i) for i in range(total)])
    errors: list[BaseException] = []

    def work() -> None:
        try:
            process_pending(pg_runtime.sessions, CountingProcessor(), limit=total)
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with pg_runtime.sessions() as session:
        assert session.scalar(select(func.count()).select_from(OutboxUpdate)) == total
        done = session.scalar(select(func.count()).select_from(InboxEvent).where(InboxEvent.status == "done"))
    assert done == total


def test_postgres_concurrent_intake_of_one_delivery_stores_it_once(pg_runtime: Runtime) -> None:
    results: list[int] = []

    def deliver() -> None:
        results.append(accept(pg_runtime.sessions, [event(7)]).accepted)

    threads = [threading.Thread(target=deliver) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [0] * 7 + [1]


def _run_queued_tasks(tasks: Tasks) -> int:
    """What a consumer does: move due scheduled tasks to the queue, then run the queue."""
    time.sleep(NUDGE_WINDOW + 0.05)
    for task in tasks.huey.read_schedule():
        tasks.huey.enqueue(task)
    ran = 0
    while (task := tasks.huey.dequeue()) is not None:
        tasks.huey.execute(task)
        ran += 1
    return ran


def test_redis_queue_carries_the_nudge_to_a_worker(redis_url: str, runtime: Runtime) -> None:
    runtime.processor = CountingProcessor()
    runtime.set_adapter("sandbox", MemoryCRM())
    producer = Tasks(runtime, make_huey(redis_url, name="test-crm-approvals"))
    consumer = Tasks(runtime, make_huey(redis_url, name="test-crm-approvals"))
    assert type(producer.huey).__name__ == "RedisHuey"
    accept(runtime.sessions, [event(1)])
    producer.nudge()  # the first delivery of a window: a pass at once, not after the scheduler's tick
    producer.nudge()  # a later one: one more pass at the window's end, which sees the whole window
    producer.nudge()  # and no third task
    pending = producer.huey.pending()
    assert sorted(task.eta is None for task in pending) == [False, True]
    assert _run_queued_tasks(consumer) == 2
    with runtime.sessions() as session:
        assert session.scalars(select(InboxEvent.status)).one() == "done"


def test_sqlite_queue_carries_the_nudge_to_a_worker(tmp_path: Path, runtime: Runtime) -> None:
    runtime.processor = CountingProcessor()
    runtime.set_adapter("sandbox", MemoryCRM())
    queue = f"sqlite:///{tmp_path}/queue.db"
    producer, consumer = Tasks(runtime, make_huey(queue)), Tasks(runtime, make_huey(queue))
    accept(runtime.sessions, [event(1)])
    producer.nudge()
    assert _run_queued_tasks(consumer) == 1
    with runtime.sessions() as session:
        assert session.scalars(select(InboxEvent.status)).one() == "done"


def test_sweep_redrives_events_whose_nudge_was_lost(runtime: Runtime) -> None:
    runtime.processor = CountingProcessor()
    crm = MemoryCRM()
    runtime.set_adapter("sandbox", crm)
    accept(runtime.sessions, [event(1), event(2)])  # stored, but no task was ever enqueued
    summary = Tasks(runtime, make_huey("memory://")).run_sweep()
    assert summary["inbox"]["done"] == 2
    assert len(crm.update_calls) == 1
    assert set(crm.records) == {"D-1", "D-2"}
