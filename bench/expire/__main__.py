"""bench/expire: the expiry sweep on 100,000 and 1,000,000 due approvals, beside a bare
bulk UPDATE of the same rows, in one run.

For each count, a fresh database (a temporary SQLite file, or a fresh schema in the
PostgreSQL database given) is migrated and filled with that many approved, due requests
(and their earlier transitions) by one INSERT ... SELECT. Then, each in its own process:

* ceiling: `UPDATE approval_requests SET status = 'expired', ... WHERE <due>` in one
  statement, rolled back: the least the database can do to flip the same rows;
* ours: `ApprovalService.expire_due` (connector/service/bulk_expiry.py), which also writes
  each request's transition, outbox row, notification and two audit entries (hash-chained);
  wall time and the process's peak RSS;
* write-back: `outbox.flush` to a CRM stand-in with the sandbox's batch limit (100),
  counting its calls against ceil(N / limit). Skipped above --flush-max (the outbox's
  throughput is bench/e2e's subject).

Usage:

    .venv/bin/python -m bench.expire                      # 100,000 and 1,000,000 on SQLite
    .venv/bin/python -m bench.expire --counts 100000 \\
        --database-url postgresql://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
EXPIRES = NOW - timedelta(days=1)
APPROVED = EXPIRES - timedelta(days=180)
RULE = "deal-approval"


# --- the parent: one fresh database per count, each step in its own process ------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.expire", description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="100000,1000000", help="comma-separated approval counts")
    parser.add_argument(
        "--database-url", default="", help="PostgreSQL URL (default: a temporary SQLite file)"
    )
    parser.add_argument(
        "--chunk", type=int, default=0, help="approvals per transaction (default: the code's)"
    )
    parser.add_argument(
        "--flush-max", type=int, default=100_000, help="flush the write-back up to this count"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--mappings", help=argparse.SUPPRESS)
    parser.add_argument("--number", type=int, default=0, help=argparse.SUPPRESS)  # a child's count or chunk
    args = parser.parse_args(argv)
    if args.child:
        result = CHILDREN[args.child](args.url, args.mappings, args.number)
        print(json.dumps(result))
        return 0
    counts = [int(c) for c in args.counts.split(",") if c.strip()]
    work = Path(tempfile.mkdtemp(prefix="bench-expire-"))
    mappings = work / "mappings"
    mappings.mkdir()
    shutil.copy(ROOT / "mappings/examples/sandbox-deals.yaml", mappings)
    backend = "PostgreSQL" if args.database_url else "SQLite"
    print(f"bench/expire on {backend}, {os.cpu_count()} CPU(s); chunk {args.chunk or 'default'}")
    results = []
    try:
        for count in counts:
            url, drop = fresh_database(args.database_url, work, count)
            try:
                generated = child("generate", url, mappings, count)
                ceiling = child("ceiling", url, mappings, args.chunk)
                ours = child("expire", url, mappings, args.chunk)
                flushed = child("flush", url, mappings, 0) if count <= args.flush_max else None
            finally:
                drop()
            assert ours["expired"] == count, f"expired {ours['expired']} of {count}"
            row = {
                "count": count,
                "generate_s": generated["seconds"],
                "ceiling_s": ceiling["seconds"],
                **ours,
            }
            if flushed is not None:
                row.update(flushed)
            results.append(row)
            report(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if len(results) > 1:
        base, top = results[0], results[-1]
        print(
            f"peak RSS {top['count']:,} / {base['count']:,}: "
            f"{top['peak_rss_mb'] / base['peak_rss_mb']:.2f}x (target <= 1.2x)"
        )
    return 0


def report(row: dict[str, Any]) -> None:
    count = row["count"]
    seconds = row["seconds"]
    print(
        f"{count:>9,} due: generated in {row['generate_s']:.1f} s | "
        f"bare bulk UPDATE {row['ceiling_s']:.2f} s | ours {seconds:.1f} s ({count / seconds:,.0f}/s), "
        f"ratio {seconds / row['ceiling_s']:.1f}x the UPDATE | "
        f"peak RSS {row['peak_rss_mb']:.0f} MB (at start {row['start_rss_mb']:.0f} MB) | "
        f"outbox {row['outbox']:,}, audit {row['audit']:,}, notifications {row['notifications']:,}"
    )
    if "crm_calls" in row:
        print(
            f"{'':>9}  write-back: {row['crm_calls']:,} CRM calls for {row['sent']:,} records "
            f"(minimum ceil(N/{row['batch_limit']}) = {math.ceil(count / row['batch_limit']):,}) "
            f"in {row['flush_s']:.1f} s"
        )
    else:
        print(f"{'':>9}  write-back: not flushed (above --flush-max)")


def fresh_database(pg_url: str, work: Path, count: int) -> tuple[str, Any]:
    if not pg_url:
        path = work / f"expire-{count}.db"
        return f"sqlite:///{path}", lambda: path.unlink(missing_ok=True)
    import psycopg

    schema = f"bench_expire_{uuid.uuid4().hex[:10]}"
    base = pg_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')

    def drop() -> None:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')

    separator = "&" if "?" in base else "?"
    return f"{base}{separator}options=-csearch_path%3D{schema}", drop


def child(step: str, url: str, mappings: Path, number: int) -> dict[str, Any]:
    command = [
        sys.executable,
        "-m",
        "bench.expire",
        "--child",
        step,
        "--url",
        url,
        "--mappings",
        str(mappings),
    ]
    command += ["--number", str(number)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"bench step {step} failed:\n{done.stdout}\n{done.stderr}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


# --- the children ---------------------------------------------------------------------------


def runtime_of(url: str, mappings: str) -> Any:
    from connector.config import Settings
    from connector.runtime import Runtime

    env = {
        "DATABASE_URL": url,
        "QUEUE_URL": "memory://",
        "MAPPINGS_DIR": mappings,
        "CRM_CONNECTIONS": "sandbox",
        "SANDBOX_API_TOKEN": "bench",
        "SANDBOX_URL": "http://sandbox.invalid",
        "LOG_LEVEL": "WARNING",
    }
    return Runtime.from_settings(Settings.from_env(env, dotenv_path=os.devnull))


def generate(url: str, mappings: str, count: int) -> dict[str, Any]:
    """`count` approved requests due since yesterday, and their two earlier transitions, by
    INSERT ... SELECT from a generated series: seconds for a million."""
    from sqlalchemy import bindparam, text

    from connector.storage.db import UTCDateTime
    from connector.storage.migrate import upgrade

    upgrade(url)
    runtime = runtime_of(url, mappings)
    started = time.perf_counter()
    postgres = url.startswith("postgresql")
    series = (
        "SELECT i FROM generate_series(0, :last) AS s(i)"
        if postgres
        else "WITH RECURSIVE s(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM s WHERE i < :last) SELECT i FROM s"
    )
    ident = "'exp-' || lpad(i::text, 8, '0')" if postgres else "printf('exp-%08d', i)"
    no = "false" if postgres else "0"
    times = [
        bindparam(name, value, type_=UTCDateTime()) for name, value in (("exp", EXPIRES), ("appr", APPROVED))
    ]
    requests = text(
        "INSERT INTO approval_requests (id, connection, object_type, record_id, rule_name, mapping_path, "
        "mapping_hash, submitter, status, current_step, record, record_previous, changed_fields, "
        "submitted_at, updated_at, approved_at, expires_at, closed_at, expired_at, superseded_by, version, "
        f"active_key) SELECT {ident}, 'sandbox', 'deal', 'D-' || i, '{RULE}', 'sandbox-deals.yaml', "
        f"'{'0' * 64}', 'u-rep-' || (i % 500), 'approved', NULL, '{{\"amount\": 250000}}', NULL, '[]', "
        f":appr, :appr, :appr, :exp, :appr, NULL, NULL, 3, NULL FROM ({series}) AS n"
    ).bindparams(*times, last=count - 1)
    transitions = text(
        "INSERT INTO approval_transitions (request_id, seq, kind, from_status, to_status, step_index, actor, "
        f"comment, at, acting_admin) SELECT id, seq, kind, NULL, CASE WHEN seq = 1 THEN 'pending' "
        f"ELSE 'approved' END, NULL, NULL, NULL, :appr, {no} FROM approval_requests, "
        "(SELECT 1 AS seq, 'submitted' AS kind UNION ALL SELECT 2, 'approved') AS t"
    ).bindparams(times[1])
    with runtime.engine.begin() as conn:
        conn.execute(requests)
        conn.execute(transitions)
    if postgres:
        with runtime.engine.connect() as conn:
            conn.execute(text("ANALYZE"))
    seconds = time.perf_counter() - started
    runtime.close()
    return {"seconds": seconds}


def ceiling(url: str, mappings: str, _chunk: int) -> dict[str, Any]:
    """The bare bulk UPDATE of the same rows in one statement, rolled back."""
    from sqlalchemy import bindparam, text

    from connector.storage.db import UTCDateTime

    runtime = runtime_of(url, mappings)
    statement = text(
        "UPDATE approval_requests SET status = 'expired', expired_at = :now, updated_at = :now, "
        "version = version + 1 WHERE status = 'approved' AND expires_at <= :now AND superseded_by IS NULL"
    ).bindparams(bindparam("now", NOW, type_=UTCDateTime()))
    with runtime.engine.connect() as conn:
        transaction = conn.begin()
        started = time.perf_counter()
        updated = conn.execute(statement).rowcount
        seconds = time.perf_counter() - started
        transaction.rollback()
    runtime.close()
    return {"seconds": seconds, "rows": updated}


def expire(url: str, mappings: str, chunk: int) -> dict[str, Any]:
    """Ours: the sweep's own code path, with the clock at NOW."""
    from sqlalchemy import func, select

    from connector.notify.models import Notification
    from connector.rules import MappingSet
    from connector.service import bulk_expiry
    from connector.service.pipeline import Pipeline
    from connector.storage.models import AuditEntry, OutboxUpdate

    runtime = runtime_of(url, mappings)
    pipeline = Pipeline(runtime, MappingSet.load(mappings))
    service = pipeline.approvals
    service.clock = lambda: NOW
    start_rss = peak_rss_mb()
    started = time.perf_counter()
    report = bulk_expiry.expire_due(service, runtime.sessions, chunk=chunk or None)
    seconds = time.perf_counter() - started
    peak = peak_rss_mb()
    with runtime.sessions() as session:
        counts = {
            name: session.scalar(select(func.count()).select_from(model))
            for name, model in (
                ("outbox", OutboxUpdate),
                ("audit", AuditEntry),
                ("notifications", Notification),
            )
        }
    runtime.close()
    return {
        "seconds": seconds,
        "expired": report.expired,
        "peak_rss_mb": peak,
        "start_rss_mb": start_rss,
        **counts,
    }


def flush_all(url: str, mappings: str, _chunk: int) -> dict[str, Any]:
    """The queued write-back to a CRM stand-in with the sandbox's batch limit."""
    from connector.storage.outbox import flush

    runtime = runtime_of(url, mappings)
    crm = StandIn()
    runtime.set_adapter("sandbox", crm)
    started = time.perf_counter()
    sent = 0
    while True:
        done = flush(runtime.sessions, runtime.adapter, limit=1_000_000, now=NOW + timedelta(minutes=1))
        sent += done.done
        if done.sent_records == 0:
            break
    seconds = time.perf_counter() - started
    runtime.close()
    return {"crm_calls": crm.calls, "sent": sent, "batch_limit": crm.batch_limit, "flush_s": seconds}


def StandIn() -> Any:
    from connector.config import ConnectionConfig
    from connector.crm.base import CRMAdapter, RecordUpdate, UpdateResult
    from connector.crm.sandbox import SandboxAdapter

    class CountingCRM(CRMAdapter):
        """Answers every write at once, as a CRM with no latency would; counts the calls."""

        kind = "sandbox"
        batch_limit = SandboxAdapter.batch_limit

        def __init__(self) -> None:
            super().__init__(ConnectionConfig(name="sandbox", kind="sandbox"))
            self.calls = 0

        def _update_batch(self, object_type: str, updates: Sequence[RecordUpdate]) -> list[UpdateResult]:
            self.calls += 1
            return [UpdateResult.success(u.record_id) for u in updates]

        def _fetch(self, object_type: str, ids: Sequence[str], fields: Sequence[str]) -> dict[str, Any]:
            raise NotImplementedError("the expiry write-back reads nothing")

        def _query_page(self, *args: Any) -> Any:
            raise NotImplementedError

        def describe(self, object_type: str) -> Any:
            raise NotImplementedError

        def _users_page(self, cursor: Any) -> Any:
            raise NotImplementedError

    return CountingCRM()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


CHILDREN = {"generate": generate, "ceiling": ceiling, "expire": expire, "flush": flush_all}

if __name__ == "__main__":
    sys.exit(main())
