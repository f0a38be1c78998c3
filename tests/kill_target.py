"""Run as a separate process by test_worker_kill: processes the inbox until killed; with
`read-ahead`, as the worker does in a burst (the next batch claimed and read in a thread)."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

from connector.config import Settings
from connector.runtime import Runtime
from connector.storage.inbox import process_pending
from tests.processors import CountingProcessor

if __name__ == "__main__":
    runtime = Runtime.from_settings(Settings(database_url=sys.argv[1]))
    ahead = sys.argv[2:3] == ["read-ahead"]
    reader = ThreadPoolExecutor(1) if ahead else None
    processor = CountingProcessor(prepare_seconds=0.002)
    while process_pending(
        runtime.sessions, processor, limit=50, read_ahead=reader, burst_seconds=60 if ahead else 0
    ).done:
        pass
