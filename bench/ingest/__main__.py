"""bench/ingest: signed webhooks per second, ours vs a bare Flask endpoint, in one run.

Both apps are served the same way (gunicorn, same workers/threads) and loaded by the same
separate client processes. Ours verifies the Standard Webhooks signature, parses, writes the
event durably to the inbox (SQLite by default) and enqueues the worker nudge before it
answers; the ceiling only reads the body. Usage:

    .venv/bin/python -m bench.ingest --requests 4000 --concurrency 16
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from bench.deliveries import SECRET, signed_delivery

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# The names `crm-approvals serve --worker-class` takes, and what gunicorn is given for each.
WORKER_CLASSES = {
    "waitress": "connector.waitress_worker.WaitressWorker",
    "gthread": "gthread",
    "gevent": "gevent",
}


def start_server(
    app_uri: str, port: int, env: dict[str, str], workers: int, threads: int, worker_class: str
) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-m",
        "gunicorn",
        app_uri,
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        str(workers),
        "--threads",
        str(threads),
        "--worker-class",
        WORKER_CLASSES[worker_class],
        "--worker-connections",
        "1000",
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
            return proc
        except (requests.ConnectionError, requests.Timeout):
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{app_uri} did not start")


def server_cpu(server: subprocess.Popen[bytes]) -> float:
    """CPU seconds (user + system) the server's worker processes have used so far, from /proc
    (Linux; 0 elsewhere). Steadier than throughput on a shared machine: it leaves out the
    clients, and does not depend on who else has the cores."""
    children = Path(f"/proc/{server.pid}/task/{server.pid}/children")
    if not children.exists():
        return 0.0
    return processes_cpu(children.read_text().split())


def database_cpu(database_url: str) -> dict[str, float]:
    """CPU seconds used so far, by pid, by the PostgreSQL processes that work for this run:
    the backends connected to its database and the server's own (WAL writer, checkpointer,
    ...), not other databases' backends (another run's, say)."""
    import psycopg

    with psycopg.connect(database_url.replace("+psycopg", ""), autocommit=True) as conn:
        pids = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid()"
            " AND (datname = current_database() OR datname IS NULL)"
        ).fetchall()
    return {str(pid): processes_cpu([str(pid)]) for (pid,) in pids}


def database_cpu_since(database_url: str, before: dict[str, float]) -> float:
    """What the database used since `before`: backends that exited meanwhile are left out
    (their last readings are gone), new ones count whole."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in database_cpu(database_url).items())


def processes_cpu(pids: list[str]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):  # a process that just exited
            total += cpu_seconds(pid)
    return total


def cpu_seconds(pid: int | str) -> float:
    """User + system CPU time of a process so far (Linux /proc); OSError once it is gone."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    """CPU seconds of this process's finished children: the client processes `load` joined."""
    times = os.times()
    return times.children_user + times.children_system


def client(url: str, count: int, offset: int, queue: mp.Queue) -> None:  # type: ignore[type-arg]
    session = requests.Session()
    latencies, accepted = [], 0
    for i in range(count):
        body, headers = signed_delivery(f"D-{offset + i}", 100000 + i, "Negotiation")
        start = time.perf_counter()
        response = session.post(url, data=body, headers=headers, timeout=30)
        latencies.append(time.perf_counter() - start)
        accepted += response.status_code == 202
    queue.put((latencies, accepted))


def load(url: str, total: int, concurrency: int) -> dict[str, float]:
    queue: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    per = total // concurrency
    procs = [mp.Process(target=client, args=(url, per, i * per, queue)) for i in range(concurrency)]
    clients_before = children_cpu()
    start = time.perf_counter()
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    elapsed = time.perf_counter() - start
    for p in procs:
        p.join()
    clients = children_cpu() - clients_before
    latencies = sorted(x for lats, _ in results for x in lats)
    accepted = sum(a for _, a in results)
    return {
        "accepted": accepted,
        "accepted_per_s": accepted / elapsed,
        "elapsed": elapsed,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
        "clients_cpu": clients,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=16, help="client processes (one connection each)")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers for both apps")
    parser.add_argument("--threads", type=int, default=8, help="threads per gunicorn worker for both apps")
    parser.add_argument(
        "--worker-class",
        choices=tuple(WORKER_CLASSES),
        default="waitress",
        help="gunicorn worker class for both apps (default: what `crm-approvals serve` uses)",
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="turns each app takes (requests are split between them)"
    )
    parser.add_argument("--database-url", default=None, help="default: a fresh SQLite file")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    env = {
        **os.environ,
        "DATABASE_URL": args.database_url or f"sqlite:///{tmp}/bench.db",
        "QUEUE_URL": f"sqlite:///{tmp}/queue.db",
        "CRM_CONNECTIONS": "sandbox",
        "SANDBOX_WEBHOOK_SECRET": SECRET,
        "LOG_LEVEL": "WARNING",
        # as in production (`crm-approvals init` writes one): with it, Flask signs sessions
        "SECRET_KEY": "bench-ingest-" + "k" * 40,
        "PYTHONPATH": str(ROOT),
    }
    subprocess.run(
        [sys.executable, "-m", "connector", "--env-file", "/dev/null", "db", "upgrade"],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
    )
    # The database's CPU is counted when it runs on this host, sharing the cores with the run.
    postgres = bool(args.database_url) and any(h in args.database_url for h in ("@127.0.0.1", "@localhost"))
    apps = {
        "ceiling (bare Flask)": "bench.ingest.ceiling_app:app",
        "crm-approvals": "webhooks.app:create_app()",
    }
    servers: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in apps}
    try:
        for name, app_uri in apps.items():
            port = free_port()
            url = f"http://127.0.0.1:{port}/webhooks/standard"
            servers[name] = (
                start_server(app_uri, port, env, args.workers, args.threads, args.worker_class),
                url,
            )
            load(url, 200, 4)  # warm-up
        # Both servers stay up (the idle one costs nothing) and take turns, round after round,
        # so that a load change on a shared machine hits both sides alike.
        per_round = args.requests // args.rounds
        for _ in range(args.rounds):
            for name, (server, url) in servers.items():
                cpu_before, db_before = (
                    server_cpu(server),
                    database_cpu(env["DATABASE_URL"]) if postgres else {},
                )
                result = load(url, per_round, args.concurrency)
                result["server_cpu"] = server_cpu(server) - cpu_before
                result["database_cpu"] = (
                    database_cpu_since(env["DATABASE_URL"], db_before) if postgres else 0.0
                )
                runs[name].append(result)
    finally:
        for server, _url in servers.values():
            server.terminate()
            server.wait()
    rows = {name: combine(results) for name, results in runs.items()}
    print(f"{args.worker_class}: {args.workers} workers x {args.threads} threads; {args.rounds} rounds")
    print(f"{'app':24} {'accepted/s':>11} {'p50 ms':>8} {'p99 ms':>8}")
    for name, row in rows.items():
        print(f"{name:24} {row['accepted_per_s']:11.0f} {row['p50_ms']:8.2f} {row['p99_ms']:8.2f}")
    ratio = rows["crm-approvals"]["accepted_per_s"] / rows["ceiling (bare Flask)"]["accepted_per_s"]
    per_round_ratios = [
        ours["accepted_per_s"] / ceiling["accepted_per_s"]
        for ours, ceiling in zip(runs["crm-approvals"], runs["ceiling (bare Flask)"], strict=True)
    ]
    print(f"ratio (ours / ceiling): {ratio:.2f}x  (target >= 0.80x on SQLite, 0.90x on PostgreSQL)")
    print(
        f"per round: {', '.join(f'{r:.2f}' for r in per_round_ratios)}; "
        f"median {statistics.median(per_round_ratios):.2f}x"
    )
    sent = args.rounds * (per_round - per_round % args.concurrency)
    print(f"accepted by ours: {rows['crm-approvals']['accepted']:.0f} of {sent}")
    print_cpu_budget(runs, rows, postgres)


def print_cpu_budget(
    runs: dict[str, list[dict[str, float]]], rows: dict[str, dict[str, float]], postgres: bool
) -> None:
    """Where each accepted request's CPU went (Linux): the clients, the server's workers and, on
    a local PostgreSQL, the database. Clients and servers share the cores, so when they are
    busy the ratio is bounded by the CPU each request costs in all: even a server of ours
    costing no more than the bare endpoint would reach at most (clients + bare server) /
    (clients + bare server + database)."""
    cpu = {
        name: {part: sum(r[part] for r in runs[name]) * 1000 / rows[name]["accepted"] for part in PARTS}
        for name in rows
    }
    if not all(c["server_cpu"] for c in cpu.values()):
        return
    print(
        "CPU ms per accepted request (user + system): clients, server workers"
        + (", database" if postgres else "")
    )
    for name, parts in cpu.items():
        shown = [parts["clients_cpu"], parts["server_cpu"]] + ([parts["database_cpu"]] if postgres else [])
        print(f"  {name:22} {', '.join(f'{x:.3f}' for x in shown)}  total {sum(shown):.3f}")
    ceiling, ours = cpu["ceiling (bare Flask)"], cpu["crm-approvals"]
    print(
        f"server CPU ms per accepted request (workers' user + system): ceiling "
        f"{ceiling['server_cpu']:.3f}, ours {ours['server_cpu']:.3f}"
    )
    if postgres:
        bare = ours["clients_cpu"] + ceiling["server_cpu"]
        bound = bare / (bare + ours["database_cpu"])
        print(f"ratio bound from the database's CPU alone (cores saturated): {bound:.2f}x")


PARTS = ("clients_cpu", "server_cpu", "database_cpu")


def combine(results: list[dict[str, float]]) -> dict[str, float]:
    """Rounds together: total accepted over total time, latencies as the rounds' medians."""
    return {
        "accepted": sum(r["accepted"] for r in results),
        "accepted_per_s": sum(r["accepted"] for r in results) / sum(r["elapsed"] for r in results),
        "p50_ms": statistics.median(r["p50_ms"] for r in results),
        "p99_ms": max(r["p99_ms"] for r in results),
    }


if __name__ == "__main__":
    main()
