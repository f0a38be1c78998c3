"""Run as a separate process by the outbox kill test: flushes the outbox against a CRM
whose second update call never returns, so the test can kill it with that call in flight."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

from connector.config import Settings
from connector.crm.base import RecordUpdate, UpdateResult
from connector.runtime import Runtime
from connector.storage.outbox import flush
from tests.fakes import MemoryCRM


class HangingCRM(MemoryCRM):
    def __init__(self, marker: Path) -> None:
        super().__init__()
        self.marker = marker

    def _update_batch(self, object_type: str, updates: Sequence[RecordUpdate]) -> list[UpdateResult]:
        if len(self.update_calls) == 1:  # the second call: tell the test, then hang until killed
            self.update_calls.append(list(updates))
            self.marker.write_text(",".join(u.record_id for u in updates))
            time.sleep(3600)
        return super()._update_batch(object_type, updates)


if __name__ == "__main__":
    runtime = Runtime.from_settings(Settings(database_url=sys.argv[1]))
    crm = HangingCRM(Path(sys.argv[2]))
    flush(runtime.sessions, lambda _name: crm, lease_seconds=600)
