"""Ops' story, as a new user would try it: a write-back the CRM refuses with a validation
error is visible in the log, on /healthz, on /metrics and in `dead-letters list`; once
the CRM side is fixed, `dead-letters retry` writes it exactly once. The CRM answers in the
sandbox API's documented format (mocked with `responses`); nothing of ours is mocked."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import pytest
import responses
from click.testing import CliRunner

from connector.cli import main
from connector.config import Settings
from connector.storage.migrate import upgrade
from connector.storage.outbox import flush
from connector.wiring import build_runtime
from connector.worker import Tasks, make_huey
from tests.conftest import SANDBOX_SECRET
from tests.webhooks.test_ops_endpoints import metric
from webhooks.app import create_app
from webhooks.signatures import sign_standard

ROOT = Path(__file__).resolve().parents[2]
SANDBOX = "http://sandbox.test"
BATCH = f"{SANDBOX}/api/v1/objects/deal/batch-update"
DEAL = {
    "amount": 150000,
    "stage": "negotiation",
    "owner_id": "u-rep",
    "owner_manager_id": "u-mgr",
    "company.credit_score": 80,
    "approval_status": None,
    "approval_expires_on": None,
    "approval_comment": None,
}
REFUSED = {
    "id": "D-1",
    "ok": False,
    "error": {
        "code": "FIELD_CUSTOM_VALIDATION_EXCEPTION",
        "message": "Amount must be positive",
        "field": "amount",
    },
}


def test_a_refused_write_back_is_seen_everywhere_and_retried_exactly_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mappings = tmp_path / "mappings"
    mappings.mkdir()
    shutil.copy(ROOT / "tests/data/pipeline/deals.yaml", mappings)
    env_file = tmp_path / ".env"
    env_file.write_text(
        f"DATABASE_URL=sqlite:///{tmp_path}/app.db\nQUEUE_URL=memory://\nMAPPINGS_DIR={mappings}\n"
        f"CRM_CONNECTIONS=sandbox\nSANDBOX_API_TOKEN=t0ken-story\nSANDBOX_URL={SANDBOX}\n"
        f"SANDBOX_WEBHOOK_SECRET={SANDBOX_SECRET}\n"
    )
    upgrade(f"sqlite:///{tmp_path}/app.db")
    runtime = build_runtime(Settings.from_env({}, dotenv_path=str(env_file)))
    tasks = Tasks(runtime, make_huey("memory://"))
    client = create_app(runtime, tasks).test_client()
    created_before = metric(
        client, "crm_approvals_dead_letters_created_total", kind="outbox", connection="sandbox"
    )

    # A rep's edit arrives, a request opens, and the CRM refuses the "Pending" write-back.
    body = json.dumps(
        {
            "type": "record.updated",
            "timestamp": "2026-11-23T10:00:00Z",
            "data": {"object": "deal", "id": "D-1", "changed_fields": ["amount"], "values": DEAL},
        }
    ).encode()
    ts = int(time.time())
    headers = {
        "webhook-id": "msg-story",
        "webhook-timestamp": str(ts),
        "webhook-signature": sign_standard(SANDBOX_SECRET, "msg-story", ts, body),
        "Content-Type": "application/json",
    }
    assert client.post("/webhooks/standard", data=body, headers=headers).status_code == 202
    with responses.RequestsMock() as crm, caplog.at_level(logging.WARNING):
        refused = crm.post(BATCH, json={"results": [REFUSED]})
        assert tasks.run_inbox()["done"] == 1  # processes the event, then flushes the outbox
        assert refused.call_count == 1

    # The log says so, with the CRM's own words.
    [line] = [r for r in caplog.records if getattr(r, "event", None) == "dead_letter"]
    assert line.levelno == logging.WARNING
    assert "FIELD_CUSTOM_VALIDATION_EXCEPTION: Amount must be positive" in line.getMessage()
    # /healthz says so.
    health = client.get("/healthz").get_json()
    assert health["dead_letters"]["count"] == 1
    assert "1 open dead letter(s): see `crm-approvals dead-letters list`" in health["warnings"]
    # /metrics says so.
    assert metric(client, "crm_approvals_dead_letters_open") == 1
    after = metric(client, "crm_approvals_dead_letters_created_total", kind="outbox", connection="sandbox")
    assert after == created_before + 1
    # `dead-letters list` says so.
    listed = CliRunner().invoke(main, ["--env-file", str(env_file), "dead-letters", "list"])
    assert "sandbox:deal:D-1" in listed.output and "Amount must be positive" in listed.output

    # The CRM's validation rule is fixed; ops retry; it is written exactly once.
    with responses.RequestsMock() as crm:
        accepted = crm.post(BATCH, json={"results": [{"id": "D-1", "ok": True}]})
        retried = CliRunner().invoke(main, ["--env-file", str(env_file), "dead-letters", "retry", "--all"])
        assert "write-back 2 for sandbox:deal:D-1: sent" in retried.output, retried.output
        again = CliRunner().invoke(main, ["--env-file", str(env_file), "dead-letters", "retry", "--all"])
        assert "no open dead letters match" in again.output
        flush(runtime.sessions, runtime.adapter)  # the worker's next flush sends nothing more
    assert accepted.call_count == 1
    assert json.loads(accepted.calls[0].request.body)["records"] == [
        {"id": "D-1", "fields": {"approval_status": "Pending"}}
    ]
    assert client.get("/healthz").get_json()["dead_letters"]["count"] == 0
    runtime.close()
