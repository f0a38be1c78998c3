"""/livez, /healthz and /metrics: what they report, read from shared sources, the same from
every process; JSON answers, never a 500, when the database or the queue is down."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from connector.config import Settings
from connector.rules import MappingSet
from connector.runtime import Runtime
from connector.service.pipeline import Pipeline
from connector.storage.db import transaction
from connector.storage.inbox import accept, process_pending
from connector.storage.outbox import enqueue_update, flush
from connector.storage.tokens import create_token
from connector.wiring import attach_pipeline
from connector.worker import Tasks, make_huey
from tests.conftest import SANDBOX_SECRET
from tests.fakes import MemoryCRM
from tests.storage.test_inbox import event
from webhooks.app import create_app
from webhooks.signatures import sign_standard

DATA = Path(__file__).parents[1] / "data" / "pipeline"
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


def metric(client: FlaskClient, name: str, **labels: str) -> float:
    """One sample of /metrics (0 when absent)."""
    response = client.get("/metrics")
    assert response.status_code == 200
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def signed(client: FlaskClient, msg_id: str, record_id: str = "D-1", secret: str = SANDBOX_SECRET) -> Any:
    body = json.dumps(
        {
            "type": "record.updated",
            "timestamp": "2026-11-23T10:00:00Z",
            "data": {"object": "deal", "id": record_id, "changed_fields": ["amount"]},
        }
    ).encode()
    ts = int(time.time())
    headers = {
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign_standard(secret, msg_id, ts, body),
        "Content-Type": "application/json",
    }
    return client.post("/webhooks/standard", data=body, headers=headers)


def test_livez_answers_without_touching_anything(settings_factory: Any, app_factory: Any) -> None:
    # No migrated database behind it, on purpose: liveness depends on nothing.
    runtime = Runtime.from_settings(settings_factory(database_url="postgresql://nobody@127.0.0.1:1/none"))
    response = app_factory(runtime).test_client().get("/livez")
    assert response.status_code == 200 and response.get_json() == {"status": "ok"}


def test_healthz_reports_backlogs_and_dead_letters(client: FlaskClient, runtime: Runtime) -> None:
    body = client.get("/healthz").get_json()
    assert body["status"] == "ok" and body["database"] == {"ok": True, "error": None}
    assert body["queue"]["ok"] is True
    assert body["inbox_pending"] == {"count": 0, "oldest_at": None, "oldest_age_seconds": None}
    assert body["dead_letters"]["count"] == 0 and body["warnings"] == []

    accept(runtime.sessions, [event(1), event(2)])
    crm = MemoryCRM()
    crm.reject["D-9"] = "FIELD_CUSTOM_VALIDATION_EXCEPTION"
    runtime.set_adapter("sandbox", crm)
    with transaction(runtime.sessions) as session:
        enqueue_update(session, "sandbox", "deal", "D-9", {"Status": "Approved"})
        enqueue_update(session, "sandbox", "deal", "D-8", {"Status": "Approved"})
    flush(runtime.sessions, runtime.adapter)
    with transaction(runtime.sessions) as session:
        enqueue_update(session, "sandbox", "deal", "D-7", {"Status": "Pending"})

    body = client.get("/healthz").get_json()
    assert body["inbox_pending"]["count"] == 2 and body["inbox_pending"]["oldest_age_seconds"] >= 0
    assert body["outbox_pending"]["count"] == 1 and body["outbox_pending"]["sending"] == 0
    assert body["dead_letters"]["count"] == 1 and body["dead_letters"]["oldest_at"] is not None
    assert any("1 open dead letter(s)" in w for w in body["warnings"])


def test_healthz_is_503_json_when_the_database_is_down(settings_factory: Any, app_factory: Any) -> None:
    runtime = Runtime.from_settings(settings_factory(database_url="postgresql://nobody@127.0.0.1:1/none"))
    client = app_factory(runtime).test_client()
    response = client.get("/healthz")
    assert response.status_code == 503
    body = response.get_json()
    assert body["status"] == "unavailable" and body["database"]["ok"] is False
    assert "OperationalError" in body["database"]["error"]
    assert body["inbox_pending"] is None
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert "crm_approvals_database_up 0.0" in metrics.get_data(as_text=True)


def test_healthz_reports_an_unreachable_queue_and_stays_ready(runtime: Runtime) -> None:
    app = create_app(runtime, Tasks(runtime, make_huey("redis://127.0.0.1:1/0")))
    body = app.test_client().get("/healthz")
    assert body.status_code == 200
    data = body.get_json()
    assert data["queue"]["ok"] is False and "Connection" in data["queue"]["error"]
    assert any(w.startswith("queue unreachable") for w in data["warnings"])


def test_every_process_reports_mapping_errors_as_the_files_are_now(
    tmp_path: Path, settings_factory: Callable[..., Settings], runtime_factory: Any
) -> None:
    """Two apps with their own loaded mappings stand for two gunicorn workers."""
    mappings = tmp_path / "mappings"
    shutil.copytree(DATA, mappings)
    settings = settings_factory(mappings_dir=str(mappings))
    clients = []
    for _ in range(2):
        runtime = runtime_factory(settings)
        runtime.processor = Pipeline(runtime, MappingSet.load(mappings))
        app: Flask = create_app(runtime, Tasks(runtime, make_huey("memory://")))
        clients.append(app.test_client())
    mapping = mappings / "deals.yaml"
    good = mapping.read_text()
    for client in clients:
        assert client.get("/healthz").get_json()["mapping_errors"] == []

    broken = good.replace("gt: 100000", "gx: 100000")  # same size, same second: only the content differs
    mapping.write_text(broken)
    for client in clients:
        errors = client.get("/healthz").get_json()["mapping_errors"]
        assert len(errors) == 1 and "gx" in errors[0]
        assert metric(client, "crm_approvals_mapping_errors") == 1.0

    mapping.write_text(good)
    for client in clients:
        body = client.get("/healthz").get_json()
        assert body["mapping_errors"] == [] and not any("mapping" in w for w in body["warnings"])


def test_metrics_count_webhooks_accepted_duplicate_and_rejected(client: FlaskClient) -> None:
    stored = {"connection": "sandbox", "outcome": "stored"}
    duplicate = {"connection": "sandbox", "outcome": "duplicate"}
    rejected = {"connection": "sandbox", "reason": "bad_signature"}
    before = [
        metric(client, "crm_approvals_webhook_events_total", **stored),
        metric(client, "crm_approvals_webhook_events_total", **duplicate),
        metric(client, "crm_approvals_webhooks_rejected_total", **rejected),
    ]
    assert signed(client, "m-metrics-1").status_code == 202
    assert signed(client, "m-metrics-2").status_code == 202
    assert signed(client, "m-metrics-1").status_code == 200  # a redelivery
    bad = signed(client, "m-metrics-3", secret="whsec_" + "A" * 32)
    assert bad.status_code == 401 and bad.get_json()["error"]["code"] == "bad_signature"
    after = [
        metric(client, "crm_approvals_webhook_events_total", **stored),
        metric(client, "crm_approvals_webhook_events_total", **duplicate),
        metric(client, "crm_approvals_webhooks_rejected_total", **rejected),
    ]
    assert [a - b for a, b in zip(after, before, strict=True)] == [2, 1, 1]


def test_metrics_report_queue_gauges_from_the_database(client: FlaskClient, runtime: Runtime) -> None:
    assert metric(client, "crm_approvals_inbox_pending") == 0
    accept(runtime.sessions, [event(1)])
    assert metric(client, "crm_approvals_inbox_pending") == 1
    assert metric(client, "crm_approvals_inbox_oldest_pending_age_seconds") >= 0
    assert metric(client, "crm_approvals_database_up") == 1
    text = client.get("/metrics").get_data(as_text=True)
    for name in (
        "crm_approvals_outbox_pending",
        "crm_approvals_outbox_oldest_pending_age_seconds",
        "crm_approvals_dead_letters_open",
        "crm_approvals_dead_letters_oldest_age_seconds",
        "crm_approvals_queue_up",
    ):
        assert f"# TYPE {name} gauge" in text


def test_metrics_count_crm_calls_retries_write_backs_and_dead_letters(
    client: FlaskClient, runtime: Runtime
) -> None:
    crm = MemoryCRM()
    crm.fail_calls = 1  # the first call fails with a 503, the retry succeeds
    crm.reject["D-2"] = "FIELD_CUSTOM_VALIDATION_EXCEPTION"
    runtime.set_adapter("sandbox", crm)
    names = {
        "ok": ("crm_approvals_crm_call_seconds_count", {"connection": "sandbox", "outcome": "ok"}),
        "failed": ("crm_approvals_crm_call_seconds_count", {"connection": "sandbox", "outcome": "retriable"}),
        "retries": ("crm_approvals_crm_retries_total", {"connection": "sandbox"}),
        "done": ("crm_approvals_outbox_updates_total", {"connection": "sandbox", "outcome": "done"}),
        "dead": ("crm_approvals_outbox_updates_total", {"connection": "sandbox", "outcome": "dead"}),
        "letters": ("crm_approvals_dead_letters_created_total", {"kind": "outbox", "connection": "sandbox"}),
    }
    before = {key: metric(client, name, **labels) for key, (name, labels) in names.items()}
    with transaction(runtime.sessions) as session:
        enqueue_update(session, "sandbox", "deal", "D-1", {"Status": "Approved"})
        enqueue_update(session, "sandbox", "deal", "D-2", {"Status": "Approved"})
    flush(runtime.sessions, runtime.adapter)
    after = {key: metric(client, name, **labels) for key, (name, labels) in names.items()}
    assert {k: after[k] - before[k] for k in names} == {
        "ok": 1,
        "failed": 1,
        "retries": 1,
        "done": 1,
        "dead": 1,
        "letters": 1,
    }
    assert metric(client, "crm_approvals_dead_letters_open") == 1


def test_metrics_count_request_events_and_time_to_decision(
    tmp_path: Path, settings_factory: Any, runtime_factory: Any
) -> None:
    mappings = tmp_path / "mappings"
    shutil.copytree(DATA, mappings)
    runtime = runtime_factory(settings_factory(mappings_dir=str(mappings)))
    runtime.set_adapter("sandbox", MemoryCRM(records={"D-1": dict(DEAL)}))
    pipeline = attach_pipeline(runtime, MappingSet.load(mappings))
    client = create_app(runtime, Tasks(runtime, make_huey("memory://"))).test_client()
    rule = {"rule": "big-deal"}
    opened = metric(client, "crm_approvals_request_events_total", event="opened", **rule)
    approved = metric(client, "crm_approvals_request_events_total", event="approved", **rule)
    decided = metric(client, "crm_approvals_decision_seconds_count", outcome="approved", **rule)

    accept(runtime.sessions, [replace(event(1), record_id="D-1", values=DEAL)])
    process_pending(runtime.sessions, pipeline)
    with transaction(runtime.sessions) as session:
        token = create_token(session, "u-mgr")[1]
        gm = create_token(session, "u-gm")[1]
    pending = client.get("/api/v1/requests?pending_for=me", headers={"Authorization": f"Bearer {token}"})
    [item] = pending.get_json()["requests"]
    for bearer in (token, gm):
        response = client.post(
            f"/api/v1/requests/{item['id']}/approve", headers={"Authorization": f"Bearer {bearer}"}
        )
        assert response.status_code == 200, response.get_json()

    assert metric(client, "crm_approvals_request_events_total", event="opened", **rule) == opened + 1
    assert metric(client, "crm_approvals_request_events_total", event="approved", **rule) == approved + 1
    assert metric(client, "crm_approvals_decision_seconds_count", outcome="approved", **rule) == decided + 1


@pytest.mark.parametrize("path", ["/metrics", "/healthz", "/livez"])
def test_ops_endpoints_need_no_token(client: FlaskClient, path: str) -> None:
    assert client.get(path).status_code == 200
