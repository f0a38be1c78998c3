"""A test implementation of the EventProcessor interface whose effects can be counted:
one outbox row per processed event. Used to prove exactly-once processing."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy.orm import Session

from connector.events import RecordChangeEvent
from connector.storage.outbox import enqueue_update


class CountingProcessor:
    def __init__(self, prepare_seconds: float = 0.0, fail_times: int = 0) -> None:
        self.prepare_seconds = prepare_seconds
        self.fail_times = fail_times

    def prepare(self, event: RecordChangeEvent) -> Any:
        if self.prepare_seconds:
            time.sleep(self.prepare_seconds)  # stands in for a CRM read
        return {"seen": event.record_id}

    def apply(self, session: Session, event: RecordChangeEvent, prepared: Any) -> str:
        if self.fail_times:
            self.fail_times -= 1
            raise RuntimeError("processing bug")
        enqueue_update(
            session, event.connection, event.object_type, event.record_id, {"Seen": event.event_id}
        )
        return f"wrote Seen={event.event_id}"
