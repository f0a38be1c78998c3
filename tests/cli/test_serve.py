"""`crm-approvals serve` for real: gunicorn on a socket, settings from --env-file."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from sqlalchemy import create_engine, text

from connector.storage.migrate import upgrade
from tests.conftest import SANDBOX_SECRET
from webhooks.signatures import sign_standard

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_serve_acknowledges_a_signed_webhook_into_the_database_named_by_the_env_file(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path}/served.db"
    upgrade(db)
    env_file = tmp_path / "custom.env"
    env_file.write_text(
        f"DATABASE_URL={db}\nQUEUE_URL=sqlite:///{tmp_path}/queue.db\nMAPPINGS_DIR={tmp_path}\n"
        f"CRM_CONNECTIONS=sandbox\nSANDBOX_WEBHOOK_SECRET={SANDBOX_SECRET}\n"
    )
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "SANDBOX_", "CRM_"))}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "connector",
            "--env-file",
            str(env_file),
            "serve",
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "1",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_until_up(base, server)
        body = json.dumps(
            {
                "type": "record.updated",
                "timestamp": "2026-11-23T10:00:00Z",
                "data": {"object": "deal", "id": "D-7", "changed_fields": ["amount"]},
            }
        ).encode()
        ts = int(time.time())
        headers = {
            "content-type": "application/json",
            "webhook-id": "msg_serve",
            "webhook-timestamp": str(ts),
            "webhook-signature": sign_standard(SANDBOX_SECRET, "msg_serve", ts, body),
        }
        assert (
            requests.post(f"{base}/webhooks/standard", data=body, headers=headers, timeout=10).status_code
            == 202
        )
        # A chunked body over WEBHOOK_MAX_BODY_BYTES (1 MB): the app's own 413, in its JSON shape.
        chunks = (b"x" * 65536 for _ in range(24))
        too_long = requests.post(
            f"{base}/webhooks/standard", data=chunks, headers={"content-type": "application/json"}, timeout=30
        )
        assert (too_long.status_code, too_long.json()["error"]["code"]) == (413, "body_too_large")
        # A body far past WEBHOOK_MAX_BODY_BYTES is refused before it is buffered, not read to disk.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(
                b"POST /webhooks/standard HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nContent-Length: 100000000\r\n\r\n{"
            )
            assert sock.recv(100).startswith(b"HTTP/1.1 413")
    finally:
        server.terminate()
        out, _ = server.communicate(timeout=20)
    # gunicorn's access log, path without the query string
    assert '"POST /webhooks/standard" 202' in out
    with create_engine(db).connect() as conn:
        assert conn.execute(text("select record_id from inbox_events")).scalars().all() == ["D-7"]


def _wait_until_up(base: str, server: subprocess.Popen[bytes]) -> None:
    deadline = time.time() + 30
    while time.time() < deadline:
        assert server.poll() is None, "serve exited early"
        try:
            if requests.get(f"{base}/healthz", timeout=2).ok:
                return
        except requests.RequestException:
            time.sleep(0.2)
    raise AssertionError("serve did not come up in 30 s")


@pytest.mark.slow
def test_metrics_add_up_every_gunicorn_worker_and_the_worker_process(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path}/served.db"
    upgrade(db)
    env_file = tmp_path / "metrics.env"
    env_file.write_text(
        f"DATABASE_URL={db}\nQUEUE_URL=sqlite:///{tmp_path}/queue.db\nMAPPINGS_DIR={tmp_path}\n"
        f"CRM_CONNECTIONS=sandbox\nSANDBOX_WEBHOOK_SECRET={SANDBOX_SECRET}\n"
        f"PROMETHEUS_MULTIPROC_DIR={tmp_path}/prometheus\n"
    )
    port = free_port()
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "SANDBOX_", "CRM_", "PROM"))
    }
    env["PYTHONPATH"] = str(ROOT)
    command = [sys.executable, "-m", "connector", "--env-file", str(env_file), "serve"]
    server = subprocess.Popen(
        [*command, "--bind", f"127.0.0.1:{port}", "--workers", "2", "--threads", "2"], cwd=tmp_path, env=env
    )
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_until_up(base, server)
        for n in range(6):
            assert _deliver(base, f"msg_metrics_{n}").status_code == 202
        worker = subprocess.run(
            [sys.executable, "-m", "tests.metrics_worker_target", str(env_file)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert worker.returncode == 0 and worker.stdout.strip() == "6", worker.stderr
        for _ in range(6):  # whichever gunicorn worker answers, the totals are the same
            with requests.Session() as fresh:  # a new connection each time
                text = fresh.get(f"{base}/metrics", timeout=10).text
            assert 'crm_approvals_webhook_events_total{connection="sandbox",outcome="stored"} 6.0' in text
            assert 'crm_approvals_inbox_events_processed_total{outcome="done"} 6.0' in text
            assert "crm_approvals_inbox_pending 0.0" in text
    finally:
        server.terminate()
        server.wait(timeout=20)
    assert list((tmp_path / "prometheus").glob("counter_*.db"))  # the multiprocess files are where configured


def _deliver(base: str, msg_id: str) -> requests.Response:
    body = json.dumps(
        {
            "type": "record.updated",
            "timestamp": "2026-11-23T10:00:00Z",
            "data": {"object": "deal", "id": msg_id, "changed_fields": ["amount"]},
        }
    ).encode()
    ts = int(time.time())
    headers = {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign_standard(SANDBOX_SECRET, msg_id, ts, body),
    }
    return requests.post(f"{base}/webhooks/standard", data=body, headers=headers, timeout=10)


def test_metrics_dir_keeps_live_processes_files_and_drops_dead_ones(tmp_path: Path) -> None:
    directory = tmp_path / "prometheus"
    directory.mkdir()
    (directory / f"counter_{os.getpid()}.db").write_bytes(b"")  # a live process: this one
    (directory / "counter_999999999.db").write_bytes(b"")  # a process long gone
    script = (
        "import os, sys; from connector.server import prepare_metrics_dir; "
        "prepare_metrics_dir(sys.argv[1]); import prometheus_client.values as v; "
        "print(os.environ['PROMETHEUS_MULTIPROC_DIR'], v.ValueClass.__name__)"
    )
    env = {k: v for k, v in os.environ.items() if not k.lower().startswith("prometheus_multiproc")}
    done = subprocess.run(
        [sys.executable, "-c", script, str(directory)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(directory.resolve()), "MmapedValue"]
    assert sorted(p.name for p in directory.iterdir()) == [f"counter_{os.getpid()}.db"]


def test_the_command_line_imports_no_metrics_before_a_command_runs() -> None:
    # serve and worker point prometheus-client at the shared directory before it is imported;
    # a command module importing it at load time would make both refuse to start.
    done = subprocess.run(
        [sys.executable, "-c", "import sys, connector.cli; print('prometheus_client' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("allowed", "trusted"),
    [
        (["127.0.0.1", "::1"], "127.0.0.1"),  # gunicorn's default: a TLS proxy on this host
        (["*"], "*"),
        (["10.0.0.5"], "10.0.0.5"),
        (["10.0.0.5", "10.0.0.6"], None),  # waitress trusts one address or all: none then
    ],
)
def test_the_waitress_worker_believes_x_forwarded_proto_from_gunicorns_allowed_addresses(
    allowed: list[str], trusted: str | None
) -> None:
    from connector.waitress_worker import _proxy_settings

    settings = _proxy_settings(allowed)
    assert settings.get("trusted_proxy") == trusted
    assert settings.get("trusted_proxy_headers", {"x-forwarded-proto"}) == {"x-forwarded-proto"}
