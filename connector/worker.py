"""Background work on huey: SQLite by default, Redis for scale-out (QUEUE_URL).

huey is at-most-once, so a task only *nudges*: it says "look at the inbox/outbox now".
The database is the truth, and the periodic sweep (every minute, and once at start-up)
re-drives anything a lost task left undone. Every task is safe to run any number of
times, in any number of workers.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from huey import Huey, MemoryHuey, RedisHuey, SqliteHuey, crontab

from connector.clock import utcnow
from connector.config import ConfigError
from connector.logs import log_sweep
from connector.runtime import Runtime
from connector.storage.inbox import process_pending
from connector.storage.inbox_batch import claimed_elsewhere
from connector.storage.outbox import flush

log = logging.getLogger(__name__)

NUDGE_WINDOW = 0.25  # seconds: at most one inbox nudge per process per window
# A partial batch whose events are still arriving waits this long to fill up: fewer CRM
# reads for a burst, at most this much added latency (connector/storage/inbox_batch.py).
INBOX_LINGER = 0.5
# Threads sending a burst's full write-back calls (`Tasks.write_behind`). On PostgreSQL two:
# one flush's database work (claiming a call's rows, recording its results) overlaps the
# other's call, where a single thread left the CRM idle about half as long as a 200 ms call.
# On SQLite one: every transaction of the process takes the one writer lock, so a second
# writer's work overlaps nothing more and only makes the apply wait for the lock.
WRITE_BEHIND_THREADS = {"postgresql": 2}
# How long one inbox pass may go on past its limit (500 events) while a burst keeps coming:
# it reads each next batch ahead, and applies it itself (connector/storage/inbox_batch.py).
BURST_SECONDS = 10.0


def make_huey(queue_url: str, name: str = "crm-approvals") -> Huey:
    if queue_url.startswith(("redis://", "rediss://", "unix://")):
        return RedisHuey(name, url=queue_url, results=False)
    if queue_url.startswith("sqlite:///"):
        path = Path(queue_url[len("sqlite:///") :])
        path.parent.mkdir(parents=True, exist_ok=True)
        return SqliteHuey(name, filename=str(path), results=False)
    if queue_url == "memory://":
        return MemoryHuey(name, results=False)
    raise ConfigError(f"QUEUE_URL {queue_url!r} is not sqlite:///PATH, redis://HOST:PORT/DB or memory://")


class Tasks:
    """The huey tasks, bound to one runtime. The web app enqueues; the worker runs them."""

    burst_seconds = BURST_SECONDS  # then a pass ends at its limit and nudges the queue

    def __init__(self, runtime: Runtime, huey: Huey) -> None:
        self.runtime = runtime
        self.huey = huey
        self._nudge_lock = threading.Lock()
        self._nudge_due = 0.0  # end of the current nudge window (monotonic seconds)
        self._trailing = False  # whether the window's end-of-window nudge is scheduled
        # The helper threads of a burst (started on first use; `close` stops them): one reads
        # the next inbox batch, claimed, while a pass applies the current one, and the writers
        # send the write-back calls that are full meanwhile: the CRM's time overlaps ours.
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="inbox-read-ahead")
        writers = WRITE_BEHIND_THREADS.get(runtime.engine.dialect.name, 1)
        self._writer = ThreadPoolExecutor(writers, thread_name_prefix="write-behind")
        self._write_queued = threading.Event()  # a write-behind flush waits to start
        self._writes: set[Future[None]] = set()  # write-behind flushes not yet done
        self._writes_lock = threading.Lock()
        self.process_inbox = huey.task(name="process_inbox")(self.run_inbox)
        self.flush_outbox = huey.task(name="flush_outbox")(self.run_outbox)
        self.sweep = huey.periodic_task(crontab(minute="*"), name="sweep")(self.run_sweep)

    def run_inbox(self, flush_owed: bool = False) -> dict[str, int]:
        """One inbox pass; once no due events are left, the write-backs of the burst go out.
        `flush_owed`: an earlier pass of the burst did work and left the flush to a later one
        (which may find nothing left to judge, as when the burst was a multiple of the limit)."""
        if self.runtime.processor is None:
            raise ConfigError("this runtime has no event processor; the worker builds one at start-up")
        settings = self.runtime.settings
        report = process_pending(
            self.runtime.sessions,
            self.runtime.processor,
            max_attempts=settings.inbox_max_attempts,
            on_full_batch=self.nudge_now,  # a burst: let another worker claim the next share
            # ... and the write-back calls that are full go out between its batches, from the
            # writer threads while this one judges the next batch and the other workers theirs,
            # rather than all at the end of the burst.
            after_full_batch=self.write_behind,
            linger=INBOX_LINGER,
            read_ahead=self._reader,  # the next batch's CRM reads while this one is applied
            burst_seconds=self.burst_seconds,
        )
        if report.more:  # work left behind goes on at once, not at the next sweep
            self.nudge_now(flush_owed=flush_owed or report.done > 0)
        elif report.done or flush_owed:
            # The burst is judged: its write-backs go out, the last call partial. Unless other
            # workers still judge claimed events: their rows would follow in a second partial
            # call. The last of them to finish sees no claim left (each looks after its own
            # commit) and sends the partial call; a dead worker's claim expires into the sweep.
            self.wait_for_writes()  # the full calls first: this flush is the burst's last
            self.run_outbox(full_batches_only=claimed_elsewhere(self.runtime.sessions, utcnow()))
        return vars(report)

    def write_behind(self) -> None:
        """Send the write-back calls that are full from a writer thread, through the same
        `run_outbox` (so the same outbox claims, in-doubt rules and rate limits); the caller
        goes on at once. One such flush waits at a time: it sends whatever is full when it
        starts, so a second one queued behind it would find nothing more."""
        if self._write_queued.is_set():
            return
        self._write_queued.set()
        future = self._writer.submit(self._write_full_calls)
        with self._writes_lock:
            self._writes.add(future)
        future.add_done_callback(self._written)

    def _written(self, future: Future[None]) -> None:
        with self._writes_lock:
            self._writes.discard(future)

    def _write_full_calls(self) -> None:
        self._write_queued.clear()  # rows committed from now on need a flush after this one
        try:
            self.run_outbox(full_batches_only=True, jobs=False)
        except Exception:  # the next flush or the minute's sweep sends what this one could not
            log.exception("write-behind flush failed")

    def wait_for_writes(self) -> None:
        """Until the write-behind flushes queued so far are done."""
        with self._writes_lock:
            pending = list(self._writes)
        wait(pending)

    def close(self) -> None:
        """Stop the helper threads once their work is done (a flush being sent completes). A
        pass cut short by the shutdown leaves the batch it read ahead claimed until the lease
        ends, as a killed worker leaves its batch."""
        self._reader.shutdown(wait=True)
        self._writer.shutdown(wait=True)

    def nudge_now(self, flush_owed: bool = False) -> None:
        """Enqueue an inbox pass at once (a burst in progress); losing it is harmless."""
        try:
            self.process_inbox(flush_owed=flush_owed) if flush_owed else self.process_inbox()
        except Exception as exc:
            log.warning("could not enqueue the inbox nudge (the sweep will pick the events up): %s", exc)

    def run_outbox(self, full_batches_only: bool = False, jobs: bool = True) -> dict[str, Any]:
        """Flush the write-backs, then run the flush jobs (`jobs`). `full_batches_only` (a burst
        still being judged): only calls that carry the CRM's batch limit go out, so the burst
        costs ceil(N/limit) write calls while its write-backs overlap the other workers' reads."""
        settings = self.runtime.settings
        report = flush(
            self.runtime.sessions,
            self.runtime.adapter,
            lease_seconds=settings.outbox_lease_seconds,
            max_attempts=settings.outbox_max_attempts,
            full_batches_only=full_batches_only,
        )
        summary: dict[str, Any] = vars(report)
        if not jobs:
            return summary
        for job in self.runtime.flush_jobs:
            try:
                summary[job.name] = job.run(self.runtime)
            except Exception:  # a failing job must not fail the write-back flush
                log.exception("flush job %s failed", job.name)
        return summary

    def run_sweep(self) -> dict[str, Any]:
        """Re-drive everything: pending events, pending and in-doubt updates, the runtime's sweep jobs."""
        inbox = self.run_inbox()
        # Events claimed by another worker: a burst it is judging, whose last worker sends the
        # partial write-back call (a dead worker's claim expires into a later sweep).
        self.wait_for_writes()
        busy = claimed_elsewhere(self.runtime.sessions, utcnow())
        summary: dict[str, Any] = {"inbox": inbox, "outbox": self.run_outbox(full_batches_only=busy)}
        summary["api_usage"] = self.runtime.api_usage()
        for job in self.runtime.sweep_jobs:
            try:
                summary[job.name] = job.run(self.runtime)
            except Exception:  # one failing job must not stop the others
                log.exception("sweep job %s failed", job.name)
        log_sweep(log, summary)
        return summary

    def nudge(self) -> None:
        """Ask a worker to process the inbox soon. Losing this is harmless: the sweep catches up.

        The first delivery of a NUDGE_WINDOW enqueues a pass at once (a worker starts without
        waiting for the queue's scheduler, which moves delayed tasks once a second). A later
        delivery in the window schedules one more pass at the window's end, which runs after
        every delivery of the window has committed (each commits before it calls this), so it
        sees them all. Further deliveries in the window skip the queue write: at most two per
        window under load.
        """
        now = time.monotonic()
        with self._nudge_lock:
            if now >= self._nudge_due:
                self._nudge_due, self._trailing, delay = now + NUDGE_WINDOW, False, 0.0
            elif not self._trailing:
                self._trailing, delay = True, self._nudge_due - now
            else:
                return
        try:
            if delay:
                self.process_inbox.schedule(delay=delay)
            else:
                self.process_inbox()
        except Exception as exc:
            log.warning("could not enqueue the inbox nudge (the sweep will pick the events up): %s", exc)


def run_consumer(tasks: Tasks, workers: int = 2) -> None:
    tasks.run_sweep()  # whatever a killed worker left behind, before taking new work
    # max_delay: an idle worker polls the queue at least every second, so a nudge waits ~1 s at most
    consumer = tasks.huey.create_consumer(workers=workers, periodic=True, worker_type="thread", max_delay=1.0)
    try:
        consumer.run()
    finally:
        tasks.close()
