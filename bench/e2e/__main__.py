"""bench/e2e: a burst of N record changes, from signed webhooks to write-backs landed in a
CRM stand-in, beside a direct batch write of the same records to the same stand-in.

Starts a CRM stand-in (bench/e2e/crm_standin.py, each call taking --delay seconds), the web
server (`crm-approvals serve`) and W worker processes (`crm-approvals worker --workers 1`)
against a fresh database, posts the N record changes as webhooks and waits until every
record's write-back has landed. `--crm sandbox` (the default): N Standard Webhooks deliveries
in the sandbox CRM's format, one change each, without the credit score the mapping needs.
`--crm hubspot`: ceil(N/100) HubSpot webhook requests of up to 100 `deal.propertyChange`
events each, signed v3, against a stand-in of HubSpot's CRM v3 API (bench/e2e/
hubspot_standin.py); an event carries one property, so the worker reads each deal's stage.
Either way every record is read once, in batches. Reports records/s from the first post to
the last write, its ratio to the direct batch write (the ceiling: the adapter's
`update_records` of the same N records), read and write calls against ceil(N/100), and
duplicated writes.

    .venv/bin/python -m bench.e2e                                  # SQLite, 1 worker, instant CRM
    .venv/bin/python -m bench.e2e --crm hubspot                    # the same, HubSpot's formats
    .venv/bin/python -m bench.e2e --database-url postgresql://postgres@127.0.0.1:5432/test \\
        --redis-url redis://127.0.0.1:6379/5 --workers 1,2,4 --delay 0.2

With --redis-url the given Redis database is the queue and is FLUSHED before each run.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from bench.deliveries import HUBSPOT_BATCH, HUBSPOT_SECRET, SECRET, hubspot_delivery, signed_delivery
from bench.ingest.__main__ import cpu_seconds, database_cpu, database_cpu_since, free_port, processes_cpu

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
LIMIT = 100  # the read and write batch limit of both CRMs (sandbox; HubSpot batch read/update)
Deliveries = list[tuple[bytes, dict[str, str]]]


def tree_cpu(pid: int) -> float:
    """CPU seconds so far of a process and its live descendants (a gunicorn master and its
    workers, say), from /proc (Linux; 0 elsewhere)."""
    pids, seen = [str(pid)], 0
    while seen < len(pids):
        for task in Path(f"/proc/{pids[seen]}/task").glob("*"):
            with contextlib.suppress(OSError):
                pids.extend((task / "children").read_text().split())
        seen += 1
    return processes_cpu(pids)


class CpuByParty:
    """Each party's CPU seconds between two readings: the web server, the workers, the CRM
    stand-in and, on a PostgreSQL of this host, the database. On a machine whose cores they
    all share, their sum per record bounds what any number of workers can reach."""

    def __init__(self, parties: dict[str, list[int]], database_url: str | None) -> None:
        self.parties, self.database_url = parties, database_url
        self.before = self._read()
        self.database_before = database_cpu(database_url) if database_url else {}

    def _read(self) -> dict[str, float]:
        return {name: sum(tree_cpu(pid) for pid in pids) for name, pids in self.parties.items()}

    def since(self) -> dict[str, float]:
        used = {name: seconds - self.before[name] for name, seconds in self._read().items()}
        if self.database_url:
            used["database"] = database_cpu_since(self.database_url, self.database_before)
        return used


def wait_http(url: str, seconds: float = 30) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            requests.get(url, timeout=2)
            return
        except requests.RequestException:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {seconds:.0f} s")


def wait_idle(pids: list[int], quiet: float = 1.0, seconds: float = 120) -> None:
    """Wait until every process used almost no CPU for `quiet` seconds: booted and idle."""
    deadline = time.time() + seconds
    before = [cpu_seconds(pid) for pid in pids]
    while time.time() < deadline:
        time.sleep(quiet)
        after = [cpu_seconds(pid) for pid in pids]
        if all(b - a < 0.05 * quiet for a, b in zip(before, after, strict=True)):
            return
        before = after
    raise RuntimeError(f"the workers were still busy after {seconds:.0f} s")


def fresh_database(url: str | None, tmp: Path, run: str) -> tuple[str, str | None]:
    """(DATABASE_URL, PostgreSQL schema to drop afterwards or None)."""
    if url is None:
        return f"sqlite:///{tmp}/{run}.db", None
    import psycopg

    schema = f"bench_e2e_{run}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    return f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}", schema


def drop_schema(url: str, schema: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def post_all(url: str, deliveries: list[tuple[bytes, dict[str, str]]], concurrency: int) -> int:
    """Post concurrently, as a CRM does, each thread over its own kept-alive connection.

    With the standard library's http.client rather than requests: the posting threads share
    one process (one GIL) and the machine's cores with the server and the workers, and
    requests' per-call machinery cost about 2 ms of CPU per delivery (bench.ingest's client
    figure), which capped the sandbox format's one-change-per-delivery bursts at what this
    process could send, not at what we can take in (docs/benchmarks.md, bench/e2e)."""
    target = urllib.parse.urlsplit(url)
    local = threading.local()

    def post(delivery: tuple[bytes, dict[str, str]]) -> int:
        connection = getattr(local, "connection", None)
        if connection is None:
            connection = local.connection = http.client.HTTPConnection(target.netloc, timeout=60)
        body, headers = delivery
        connection.request("POST", target.path, body=body, headers=headers)
        response = connection.getresponse()
        answer = response.read()
        return int(json.loads(answer)["accepted"]) if response.status == 202 else 0

    with ThreadPoolExecutor(concurrency) as pool:
        return sum(pool.map(post, deliveries))


@dataclass(frozen=True)
class Crm:
    """What differs between the CRMs the bench speaks: the connection's settings, the webhook
    endpoint and format, the mapping, and the adapter the ceiling writes through."""

    name: str
    object_type: str
    webhook_path: str
    mapping: str  # in bench/e2e
    settings: Callable[[str], dict[str, str]]  # stand-in URL -> the connection's settings
    sign: Callable[[int, str], Deliveries]  # (N, public base URL) -> signed deliveries
    record_id: Callable[[int], str]
    per_delivery: int  # record changes per webhook request

    def env(self, standin: str) -> dict[str, str]:
        prefix = self.name.upper() + "_"
        return {"CRM_CONNECTIONS": self.name, **{prefix + k: v for k, v in self.settings(standin).items()}}

    def adapter(self, standin: str) -> Any:
        """The connection's adapter, built as the worker builds it (connector/crm/registry.py)."""
        from connector.config import ConnectionConfig, Settings
        from connector.crm.registry import build_adapter

        settings = Settings.from_env(self.env(standin), dotenv_path=None)
        connection = ConnectionConfig(name=self.name, kind=self.name, settings=self.settings(standin))
        return build_adapter(connection, settings)


def sign_sandbox(total: int, base_url: str) -> Deliveries:
    """One Standard Webhooks delivery per record change."""
    return [signed_delivery(f"D-{i}", 150000 + i, "negotiation") for i in range(total)]


def sign_hubspot(total: int, base_url: str) -> Deliveries:
    """HubSpot webhook requests of up to 100 events (one amount change per deal) each."""
    uri = base_url + "/webhooks/hubspot"
    changes = [(hubspot_id(i), 150000 + i) for i in range(total)]
    return [
        hubspot_delivery(uri, changes[start : start + HUBSPOT_BATCH], 7_000_000 + start)
        for start in range(0, total, HUBSPOT_BATCH)
    ]


def hubspot_id(i: int) -> str:
    return str(30_000_000_000 + i)  # a deal id as HubSpot numbers them


CRMS = {
    "sandbox": Crm(
        "sandbox", "deal", "/webhooks/standard", "mapping.yaml",
        lambda url: {"WEBHOOK_SECRET": SECRET, "URL": url, "API_TOKEN": "bench"},
        sign_sandbox, lambda i: f"D-{i}", 1,
    ),
    "hubspot": Crm(
        "hubspot", "deals", "/webhooks/hubspot", "mapping_hubspot.yaml",
        lambda url: {"CLIENT_SECRET": HUBSPOT_SECRET, "BASE_URL": url,
                     "ACCESS_TOKEN": "pat-na1-00000000-bench-0000-0000-000000000000"},
        sign_hubspot, hubspot_id, HUBSPOT_BATCH,
    ),
}  # fmt: skip


def ceiling_seconds(crm: Crm, standin: str, total: int) -> float:
    """The same N records written straight through the CRM's adapter: ceil(N/100) calls."""
    from connector.crm.base import RecordUpdate

    adapter = crm.adapter(standin)
    updates = [RecordUpdate(crm.record_id(i), {"approval_status": "Pending"}) for i in range(total)]
    start = time.perf_counter()
    results = adapter.update_records(crm.object_type, updates)
    elapsed = time.perf_counter() - start
    assert all(r.ok for r in results), [r for r in results if not r.ok][:3]
    return elapsed


def run_once(
    args: argparse.Namespace, tmp: Path, workers: int, standin: str, standin_pid: int
) -> dict[str, Any]:
    crm: Crm = CRMS[args.crm]
    run = f"w{workers}"
    database_url, schema = fresh_database(args.database_url, tmp, run)
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "QUEUE_URL": args.redis_url or f"sqlite:///{tmp}/{run}-queue.db",
        **crm.env(standin),
        "MAPPINGS_DIR": str(tmp / "mappings"),
        "METRICS_DIR": str(tmp / f"{run}-metrics"),
        "LOG_LEVEL": "WARNING",
        "SECRET_KEY": "bench-e2e-" + "k" * 40,
        "NOTIFY_EMAIL": "false",  # the record path only: no mail server in the bench
        "PYTHONPATH": str(ROOT),
    }
    if args.redis_url:
        import redis

        redis.Redis.from_url(args.redis_url).flushdb()
    connector = [sys.executable, "-m", "connector", "--env-file", "/dev/null"]
    subprocess.run([*connector, "db", "upgrade"], cwd=ROOT, env=env, check=True, capture_output=True)
    requests.post(f"{standin}/reset", timeout=5)
    port = free_port()
    env["PUBLIC_BASE_URL"] = f"http://127.0.0.1:{port}"  # what HubSpot's signature covers
    procs = [
        subprocess.Popen(
            [*connector, "serve", "--bind", f"127.0.0.1:{port}", "--workers", "2", "--threads", "8"],
            cwd=ROOT,
            env=env,
        )
    ]
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        for _ in range(workers):
            profile = (
                ["-m", "cProfile", "-o", os.environ["BENCH_PROFILE"]]
                if os.environ.get("BENCH_PROFILE")
                else []
            )
            worker = [sys.executable, *profile, "-m", "connector", "--env-file", "/dev/null", "worker"]
            procs.append(subprocess.Popen([*worker, "--workers", "1"], cwd=ROOT, env=env))
        # Every worker booted and through its start-up sweep (on an empty inbox) before the
        # clock starts: a fixed 3 s wait was too short for 4 workers booting on 2 busy cores,
        # which then spent the first seconds of the burst importing.
        wait_idle([p.pid for p in procs[1:]])
        # Signed before the clock starts: signing is the CRM's work, on its own machine, not
        # ours (here it would take the cores the server and workers share).
        deliveries = crm.sign(args.records, env["PUBLIC_BASE_URL"])
        cpu = CpuByParty(
            {"server": [procs[0].pid], "workers": [p.pid for p in procs[1:]], "stand-in": [standin_pid]},
            args.database_url,
        )
        start = time.time()
        poster_cpu = time.process_time()
        accepted = post_all(env["PUBLIC_BASE_URL"] + crm.webhook_path, deliveries, args.concurrency)
        poster_cpu = time.process_time() - poster_cpu  # the sender's share of the cores
        posted = time.time() - start
        deadline = time.time() + args.timeout
        stats: dict[str, Any] = {}
        while time.time() < deadline:
            stats = requests.get(f"{standin}/stats", timeout=5).json()
            if stats["records_written"] >= args.records:
                break
            time.sleep(0.2)
        cpu_used = {"poster": poster_cpu, **cpu.since()}
        time.sleep(1.0)  # a straggling duplicate write would land now
        stats = requests.get(f"{standin}/stats", timeout=5).json()
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if schema is not None:
            drop_schema(args.database_url, schema)
    done = stats.get("records_written", 0) >= args.records
    elapsed = (stats["last_write"] - start) if done and stats.get("last_write") else float("nan")
    return {
        "workers": workers,
        "accepted": accepted,
        "post_s": posted,
        "post_cpu_s": poster_cpu,
        "cpu_s": cpu_used,
        "complete": done,
        "seconds": elapsed,
        "records_per_s": args.records / elapsed if done else 0.0,
        "start": start,
        **stats,
    }


def overlap(calls: list[list[Any]]) -> tuple[int, float]:
    """(most CRM calls in flight at once, mean calls in flight while any was)."""
    edges = sorted([(c[0], 1) for c in calls] + [(c[1], -1) for c in calls])
    peak = level = 0
    busy = 0.0
    last = edges[0][0] if edges else 0.0
    for moment, step in edges:
        if level:
            busy += moment - last
        level += step
        peak = max(peak, level)
        last = moment
    total = sum(c[1] - c[0] for c in calls)
    return peak, (total / busy if busy else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--crm", choices=sorted(CRMS), default="sandbox", help="webhook and API formats")
    parser.add_argument("--records", type=int, default=2000, help="record changes in the burst")
    parser.add_argument("--workers", default="1", help="worker process counts to run, e.g. 1,2,4")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds each stand-in CRM call takes")
    parser.add_argument("--database-url", default=None, help="PostgreSQL URL; default: a fresh SQLite file")
    parser.add_argument("--redis-url", default=None, help="queue on this Redis db (flushed); default: SQLite")
    parser.add_argument("--concurrency", type=int, default=8, help="threads posting the webhooks")
    parser.add_argument("--calls-log", default=None, help="write each run's CRM calls (JSON) here")
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for the write-backs")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]  # the machine may be shared: say how busy it was
    tmp = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    (tmp / "mappings").mkdir()
    crm = CRMS[args.crm]
    shutil.copy(HERE / crm.mapping, tmp / "mappings" / "bench-deals.yaml")
    port = free_port()
    standin_proc = subprocess.Popen(
        [sys.executable, "-m", "bench.e2e.crm_standin", "--port", str(port), "--delay", str(args.delay),
         "--crm", crm.name],
        cwd=ROOT,
    )  # fmt: skip
    standin = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{standin}/stats")
        ceiling = ceiling_seconds(crm, standin, args.records)
        rows = [run_once(args, tmp, int(w), standin, standin_proc.pid) for w in args.workers.split(",")]
    finally:
        standin_proc.terminate()
        standin_proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)

    minimum = math.ceil(args.records / LIMIT)
    backend = "PostgreSQL" if args.database_url else "SQLite"
    queue = "Redis" if args.redis_url else "SQLite"
    deliveries = math.ceil(args.records / crm.per_delivery)
    print(
        f"bench/e2e: {args.records} records ({crm.name} webhooks: {deliveries} deliveries), "
        f"{backend} + {queue} queue, CRM call {args.delay * 1000:.0f} ms"
    )
    print(
        f"ceiling (direct batch write, {minimum} calls): {ceiling:.2f} s "
        f"= {args.records / ceiling:.0f} records/s"
    )
    print(
        f"{'workers':>7} {'done':>5} {'s':>7} {'rec/s':>7} {'ratio':>6} {'reads':>9} {'writes':>9} {'dup':>4}"
    )
    print(f"{'':>7} {'':>5} {'':>7} {'':>7} {'':>6} {'(of min)':>9} {'(of min)':>9} {'':>4}")
    base = rows[0]["records_per_s"] or float("nan")
    for row in rows:
        ratio = row["records_per_s"] * ceiling / args.records
        print(
            f"{row['workers']:>7} {str(row['complete']):>5} {row['seconds']:7.2f} "
            f"{row['records_per_s']:7.0f} "
            f"{ratio:5.2f}x {row['read_calls']:>4}/{minimum:<4} {row['write_calls']:>4}/{minimum:<4} "
            f"{row['duplicated_records']:>4}"
        )
    if args.calls_log:
        Path(args.calls_log).write_text(json.dumps(rows))
    for row in rows:
        peak, mean = overlap(row["calls"])
        print(
            f"{row['workers']} workers: CRM calls in flight at once: at most {peak}, {mean:.2f} on average "
            f"while any was; {len({c[3] for c in row['calls']})} client connections"
        )
        print(
            f"{row['workers']} workers: posting took {row['post_s']:.2f} s "
            f"(the poster's CPU {row['post_cpu_s']:.2f} s); other reads (drift repair) "
            f"{row['other_reads']}; ids per read call {row['read_sizes']}; records per write call "
            f"{row['write_sizes']}"
        )
    for row in rows:
        used = row["cpu_s"]
        per_record = {name: seconds / args.records * 1000 for name, seconds in used.items()}
        total = sum(per_record.values())
        print(
            f"{row['workers']} workers: CPU ms per record: "
            + ", ".join(f"{name} {ms:.2f}" for name, ms in per_record.items())
            + f"; in all {total:.2f}, so {os.cpu_count()} cores allow at most "
            f"{(os.cpu_count() or 1) * 1000 / total:.0f} records/s at this cost"
        )
    print(
        f"load average (1 min) at the start {load_before:.1f}, at the end "
        f"{os.getloadavg()[0]:.1f}, on {os.cpu_count()} CPUs"
    )
    if len(rows) > 1:
        print("speed-up vs the first row: " + ", ".join(
            f"{r['workers']} workers {r['records_per_s'] / base:.2f}x" for r in rows
        ))  # fmt: skip


if __name__ == "__main__":
    main()
