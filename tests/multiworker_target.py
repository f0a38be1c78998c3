"""Run as separate worker processes by tests/storage/test_several_workers.py: a real huey
consumer on Redis, judging events with a processor that records which process prepared and
applied each one (in the database, in the event's own transaction)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from connector.config import Settings
from connector.events import RecordChangeEvent
from connector.runtime import Runtime
from connector.storage.outbox import enqueue_update
from connector.worker import Tasks, make_huey
from tests.fakes import MemoryCRM


class RecordingProcessor:
    """Applies each event as one outbox row naming this process; logs every prepare."""

    def __init__(self, log_dir: Path) -> None:
        self.prepared_log = log_dir / f"prepared-{os.getpid()}.txt"

    def prepare(self, event: RecordChangeEvent) -> Any:
        with self.prepared_log.open("a") as f:  # a prepare stands for the CRM read it would make
            f.write(event.record_id + "\n")
        return os.getpid()

    def apply(self, session: Session, event: RecordChangeEvent, prepared: Any) -> str:
        enqueue_update(session, event.connection, event.object_type, event.record_id, {"Worker": prepared})
        return f"applied by {prepared}"


if __name__ == "__main__":
    database_url, queue_url, log_dir = sys.argv[1:4]
    runtime = Runtime.from_settings(Settings(database_url=database_url, queue_url=queue_url))
    runtime.processor = RecordingProcessor(Path(log_dir))
    runtime.set_adapter("sandbox", MemoryCRM())
    tasks = Tasks(runtime, make_huey(queue_url))
    consumer = tasks.huey.create_consumer(workers=1, periodic=False, worker_type="thread", max_delay=0.2)
    consumer.run()
