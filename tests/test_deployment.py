"""The several-hosts deployment of docs/deployment.md, as far as one machine allows: two
`crm-approvals worker` processes started separately, each with its own connection pool,
against the same PostgreSQL and Redis, exactly as the doc's commands start them.

Their start-up sweeps expire the same 3,000 due approvals at once (set-based expiry takes
its chunks FOR UPDATE SKIP LOCKED), then flush nudges through Redis send the write-back to a
CRM stand-in speaking the sandbox API: every approval is expired once, and every record is
written once."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from bench.expire.__main__ import generate  # due at the bench's fixed NOW, long past
from connector.config import Settings
from connector.runtime import Runtime
from connector.storage import audit
from connector.storage.models import PENDING, ApprovalRequestRow, ApprovalTransitionRow, OutboxUpdate
from connector.worker import Tasks, make_huey

ROOT = Path(__file__).resolve().parents[1]
COUNT = 3000


class StandIn(BaseHTTPRequestHandler):
    """The sandbox CRM's batch update (docs/crms/sandbox.md), counting what each record got."""

    written: Counter[str] = Counter()
    calls = 0
    lock = threading.Lock()

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        ids = [record["id"] for record in body["records"]]
        with self.lock:
            type(self).calls += 1
            self.written.update(ids)
        answer = json.dumps({"results": [{"id": i, "ok": True} for i in ids]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture
def crm() -> Iterator[str]:
    StandIn.written = Counter()
    StandIn.calls = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_two_worker_processes_on_one_postgresql_and_redis_expire_and_write_each_approval_once(
    pg_url: str, redis_url: str, crm: str, tmp_path: Path
) -> None:
    mappings = tmp_path / "mappings"
    mappings.mkdir()
    (mappings / "sandbox-deals.yaml").write_text((ROOT / "mappings/examples/sandbox-deals.yaml").read_text())
    generate(pg_url, str(mappings), COUNT)  # migrates, then COUNT approvals due since NOW - 1 day
    env_file = tmp_path / ".env"
    env_file.write_text(
        f"DATABASE_URL={pg_url}\nQUEUE_URL={redis_url}\nMAPPINGS_DIR={mappings}\nCRM_CONNECTIONS=sandbox\n"
        f"SANDBOX_API_TOKEN=t0ken\nSANDBOX_URL={crm}\n"
    )
    workers = []
    for n in range(2):  # as on two hosts: separate processes, own pools, own metrics directory
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / f"metrics-{n}")}
        command = [sys.executable, "-m", "connector", "--env-file", str(env_file), "worker", "--workers", "2"]
        log = (tmp_path / f"worker-{n}.log").open("w")
        workers.append(
            (subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log)
        )
    runtime = Runtime.from_settings(Settings.from_env({}, dotenv_path=str(env_file)))
    tasks = Tasks(runtime, make_huey(redis_url))
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            with runtime.sessions() as session:
                left = session.scalar(
                    select(func.count())
                    .select_from(ApprovalRequestRow)
                    .where(ApprovalRequestRow.status == "approved")
                )
                unsent = session.scalar(
                    select(func.count()).select_from(OutboxUpdate).where(OutboxUpdate.status != "done")
                )
                queued = session.scalar(select(func.count()).select_from(OutboxUpdate))
            # each worker's start-up sweep logs what it expired once all its jobs are done
            # (documents render after the outbox is flushed): wait for both lines
            swept = all(
                "connector.worker: sweep" in (tmp_path / f"worker-{n}.log").read_text() for n in range(2)
            )
            if left == 0 and queued == COUNT and unsent == 0 and swept:
                break
            if left == 0:
                tasks.flush_outbox()  # the nudge the web app sends, through Redis, to whichever worker
            for process, _log in workers:
                assert process.poll() is None, (tmp_path / "worker-0.log").read_text()[-3000:]
            time.sleep(1)
    finally:
        for process, log in workers:
            process.terminate()
            process.wait(timeout=30)
            log.close()
        runtime.close()
    logs = [(tmp_path / f"worker-{n}.log").read_text() for n in range(2)]
    assert left == 0 and queued == COUNT and unsent == 0, logs[0][-3000:] + logs[1][-3000:]
    # each worker's start-up sweep says how many it expired: together, each approval once
    expired = [sum(int(m) for m in re.findall(r"expire (\d+)", text)) for text in logs]
    assert sum(expired) == COUNT, (expired, logs)
    runtime = Runtime.from_settings(Settings.from_env({}, dotenv_path=str(env_file)))
    try:
        with runtime.sessions() as session:
            per_request = Counter(
                session.scalars(
                    select(ApprovalTransitionRow.request_id).where(ApprovalTransitionRow.kind == "expired")
                )
            )
            assert len(per_request) == COUNT and set(per_request.values()) == {1}
            assert (
                session.scalar(
                    select(func.count()).select_from(OutboxUpdate).where(OutboxUpdate.status == PENDING)
                )
                == 0
            )
        assert audit.verify(runtime.sessions).ok
    finally:
        runtime.close()
    assert len(StandIn.written) == COUNT and set(StandIn.written.values()) == {1}  # no record written twice
    assert StandIn.calls >= COUNT // 100  # the sandbox's batch limit: 100 records a call
