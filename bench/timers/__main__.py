"""bench/timers: the worker's step-timer sweep over N open requests whose reminder is due, beside
a plain indexed SELECT of the same due rows, in one run.

Setup (not timed): N pending requests of a one-step rule with `remind_every: 1h`, written as the
approval store writes them (request, step, transitions and each one's timer row, migration
0014_timers), all opened two hours ago, so every one has a reminder due.

Timed, on the same database:

* ceiling - `SELECT request_id, due_at FROM approval_timers WHERE due_at <= now ORDER BY due_at`
  (the `ix_timers_due` index), every row fetched: the least any sweep must do to find the work;
* ours    - `StepTimers.sweep` exactly as the worker runs it every minute (after the start-up
  sweep, which also recomputes every open request's due moment: timed and shown separately):
  claims the due rows in batches, decides each reminder from the request's history, saves
  it (request version check, history row, audit entries, the reminder e-mail queued in the
  notification outbox, the next due moment) and releases the claim.

Afterwards every request must have exactly one reminder (checked). Not a test. Usage:

    .venv/bin/python -m bench.timers --requests 100000
    .venv/bin/python -m bench.timers --requests 100000 --database-url postgresql://postgres@127.0.0.1/test
    BENCH_PROFILE=/tmp/sweep.prof .venv/bin/python -m bench.timers   # the sweep under cProfile
"""

from __future__ import annotations

import argparse
import cProfile
import os
import platform
import sys
import tempfile
import time
import uuid
from dataclasses import fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, insert, select, text

from connector.approvals.business_time import CalendarTime
from connector.approvals.lifecycle import open_request
from connector.approvals.spec import EvalContext
from connector.approvals.timers import next_timer
from connector.config import Settings, parse_connections
from connector.notify.models import Notification
from connector.notify.queue import NotificationQueue
from connector.rules import MappingSet
from connector.runtime import Runtime
from connector.service.pipeline import Pipeline
from connector.service.timers import BATCH, StepTimers
from connector.storage.approval_store import RecordKey, StoredRequest, _request_values
from connector.storage.migrate import upgrade
from connector.storage.models import ApprovalRequestRow, ApprovalStepRow, ApprovalTransitionRow
from connector.storage.timers import ApprovalTimerRow

MAPPING = """
connection: sandbox
object: deal
fields:
  name: name
  amount: {api: amount, type: money}
  owner: {api: owner_id, type: user}
  owner_manager: {api: owner_manager_id, type: user}
rules:
  - name: big-deal
    when: {amount: {gt: 100000}}
    steps:
      - name: manager
        mode: one
        approvers: [{field: owner_manager}]
        remind_every: 1h
"""


class NoOrg:
    """Reminders never ask for managers; escalation would."""

    def manager_id(self, user_id: str) -> str | None:
        return None

    def is_active(self, user_id: str) -> bool:
        return True

    def queue_members(self, queue: str) -> tuple[str, ...] | None:
        return None


def seed(runtime: Runtime, mappings: MappingSet, count: int, opened_at: datetime) -> None:
    [spec] = mappings.mappings
    rule = spec.rules[0]
    batch: dict[str, list[dict[str, Any]]] = {"requests": [], "steps": [], "transitions": [], "timers": []}
    tables = {
        "requests": ApprovalRequestRow,
        "steps": ApprovalStepRow,
        "transitions": ApprovalTransitionRow,
        "timers": ApprovalTimerRow,
    }

    def flush() -> None:
        with runtime.engine.begin() as conn:
            for key, table in tables.items():
                if batch[key]:
                    conn.execute(insert(table), batch[key])
                batch[key].clear()

    for n in range(count):
        values = {
            "name": f"Deal {n}",
            "amount": 150000,
            "owner": f"rep-{n % 50}",
            "owner_manager": f"mgr-{n % 10}",
        }
        ctx = EvalContext(values, None, frozenset(values), opened_at.date(), opened_at)
        record = RecordKey("sandbox", "deal", f"D-{n}")
        outcome = open_request(
            rule, spec.roles, ctx, record_ref=record.ref, submitter=values["owner"], now=opened_at,
            request_id=uuid.uuid4().hex,
        )  # fmt: skip
        request = outcome.request
        stored = StoredRequest(request, record, spec.source_path, spec.content_hash)
        batch["requests"].append({"id": request.id, **_request_values(stored, request)})
        batch["steps"] += [_row(s) for s in request.steps]
        batch["transitions"] += [_row(t) for t in request.transitions]
        due = next_timer(request, rule, CalendarTime())
        assert due is not None
        batch["timers"].append(
            {"request_id": request.id, "step_index": due.step_index, "round": due.round, "kind": due.kind,
             "due_at": due.at}
        )  # fmt: skip
        if len(batch["requests"]) >= 2000:
            flush()
    flush()
    if runtime.engine.dialect.name == "postgresql":
        with runtime.engine.begin() as conn:
            conn.execute(text("ANALYZE"))


def _row(item: Any) -> dict[str, Any]:
    return {f.name: list(v) if isinstance(v := getattr(item, f.name), tuple) else v for f in fields(item)}


def ceiling(runtime: Runtime, now: datetime) -> tuple[float, int]:
    started = time.perf_counter()
    with runtime.engine.connect() as conn:
        rows = conn.execute(
            select(ApprovalTimerRow.request_id, ApprovalTimerRow.due_at)
            .where(ApprovalTimerRow.due_at <= now)
            .order_by(ApprovalTimerRow.due_at)
        ).all()
    return time.perf_counter() - started, len(rows)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.timers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000, help="open requests with a due reminder")
    parser.add_argument(
        "--database-url", default="", help="default: a new SQLite file in a temporary directory"
    )
    parser.add_argument(
        "--batch", type=int, default=BATCH, help=f"rows claimed per round trip (the worker's: {BATCH})"
    )
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench-timers-"))
    url = args.database_url or f"sqlite:///{workdir}/bench.db"
    (workdir / "mappings").mkdir()
    (workdir / "mappings" / "deals.yaml").write_text(MAPPING)
    settings = Settings(database_url=url, queue_url="memory://", connections=parse_connections({}),
                        mappings_dir=str(workdir / "mappings"))  # fmt: skip
    if url.startswith("postgresql"):
        with Runtime.from_settings(settings).engine.begin() as conn:  # a clean schema each run
            conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    upgrade(url)
    runtime = Runtime.from_settings(settings)
    mappings = MappingSet.load(workdir / "mappings")
    now = datetime.now(UTC)
    print(
        f"seeding {args.requests:,} pending requests with a due reminder ({runtime.engine.dialect.name})..."
    )
    seed(runtime, mappings, args.requests, now - timedelta(hours=2))

    select_seconds, found = ceiling(runtime, now)
    assert found == args.requests, found
    pipeline = Pipeline(runtime, mappings)
    timers = StepTimers(
        calendars=lambda _c: CalendarTime(),
        orgs=lambda _connection: NoOrg(),
        notifications=NotificationQueue(settings),
        clock=lambda: now,
        batch=args.batch,
    )
    pipeline.approvals.timers = timers
    pipeline.approvals.clock = lambda: now
    # a worker computes every open request's due moment afresh once, at start (and after a
    # mapping change); the periodic sweep after it is what is measured, this is shown beside it
    started = time.perf_counter()
    recomputed = timers.reschedule_after_mapping_change(pipeline.approvals, runtime.sessions)
    startup_seconds = time.perf_counter() - started
    profiler = cProfile.Profile() if os.environ.get("BENCH_PROFILE") else None
    started, cpu_started = time.perf_counter(), time.process_time()
    if profiler is not None:  # BENCH_PROFILE=file: the timed sweep alone under cProfile
        profiler.enable()
    report = timers.sweep(pipeline.approvals, runtime.sessions)
    sweep_seconds, sweep_cpu = time.perf_counter() - started, time.process_time() - cpu_started
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(os.environ["BENCH_PROFILE"])

    with runtime.sessions() as session:
        reminders = session.scalar(
            select(func.count())
            .select_from(ApprovalTransitionRow)
            .where(ApprovalTransitionRow.kind == "reminded")
        )
        mails = session.scalar(
            select(func.count()).select_from(Notification).where(Notification.event == "reminder")
        )
        still_due = session.scalar(select(func.count()).where(ApprovalTimerRow.due_at <= now))
    assert report.reminded == reminders == mails == args.requests, (report, reminders, mails)
    assert still_due == 0, still_due

    print(f"python {platform.python_version()} on {platform.machine()}, {runtime.engine.dialect.name}")
    print(f"ceiling: indexed SELECT of {found:,} due rows     {select_seconds:8.3f} s")
    print(f"ours:    sweep reminding {report.reminded:,} requests  {sweep_seconds:8.3f} s  "
          f"({report.reminded / sweep_seconds:,.0f} reminders/s)")  # fmt: skip
    print(f"         (of which this process's CPU time: {sweep_cpu:.3f} s; the rest is waiting for the "
          "database and for the machine's other processes)")  # fmt: skip
    print(
        f"(once at worker start: due moments of {recomputed:,} open requests recomputed "
        f"in {startup_seconds:.3f} s)"
    )
    print(f"ratio ours / ceiling: {sweep_seconds / select_seconds:,.0f}x; under 10 s: {sweep_seconds < 10}")
    runtime.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
