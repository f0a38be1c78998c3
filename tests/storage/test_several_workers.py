"""Several worker processes on PostgreSQL + Redis share a burst: each claims its own share,
every event is prepared once (so a CRM read is never made twice) and applied once."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import select

from connector.config import Settings
from connector.runtime import Runtime
from connector.storage.inbox import accept
from connector.storage.migrate import upgrade
from connector.storage.models import InboxEvent, OutboxUpdate
from connector.worker import Tasks, make_huey
from tests.storage.test_inbox import event

ROOT = Path(__file__).resolve().parents[2]
WORKERS = 3
EVENTS = 1500  # several claims of 200 each, so every worker gets a share


@pytest.mark.slow
def test_several_worker_processes_process_each_event_exactly_once(
    pg_url: str, redis_url: str, tmp_path: Path
) -> None:
    upgrade(pg_url)
    runtime = Runtime.from_settings(Settings(database_url=pg_url, queue_url=redis_url))
    accept(runtime.sessions, [event(i) for i in range(EVENTS)])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.multiworker_target", pg_url, redis_url, str(tmp_path)],
            env=env,
            cwd=ROOT,
        )
        for _ in range(WORKERS)
    ]
    try:
        time.sleep(2)  # the consumers are listening
        Tasks(runtime, make_huey(redis_url)).process_inbox()  # ONE nudge: the burst fans out itself
        deadline = time.time() + 120
        while time.time() < deadline:
            with runtime.sessions() as session:
                pending = session.scalars(select(InboxEvent.id).where(InboxEvent.status == "pending")).all()
            if not pending:
                break
            time.sleep(0.2)
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait(timeout=30)

    with runtime.sessions() as session:
        rows = session.execute(select(InboxEvent.status, InboxEvent.attempts)).all()
        written = session.execute(select(OutboxUpdate.record_id, OutboxUpdate.fields)).all()
    runtime.close()
    assert Counter(rows) == {("done", 1): EVENTS}
    per_record = Counter(record_id for record_id, _ in written)
    assert len(per_record) == EVENTS and set(per_record.values()) == {1}  # applied once each
    prepared = Counter(
        line for log in tmp_path.glob("prepared-*.txt") for line in log.read_text().splitlines()
    )
    assert len(prepared) == EVENTS and set(prepared.values()) == {1}  # prepared (read) once each
    by_worker = Counter(fields["Worker"] for _, fields in written)
    assert len(by_worker) >= 2, f"one worker did everything: {by_worker}"  # the burst was shared
