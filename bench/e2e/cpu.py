"""bench/e2e/cpu: the worker's CPU time per event of a `--crm hubspot` burst, in-process.

The events bench/e2e posts (ceil(N/100) HubSpot webhook requests, parsed by the webhook's own
parser and accepted into the inbox) are judged by `process_pending` with bench/e2e's HubSpot
mapping, then written back by one outbox `flush`, through the real HubSpot adapter against
the stand-in (bench/e2e/crm_standin.py, in its own process, no delay). Reported: the
process's CPU time per event for the apply and for the flush (and the garbage collector's
part of it), which stays comparable between runs on a shared machine where throughput does
not; no web server, no queue. Usage:

    .venv/bin/python -m bench.e2e.cpu --records 2000
    .venv/bin/python -m bench.e2e.cpu --database-url postgresql://postgres@127.0.0.1:5432/bench_x
    .venv/bin/python -m bench.e2e.cpu --profile /tmp/apply.prof     # the timed part under cProfile

PostgreSQL runs use a fresh schema, dropped afterwards.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import requests

from bench.deliveries import HUBSPOT_BATCH, hubspot_delivery
from bench.e2e.__main__ import CRMS, ROOT, free_port, hubspot_id, wait_http


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--database-url", default=None, help="PostgreSQL (default: a SQLite file)")
    parser.add_argument("--profile", default=None, help="write the timed part's cProfile (CPU clock) here")
    args = parser.parse_args()
    port = free_port()
    standin = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.e2e.crm_standin",
            "--port",
            str(port),
            "--delay",
            "0",
            "--crm",
            "hubspot",
        ],
        cwd=ROOT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/stats")
        with tempfile.TemporaryDirectory() as tmp:
            print(run(args, Path(tmp), url))
    finally:
        standin.terminate()
        standin.wait()


def run(args: argparse.Namespace, tmp: Path, standin: str) -> str:
    from connector.config import Settings
    from connector.storage.inbox import accept, process_pending
    from connector.storage.migrate import upgrade
    from connector.storage.outbox import flush
    from connector.wiring import build_runtime
    from webhooks.hubspot import parse_delivery

    crm = CRMS["hubspot"]
    (tmp / "mappings").mkdir()
    shutil.copy(ROOT / "bench" / "e2e" / crm.mapping, tmp / "mappings")
    schema = None
    if args.database_url:
        import psycopg

        schema = f"cpu_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(args.database_url, autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{schema}"')
        database_url = f"{args.database_url}?options=-csearch_path%3D{schema}"
    else:
        database_url = f"sqlite:///{tmp}/cpu.db"
    env = {
        **crm.env(standin),
        "DATABASE_URL": database_url,
        "QUEUE_URL": "memory://",
        "MAPPINGS_DIR": str(tmp / "mappings"),
        "METRICS_DIR": str(tmp / "metrics"),
        "NOTIFY_EMAIL": "false",
        "SECRET_KEY": "bench-e2e-" + "k" * 40,
        "LOG_LEVEL": "WARNING",
    }
    try:
        settings = Settings.from_env(env, dotenv_path=None)
        upgrade(database_url)
        runtime = build_runtime(settings)
        connection = settings.connections[crm.name]
        changes = [(hubspot_id(i), 150000 + i) for i in range(args.records)]
        events = []
        for start in range(0, args.records, HUBSPOT_BATCH):
            body, _headers = hubspot_delivery(
                "http://bench/webhooks/hubspot", changes[start : start + HUBSPOT_BATCH], start
            )
            events += parse_delivery(connection, json.loads(body))
        accept(runtime.sessions, events)
        assert runtime.processor is not None
        gc_time = _gc_timer()
        profile = cProfile.Profile(time.process_time) if args.profile else None
        start_cpu = time.process_time()
        if profile:
            profile.enable()
        done, more = 0, True
        while more:
            report = process_pending(runtime.sessions, runtime.processor)
            done, more = done + report.done, report.more
        applied_cpu = time.process_time()
        flush(runtime.sessions, runtime.adapter)
        if profile:
            profile.disable()
            profile.dump_stats(args.profile)
        end_cpu = time.process_time()
        gc.callbacks.remove(gc_time.callback)
        runtime.close()
    finally:
        if schema is not None:
            import psycopg

            with psycopg.connect(args.database_url, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    written = requests.get(f"{standin}/stats", timeout=5).json()["records_written"]
    assert done == written == args.records, (done, written)
    per = 1000 / args.records
    return (
        f"{'PostgreSQL' if schema else 'SQLite'}, {args.records} events: apply "
        f"{(applied_cpu - start_cpu) * per:.3f} ms CPU an event, flush {(end_cpu - applied_cpu) * per:.3f}, "
        f"total {(end_cpu - start_cpu) * per:.3f} (gc {gc_time.seconds * per:.3f}); "
        f"load average {os.getloadavg()[0]:.1f}{' (under cProfile)' if profile else ''}"
    )


class _GcTimer:
    def __init__(self) -> None:
        self.seconds = 0.0
        self._started = 0.0

    def callback(self, phase: str, _info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.process_time()
        else:
            self.seconds += time.process_time() - self._started


def _gc_timer() -> _GcTimer:
    timer = _GcTimer()
    gc.callbacks.append(timer.callback)
    return timer


if __name__ == "__main__":
    main()
