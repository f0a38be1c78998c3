"""bench/api: latency of the API's lists, request page and vote with 100,000 requests in the
database, beside a trivial endpoint (/livez) of the same server, in one run.

A fresh database (a temporary SQLite file, or a fresh schema in the PostgreSQL database
given) is migrated and filled by INSERT ... SELECT with 100,000 requests of 100 submitters,
every 7th pending at its first step and waiting for one of 50 managers (as the approval
store leaves them: steps, transitions, assignees, waiting rows); the rest approved. The
app runs under gunicorn as in production (bench/ingest's server), one client process asks
each endpoint in turn, sequentially, and the median and 95th percentile are compared with
/livez's median.

Usage:

    .venv/bin/python -m bench.api
    .venv/bin/python -m bench.api --database-url postgresql://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import requests

from bench.deliveries import SECRET
from bench.expire.__main__ import fresh_database
from bench.ingest.__main__ import free_port, start_server

ROOT = Path(__file__).resolve().parents[2]
MANAGERS = 50
VACUUMED = ("approval_requests", "approval_steps", "approval_assignees", "approval_waiting")
SUBMITTERS = 100


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.api", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000, help="requests in the database")
    parser.add_argument(
        "--database-url", default="", help="PostgreSQL URL (default: a temporary SQLite file)"
    )
    parser.add_argument(
        "--samples", type=int, default=200, help="calls per endpoint (votes: at most the pending)"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-api-"))
    mappings = work / "mappings"
    mappings.mkdir()
    shutil.copy(ROOT / "mappings/examples/sandbox-deals.yaml", mappings)
    url, drop = fresh_database(args.database_url, work, args.requests)
    server = None
    try:
        started = time.perf_counter()
        tokens, pending = seed(url, args.requests)
        print(
            f"bench/api on {'PostgreSQL' if args.database_url else 'SQLite'}: {args.requests:,} requests "
            f"generated in {time.perf_counter() - started:.1f} s; gunicorn {args.workers} worker(s) x "
            f"{args.threads} thread(s), {os.cpu_count()} CPU(s)"
        )
        env = {
            **os.environ,
            "DATABASE_URL": url,
            "QUEUE_URL": "memory://",
            "MAPPINGS_DIR": str(mappings),
            "CRM_CONNECTIONS": "sandbox",
            "SANDBOX_API_TOKEN": "bench",
            "SANDBOX_URL": "http://sandbox.invalid",
            "SANDBOX_WEBHOOK_SECRET": SECRET,
            "LOG_LEVEL": "WARNING",
        }
        port = free_port()
        server = start_server("webhooks.app:create_app()", port, env, args.workers, args.threads, "gthread")
        base = f"http://127.0.0.1:{port}"
        results = run(base, tokens, pending, args.samples)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        drop()
        shutil.rmtree(work, ignore_errors=True)
    trivial = results.pop("trivial (/livez)")
    print(f"{'endpoint':<44} {'median':>9} {'p95':>9} {'ratio':>7}   (target: within 5x /livez)")
    print(f"{'trivial (/livez)':<44} {trivial[0]:>7.2f}ms {trivial[1]:>7.2f}ms {1:>6.1f}x")
    for name, (median, p95) in results.items():
        print(f"{name:<44} {median:>7.2f}ms {p95:>7.2f}ms {median / trivial[0]:>6.1f}x")
    return 0


def run(
    base: str, tokens: dict[str, str], pending: list[str], samples: int
) -> dict[str, tuple[float, float]]:
    http = requests.Session()

    def get(token: str, path: str) -> Callable[[int], requests.Response]:
        headers = {"Authorization": f"Bearer {token}"}
        return lambda _n: http.get(base + path, headers=headers, timeout=30)

    manager, rep, admin = tokens["u-mgr-7"], tokens["u-rep-3"], tokens["u-admin"]
    votes = pending[: min(samples, len(pending))]
    calls: dict[str, Callable[[int], requests.Response]] = {
        "trivial (/livez)": lambda _n: http.get(base + "/livez", timeout=30),
        "pending list (manager, 50 a page)": get(manager, "/api/v1/requests?pending_for=me&limit=50"),
        "my requests (submitter, 50 a page)": get(rep, "/api/v1/requests?all=true&limit=50"),
        "admin list, all (50 a page)": get(admin, "/api/v1/requests?all=true&limit=50"),
        "admin list, status=approved (50 a page)": get(admin, "/api/v1/requests?status=approved&limit=50"),
        "request page (GET /requests/<id>)": lambda n: http.get(
            f"{base}/api/v1/requests/{pending[n % len(pending)]}",
            headers={"Authorization": f"Bearer {manager}"},
            timeout=30,
        ),
        f"vote (approve, {len(votes)} distinct requests)": lambda n: http.post(
            f"{base}/api/v1/requests/{votes[n]}/approve",
            json={},
            headers={"Authorization": f"Bearer {manager}"},
            timeout=30,
        ),
    }
    results = {}
    for name, call in calls.items():
        count = len(votes) if name.startswith("vote") else samples
        for n in range(min(5, count) if not name.startswith("vote") else 0):
            check(name, call(n))  # warm up: connections, caches
        latencies = []
        for n in range(count):
            started = time.perf_counter()
            response = call(n)
            latencies.append((time.perf_counter() - started) * 1000)
            check(name, response)
        latencies.sort()
        results[name] = (statistics.median(latencies), latencies[int(len(latencies) * 0.95) - 1])
    return results


def check(name: str, response: requests.Response) -> None:
    if response.status_code != 200:
        raise SystemExit(f"{name}: HTTP {response.status_code}: {response.text[:500]}")


def seed(url: str, count: int) -> tuple[dict[str, str], list[str]]:
    """The requests, and tokens of a manager, a submitter and an admin; the manager's pending ids."""
    from sqlalchemy import bindparam, select, text

    from connector.config import Settings
    from connector.runtime import Runtime
    from connector.storage.db import UTCDateTime, transaction
    from connector.storage.migrate import upgrade
    from connector.storage.models import ApprovalWaitingRow
    from connector.storage.tokens import create_token

    upgrade(url)
    env = {"DATABASE_URL": url, "QUEUE_URL": "memory://", "CRM_CONNECTIONS": "sandbox"}
    runtime = Runtime.from_settings(Settings.from_env(env, dotenv_path=os.devnull))
    postgres = url.startswith("postgresql")
    series = (
        "SELECT i FROM generate_series(0, :last) AS s(i)"
        if postgres
        else "WITH RECURSIVE s(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM s WHERE i < :last) SELECT i FROM s"
    )
    active = "'sandbox:deal:D-' || i || '\\:deal-approval'"  # \: is a colon, not a parameter
    ident = "'q-' || lpad(i::text, 8, '0')" if postgres else "printf('q-%08d', i)"
    number = "CAST(substr(r.id, 3) AS INTEGER)"
    jsonb = "::jsonb" if postgres else ""
    no = "false" if postgres else "0"
    # submitted one minute apart, newest last
    submitted = (
        "(:at + i * interval '1 minute')"
        if postgres
        else "(strftime('%Y-%m-%d %H:%M:%S', :at, '+' || i || ' minutes') || '.000000')"
    )
    at = bindparam("at", datetime(2025, 1, 1, tzinfo=UTC), type_=UTCDateTime())
    record = '{"amount": 50000, "credit_score": 80, "term_months": 6, "owner_manager": "u-mgr"}'
    statements = [
        text(
            "INSERT INTO approval_requests (id, connection, object_type, record_id, rule_name, mapping_path, "
            "mapping_hash, submitter, status, current_step, record, changed_fields, submitted_at, "
            f"updated_at, approved_at, version, active_key) SELECT {ident}, 'sandbox', 'deal', 'D-' || i, "
            "'deal-approval', "
            f"'sandbox-deals.yaml', '{'0' * 64}', 'u-rep-' || (i % {SUBMITTERS}), "
            "CASE WHEN i % 7 = 0 THEN 'pending' ELSE 'approved' END, CASE WHEN i % 7 = 0 THEN 0 END, "
            f"'{record}'{jsonb}, '[]'{jsonb}, {submitted}, {submitted}, "
            f"CASE WHEN i % 7 = 0 THEN NULL ELSE {submitted} END, 2, "
            f"CASE WHEN i % 7 = 0 THEN {active} END FROM ({series}) AS n"
        ).bindparams(at, last=count - 1),
        text(
            'INSERT INTO approval_steps (request_id, "index", round, name, mode, approvers, required, '
            "status, "
            f"entered_at, left_at) SELECT r.id, 0, 1, 'manager', 'one', "
            f"('[\"u-mgr-' || ({number} % {MANAGERS}) || '\"]'){jsonb}, 1, "
            "CASE WHEN r.status = 'pending' THEN 'pending' ELSE 'approved' END, r.submitted_at, "
            "r.approved_at "
            "FROM approval_requests AS r"
        ),
        text(
            "INSERT INTO approval_transitions (request_id, seq, kind, from_status, to_status, step_index, "
            "at, "
            f"acting_admin) SELECT r.id, 1, 'submitted', NULL, 'submitted', NULL, r.submitted_at, {no} "
            "FROM approval_requests AS r"
        ),
        text(
            "INSERT INTO approval_transitions (request_id, seq, kind, from_status, to_status, step_index, "
            "at, "
            f"acting_admin) SELECT r.id, 2, 'entered', 'submitted', 'pending', 0, r.submitted_at, {no} "
            "FROM approval_requests AS r"
        ),
        text(
            "INSERT INTO approval_assignees (approver, request_id) "
            f"SELECT 'u-mgr-' || ({number} % {MANAGERS}), r.id FROM approval_requests AS r"
        ),
        text(
            "INSERT INTO approval_waiting (request_id, approver, step_index, round, submitted_at) "
            f"SELECT r.id, 'u-mgr-' || ({number} % {MANAGERS}), 0, 1, r.submitted_at "
            "FROM approval_requests AS r WHERE r.status = 'pending'"
        ),
    ]
    with runtime.engine.begin() as conn:
        for statement in statements:
            conn.execute(statement)
        conn.execute(text("ANALYZE"))
    if postgres:
        # as autovacuum leaves tables in production (it would within a minute of this bulk
        # load): visibility maps set, so counts over an index need not visit the table
        with runtime.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM " + ", ".join(VACUUMED)))
    tokens = {}
    with transaction(runtime.sessions) as session:
        for user, admin in (("u-mgr-7", False), ("u-rep-3", False), ("u-admin", True)):
            tokens[user] = create_token(session, user, "bench", is_admin=admin)[1]
        W = ApprovalWaitingRow
        pending = list(
            session.scalars(select(W.request_id).where(W.approver == "u-mgr-7").order_by(W.request_id))
        )
    runtime.close()
    return tokens, pending


if __name__ == "__main__":
    sys.exit(main())
