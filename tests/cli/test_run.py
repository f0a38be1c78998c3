"""`crm-approvals run` tells the truth at start-up: a taken port fails fast naming the
variable to change, and the URLs are printed only once they answer."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.cli.test_serve import free_port
from tests.conftest import SANDBOX_SECRET


def _env_file(
    tmp_path: Path, port: int, sandbox_port: int, mail_ports: tuple[int, int] | None = None
) -> Path:
    smtp_port, page_port = mail_ports or (free_port(), free_port())
    env_file = tmp_path / "run.env"
    env_file.write_text(
        f"DATABASE_URL=sqlite:///{tmp_path}/run.db\nQUEUE_URL=sqlite:///{tmp_path}/queue.db\n"
        f"MAPPINGS_DIR={tmp_path}\nCRM_CONNECTIONS=sandbox\nSANDBOX_WEBHOOK_SECRET={SANDBOX_SECRET}\n"
        f"SANDBOX_DB_PATH={tmp_path}/sandbox.db\nSANDBOX_API_TOKEN=test-token\n"
        f"HOST=127.0.0.1\nPORT={port}\nPUBLIC_BASE_URL=http://127.0.0.1:{port}\n"
        f"SANDBOX_URL=http://127.0.0.1:{sandbox_port}\n"
        f"MAIL_CATCHER_SMTP_PORT={smtp_port}\nMAIL_CATCHER_PORT={page_port}\nMAIL_CATCHER_DIR={tmp_path}/mail\n"
    )
    return env_file


def _clean_env() -> dict[str, str]:
    prefixes = (
        "DATABASE_URL",
        "QUEUE_URL",
        "SANDBOX_",
        "CRM_",
        "PORT",
        "HOST",
        "PUBLIC_BASE_URL",
        "MAIL_",
        "SMTP_",
    )
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


@pytest.mark.slow
@pytest.mark.parametrize("taken", ["PORT", "SANDBOX_URL", "MAIL_CATCHER_PORT"])
def test_run_exits_non_zero_naming_the_variable_when_a_port_is_taken(tmp_path: Path, taken: str) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        busy = squatter.getsockname()[1]
        ports = {
            "PORT": free_port(),
            "SANDBOX_URL": free_port(),
            "MAIL_CATCHER_PORT": free_port(),
            taken: busy,
        }
        env_file = _env_file(
            tmp_path, ports["PORT"], ports["SANDBOX_URL"], (free_port(), ports["MAIL_CATCHER_PORT"])
        )
        done = subprocess.run(
            [sys.executable, "-m", "connector", "--env-file", str(env_file), "run"],
            cwd=tmp_path,
            env=_clean_env(),
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert done.returncode != 0
    assert taken in done.stderr
    assert f"127.0.0.1:{busy}" in done.stderr
    assert "Webhooks + API" not in done.stdout


@pytest.mark.slow
def test_run_prints_its_urls_only_once_they_answer(tmp_path: Path) -> None:
    port, sandbox_port, mail_page = free_port(), free_port(), free_port()
    env_file = _env_file(tmp_path, port, sandbox_port, (free_port(), mail_page))
    run = subprocess.Popen(
        [sys.executable, "-m", "connector", "--env-file", str(env_file), "run"],
        cwd=tmp_path,
        env=_clean_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert run.stdout is not None
        deadline = time.monotonic() + 90
        line = ""
        banner = []
        while time.monotonic() < deadline and "Stop with Ctrl-C" not in line:
            line = run.stdout.readline()
            assert line or run.poll() is None, "run exited before printing its URLs"
            banner.append(line)
        assert f"Sandbox CRM:     http://127.0.0.1:{sandbox_port}/" in "".join(banner)
        assert f"Mail catcher:    http://127.0.0.1:{mail_page}/" in "".join(banner)
        # Printed means answering: no retry loop here.
        assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
        assert requests.get(f"http://127.0.0.1:{sandbox_port}/", timeout=5).status_code == 200
        assert requests.get(f"http://127.0.0.1:{mail_page}/", timeout=5).status_code == 200
    finally:
        run.terminate()
        run.wait(timeout=20)
    assert run.returncode == 0
