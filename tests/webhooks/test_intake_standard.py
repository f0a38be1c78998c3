"""Standard Webhooks intake: signature, timestamp window, dedupe, bad input -> clear 4xx."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from flask import request as flask_request
from flask.testing import FlaskClient
from sqlalchemy import func, select

from connector.config import Settings
from connector.runtime import Runtime
from connector.storage.models import InboxEvent
from tests.conftest import SANDBOX_SECRET
from webhooks.signatures import sign_standard


def payload(record_id: str = "D-1001", **data: Any) -> dict[str, Any]:
    body = {"object": "deal", "id": record_id, "changed_fields": ["amount"], "values": {"amount": 150000}}
    body.update(data)
    return {"type": "record.updated", "timestamp": "2026-11-23T10:00:00Z", "data": body}


def post(
    client: FlaskClient,
    body: Any,
    *,
    msg_id: str = "msg_1",
    ts: int | None = None,
    secret: str = SANDBOX_SECRET,
    signature: str | None = None,
    content_type: str = "application/json",
    raw: bytes | None = None,
) -> Any:
    data = raw if raw is not None else json.dumps(body).encode()
    ts = int(time.time()) if ts is None else ts
    headers = {
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": signature or sign_standard(secret, msg_id, ts, data),
        "Content-Type": content_type,
    }
    return client.post("/webhooks/standard", data=data, headers=headers)


def inbox_count(runtime: Runtime) -> int:
    with runtime.sessions() as session:
        return session.scalar(select(func.count()).select_from(InboxEvent)) or 0


def test_signed_delivery_is_stored_as_canonical_event(client: FlaskClient, runtime: Runtime) -> None:
    response = post(client, payload())
    assert response.status_code == 202, response.get_json()
    with runtime.sessions() as session:
        row = session.scalars(select(InboxEvent)).one()
    assert (row.source, row.connection, row.object_type, row.record_id) == (
        "sandbox",
        "sandbox",
        "deal",
        "D-1001",
    )
    assert row.changed_fields == ["amount"]
    assert row.values == {"amount": 150000}
    assert row.event_id == "msg_1"
    assert row.status == "pending"
    assert row.occurred_at.isoformat() == "2026-11-23T10:00:00+00:00"


def test_redelivery_with_same_webhook_id_is_acknowledged_and_dropped(
    client: FlaskClient, runtime: Runtime
) -> None:
    assert post(client, payload()).status_code == 202
    again = post(client, payload())
    assert again.status_code == 200
    assert again.get_json() == {"accepted": 0, "duplicates": 1}
    assert inbox_count(runtime) == 1


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"secret": "whsec_" + "QUJD" * 8}, "bad_signature"),
        ({"signature": "v1,AAAA"}, "bad_signature"),
        ({"signature": "v2,abc"}, "bad_signature"),
        ({"ts_offset": -400}, "stale_timestamp"),
        ({"ts_offset": +400}, "stale_timestamp"),
        ({"msg_id": ""}, "missing_id"),
    ],
)
def test_forged_or_stale_deliveries_are_refused(
    client: FlaskClient, runtime: Runtime, kwargs: dict[str, Any], code: str
) -> None:
    if "ts_offset" in kwargs:  # relative to when the test runs, not when it was collected
        kwargs = {"ts": int(time.time()) + kwargs["ts_offset"]}
    response = post(client, payload(), **kwargs)
    assert response.status_code == 401
    assert response.get_json()["error"]["code"] == code
    assert inbox_count(runtime) == 0


def test_timestamp_inside_the_window_is_accepted(client: FlaskClient) -> None:
    assert post(client, payload(), ts=int(time.time()) - 290).status_code == 202


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"raw": b"{not json"}, 400, "malformed_json"),
        ({"raw": b"[1, 2]"}, 400, "bad_payload"),
        ({"content_type": "text/plain"}, 415, "unsupported_content_type"),
        ({"body": payload(object="invoice")}, 422, "unknown_object"),
        ({"body": payload(changed_fields="amount")}, 400, "bad_payload"),
        ({"body": {"type": "record.exploded", "data": {"object": "deal", "id": "1"}}}, 400, "bad_payload"),
        ({"body": payload(id="")}, 400, "bad_payload"),
    ],
)
def test_bad_input_gets_a_clear_4xx_and_writes_nothing(
    client: FlaskClient, runtime: Runtime, kwargs: dict[str, Any], status: int, code: str
) -> None:
    body = kwargs.pop("body", payload())
    response = post(client, body, **kwargs)
    assert response.status_code == status, response.get_json()
    error = response.get_json()["error"]
    assert error["code"] == code
    assert error["message"]
    assert inbox_count(runtime) == 0


def test_oversize_body_is_refused_with_413(
    settings_factory: Any, runtime_factory: Any, app_factory: Any
) -> None:
    runtime = runtime_factory(settings_factory(webhook_max_body_bytes=2000))
    client = app_factory(runtime).test_client()
    response = post(client, payload(values={"notes": "x" * 3000}))
    assert response.status_code == 413
    assert "WEBHOOK_MAX_BODY_BYTES" in response.get_json()["error"]["hint"]
    assert inbox_count(runtime) == 0


def test_unknown_connection_is_404(client: FlaskClient) -> None:
    data = json.dumps(payload()).encode()
    ts = int(time.time())
    response = client.post(
        "/webhooks/standard?connection=nope",
        data=data,
        headers={
            "webhook-id": "m",
            "webhook-timestamp": str(ts),
            "webhook-signature": sign_standard(SANDBOX_SECRET, "m", ts, data),
            "Content-Type": "application/json",
        },
    )
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "unknown_connection"


def test_rejections_are_logged_without_secrets(client: FlaskClient, caplog: pytest.LogCaptureFixture) -> None:
    post(client, payload(), secret="whsec_" + "QUJD" * 8)
    text = caplog.text
    assert "bad_signature" in text
    assert SANDBOX_SECRET not in text and "QUJD" not in text


def test_webhooks_get_a_null_session_and_no_cookie_while_the_web_app_keeps_its_own(
    settings_factory: Callable[..., Settings],
    runtime_factory: Callable[[Settings], Runtime],
    app_factory: Callable[[Runtime], Flask],
) -> None:
    """With SECRET_KEY set (as in production), a webhook request opens no session: its cookies
    are not read, nothing is saved, the answer sets no cookie. The web app's pages still do."""
    app = app_factory(runtime_factory(settings_factory(secret_key="k" * 40)))
    interface = app.session_interface
    with app.test_request_context("/webhooks/standard", method="POST"):
        assert interface.is_null_session(interface.open_session(app, flask_request))
    with app.test_request_context("/app/", headers={"Cookie": "crm_approvals_session=whatever"}):
        opened = interface.open_session(app, flask_request)
        assert opened is not None and not interface.is_null_session(opened)
    client = app.test_client()
    client.set_cookie("crm_approvals_session", "eyJ1aWQiOiJ4In0.forged.sig")
    response = post(client, payload())
    assert response.status_code == 202, response.get_json()
    assert "Set-Cookie" not in response.headers
    assert "Cookie" not in response.headers.get("Vary", "")
    refused = post(client, payload(), secret="whsec_" + "A" * 32)
    assert refused.status_code == 401 and "Set-Cookie" not in refused.headers
