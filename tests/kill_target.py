"""Run as a separate process by test_worker_kill: processes the inbox until killed."""

from __future__ import annotations

import sys

from connector.config import Settings
from connector.runtime import Runtime
from connector.storage.inbox import process_pending
from tests.processors import CountingProcessor

if __name__ == "__main__":
    runtime = Runtime.from_settings(Settings(database_url=sys.argv[1]))
    while process_pending(runtime.sessions, CountingProcessor(prepare_seconds=0.002), limit=50).done:
        pass
