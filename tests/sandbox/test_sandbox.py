"""The sandbox CRM: its store and seed, its page, its signed webhooks (queued and retried),
its REST API, our SandboxAdapter against the real sandbox app, the CLI command, and the
whole flow end to end (sandbox edit -> our inbox -> outbox write-back -> sandbox page).

HTTP between the apps runs through `responses` callbacks into Flask test clients; nothing
of our own code is mocked.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from datetime import date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
import responses
from click.testing import CliRunner
from flask import Flask
from flask.testing import FlaskClient
from requests import PreparedRequest
from sqlalchemy import select

from connector.clock import utcnow
from connector.config import ConfigError, Settings, parse_connections
from connector.crm.base import RecordUpdate
from connector.crm.errors import AuthError
from connector.crm.retry import NO_WAIT, RetryPolicy
from connector.crm.sandbox import SandboxAdapter
from connector.events import RecordChangeEvent, parse_timestamp
from connector.runtime import Runtime
from connector.sandbox.app import SandboxConfig, create_sandbox_app
from connector.sandbox.seed import USERS, ensure_seeded
from connector.sandbox.store import DEAL, Store
from connector.storage.db import transaction
from connector.storage.models import InboxEvent
from connector.storage.outbox import enqueue_update, flush
from tests.conftest import SANDBOX_SECRET
from tests.contract.harness_sandbox import API_TOKEN, ENV, SANDBOX_URL
from webhooks.signatures import verify_standard

WEBHOOK_URL = "http://127.0.0.1:8000/webhooks/standard"
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
SANDBOX_API = re.compile(re.escape(SANDBOX_URL) + r"/api/.*")

Answer = tuple[int, dict[str, str], bytes]


class Clock:
    """The sandbox store's clock, moved by the test (queued webhooks become due)."""

    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class Ticker:
    """A monotonic clock for the rate limiter, moved by the test or by the retry policy's sleep."""

    def __init__(self) -> None:
        self.value = 1000.0

    def __call__(self) -> float:
        return self.value

    def advance(self, seconds: float) -> None:
        self.value += seconds


def sandbox_settings(tmp_path: Path, **env: str) -> Settings:
    return Settings(
        connections=parse_connections({**ENV, "SANDBOX_DB_PATH": str(tmp_path / "sandbox.db"), **env})
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def config(tmp_path: Path) -> SandboxConfig:
    return SandboxConfig.from_settings(sandbox_settings(tmp_path))


@pytest.fixture
def store(config: SandboxConfig, clock: Clock) -> Iterator[Store]:
    store = Store(config.db_path, clock)
    yield store
    store.close()


class Browser(FlaskClient):
    """Posts the sandbox's forms as a browser does: with the CSRF token of the page they are on."""

    def post(self, *args: Any, **kwargs: Any) -> Any:
        path = str(args[0] if args else kwargs.get("path", "/"))
        data = kwargs.get("data")
        if not path.startswith("/api/") and (data is None or isinstance(data, dict)):
            kwargs["data"] = {**(data or {}), "csrf_token": self.csrf_token()}
        return super().post(*args, **kwargs)

    def csrf_token(self) -> str:
        page = self.get("/deals/D-1001").get_data(as_text=True)
        found = re.search(r'name="csrf_token" value="([^"]+)"', page)
        assert found is not None, "the edit page has no CSRF token"
        return found.group(1)


def browser_app(app: Flask) -> Flask:
    app.test_client_class = Browser
    return app


@pytest.fixture
def app(config: SandboxConfig, store: Store) -> Flask:
    app = browser_app(create_sandbox_app(config, store=store, start_delivery=False))
    app.testing = True
    return app


@pytest.fixture
def web(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def receiver() -> Iterator[responses.RequestsMock]:
    """Our webhook receiver, answering 202 unless a test says otherwise."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.add(responses.POST, WEBHOOK_URL, status=202, json={"accepted": 1, "duplicates": 0})
        yield rsps


def deal_form(store: Store, deal_id: str = "D-1001", **changes: Any) -> dict[str, Any]:
    """The edit form as the browser posts it: every editable field, as text."""
    deal = store.get("deal", deal_id) or {}
    form: dict[str, Any] = {}
    for f in DEAL.editable:
        value = deal.get(f.name)
        form[f.name] = (
            list(value or []) if f.type == "multipicklist" else ("" if value is None else str(value))
        )
    form.update(changes)
    return form


def webhook_calls(rsps: responses.RequestsMock) -> list[Any]:
    return [call for call in rsps.calls if call.request.url.split("?")[0] == WEBHOOK_URL]


def assert_signed(request: PreparedRequest) -> dict[str, Any]:
    """The delivery verifies as Standard Webhooks with the connection's secret; returns its body."""
    body = request.body if isinstance(request.body, bytes) else str(request.body).encode()
    headers = request.headers
    verify_standard(
        [SANDBOX_SECRET],
        headers["webhook-id"],
        headers["webhook-timestamp"],
        headers["webhook-signature"],
        body,
        300,
    )
    assert headers["Content-Type"] == "application/json"
    return json.loads(body)  # type: ignore[no-any-return]


def api_update(web: FlaskClient, records: list[dict[str, Any]], object_type: str = "deal") -> Any:
    return web.post(f"/api/v1/objects/{object_type}/batch-update", json={"records": records}, headers=AUTH)


def forward_to(client: FlaskClient) -> Callable[[PreparedRequest], Answer]:
    """A `responses` callback that hands the request to a Flask app's test client."""

    def forward(request: PreparedRequest) -> Answer:
        url = urlsplit(request.url or "")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("content-length", "host")}
        response = client.open(
            url.path, method=request.method, query_string=url.query, data=request.body or b"", headers=headers
        )
        answer_headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
        return response.status_code, answer_headers, response.get_data()

    return forward


def wire_sandbox_api(rsps: responses.RequestsMock, web: FlaskClient) -> None:
    for method in (responses.GET, responses.POST):
        rsps.add_callback(method, SANDBOX_API, callback=forward_to(web))


def adapter(retry: RetryPolicy = NO_WAIT, token: str = API_TOKEN) -> SandboxAdapter:
    return SandboxAdapter(
        next(iter(parse_connections(ENV).values())),
        base_url=SANDBOX_URL,
        api_token=token,
        timeout=5,
        retry=retry,
    )


# --- store and seed -----------------------------------------------------------------------------


def test_first_start_seeds_deals_companies_and_users(app: Flask, store: Store) -> None:
    deals = store.records("deal")
    assert [d["id"] for d in deals] == ["D-1001", "D-1002", "D-1003", "D-1004", "D-1005", "D-1006"]
    first = deals[0]
    assert first["name"] == "Northwind ERP roll-out"
    assert (first["amount"], first["currency"], first["stage"]) == (185000, "EUR", "Negotiation")
    assert (first["owner_id"], first["owner_manager_id"], first["company_id"]) == (
        "u-rep-anna",
        "u-mgr-boris",
        "C-100",
    )
    assert first["product_lines"] == ["Software", "Services"]
    assert first["term_months"] == 36
    assert date.fromisoformat(first["close_date"]) > store.clock().date()
    assert first["approval_status"] == "Not submitted"
    assert first["approval_expires_on"] is None and first["approval_comment"] is None
    assert (first["company.name"], first["company.credit_score"]) == ("Northwind Traders GmbH", 82)
    assert {c["id"]: c["credit_score"] for c in store.records("company")} == {
        "C-100": 82,
        "C-200": 64,
        "C-300": 91,
        "C-400": 58,
        "C-500": 73,  # seed 001's company: no approval yet
    }
    assert [c["company_id"] for c in store.records("contract")] == ["C-500"]
    user_ids = {u["id"] for u in store.records("user")}
    assert {"u-rep-anna", "u-mgr-boris", "u-gm-carla", "u-fin-dmitri", "u-legal-eva"} <= user_ids
    assert all(u["name"] for u in store.records("user"))


def test_restart_keeps_edits_and_reset_seeds_afresh(app: Flask, store: Store, receiver: Any) -> None:
    store.update("deal", "D-1001", {"amount": 1}, "user")
    assert ensure_seeded(store) is False
    assert store.get("deal", "D-1001")["amount"] == 1  # type: ignore[index]
    assert ensure_seeded(store, reset=True) is True
    assert store.get("deal", "D-1001")["amount"] == 185000  # type: ignore[index]
    assert store.pending_deliveries() == []


def test_config_reads_the_connection_variables(tmp_path: Path) -> None:
    settings = sandbox_settings(tmp_path, SANDBOX_RATE_LIMIT_PER_SECOND="5")
    config = SandboxConfig.from_settings(settings)
    assert (config.connection, config.db_path) == ("sandbox", str(tmp_path / "sandbox.db"))
    assert config.webhook_url == WEBHOOK_URL
    assert (config.api_token, config.webhook_secrets) == (API_TOKEN, (SANDBOX_SECRET,))
    assert config.rate_limit_per_second == 5
    assert API_TOKEN not in repr(config) and SANDBOX_SECRET not in repr(config)
    default = SandboxConfig.from_settings(Settings(connections=parse_connections(ENV)))
    assert (default.db_path, default.rate_limit_per_second) == ("var/sandbox.db", None)


def test_several_sandbox_connections_name_themselves_in_the_webhook_url() -> None:
    env = {
        **ENV,
        "CRM_CONNECTIONS": "sandbox,demo=sandbox",
        "DEMO_API_TOKEN": "t",
        "DEMO_WEBHOOK_SECRET": SANDBOX_SECRET,
    }
    settings = Settings(connections=parse_connections(env))
    assert SandboxConfig.from_settings(settings, "demo").webhook_url == f"{WEBHOOK_URL}?connection=demo"
    with pytest.raises(ConfigError, match="--connection"):
        SandboxConfig.from_settings(settings)


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"SANDBOX_API_TOKEN": ""}, "SANDBOX_API_TOKEN"),
        ({"SANDBOX_WEBHOOK_SECRET": ""}, "SANDBOX_WEBHOOK_SECRET"),
        ({"SANDBOX_WEBHOOK_SECRET": "not-a-whsec"}, "whsec_"),
        ({"CRM_CONNECTIONS": "hubspot"}, "no sandbox connection"),
    ],
)
def test_missing_or_bad_settings_are_a_clear_config_error(env: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigError, match=match) as raised:
        SandboxConfig.from_settings(Settings(connections=parse_connections({**ENV, **env})))
    assert SANDBOX_SECRET not in str(raised.value)


# --- the page --------------------------------------------------------------------------------------


def test_list_page_shows_deals_companies_approval_values_and_last_write_back(
    web: FlaskClient, receiver: Any
) -> None:
    fields = {"approval_status": "Approved", "approval_expires_on": "2026-12-31", "name": "<b>Big</b> deal"}
    assert api_update(web, [{"id": "D-1004", "fields": fields}]).status_code == 200
    page = web.get("/")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    for text in (
        "D-1001",
        "Northwind ERP roll-out",
        "Northwind Traders GmbH",
        "82",
        "Fabrikam Industries AG",
    ):
        assert text in html
    assert 'class="badge ok">Approved<' in html
    assert "2026-12-31" in html
    assert "&lt;b&gt;Big&lt;/b&gt; deal" in html and "<b>Big</b>" not in html  # autoescaped
    assert "Last write-back from crm-approvals: <strong>20" in html  # a time, not "-"
    assert "Anna Kowalski" in html and "u-legal-eva" in html
    assert API_TOKEN not in html and SANDBOX_SECRET not in html


def test_edit_sends_a_signed_standard_webhook_with_the_documented_body(
    web: FlaskClient, store: Store, receiver: responses.RequestsMock
) -> None:
    response = web.post("/deals/D-1001", data=deal_form(store, amount="200000", edited_by="u-mgr-boris"))
    assert response.status_code == 303
    [call] = webhook_calls(receiver)
    body = assert_signed(call.request)
    deal = store.get("deal", "D-1001")
    assert deal is not None and deal["amount"] == 200000
    assert deal["modified_by_id"] == "u-mgr-boris"  # who the page edited as: last modified by
    assert body == {
        "type": "record.updated",
        "timestamp": body["timestamp"],
        "data": {
            "object": "deal",
            "id": "D-1001",
            "changed_fields": ["amount"],
            "values": deal,
            "origin": "user",
            "modified_by": "u-mgr-boris",
        },
    }
    assert body["data"]["values"]["company.credit_score"] == 82
    assert body["data"]["values"]["company.name"] == "Northwind Traders GmbH"
    assert parse_timestamp(body["timestamp"]) == parse_timestamp(deal["modified_at"])
    assert call.request.headers["webhook-id"].startswith("msg_")
    assert call.request.req_kwargs["timeout"] == 5.0
    shown = web.get(response.headers["Location"]).get_data(as_text=True)
    assert "delivered: HTTP 202" in shown


def test_each_edit_sends_only_the_fields_it_changed_and_a_new_webhook_id(
    web: FlaskClient, store: Store, receiver: responses.RequestsMock
) -> None:
    web.post("/deals/D-1002", data=deal_form(store, "D-1002", amount="45000", product_lines=["Hardware"]))
    web.post("/deals/D-1002", data=deal_form(store, "D-1002", approval_comment="Discount agreed"))
    first, second = (assert_signed(c.request) for c in webhook_calls(receiver))
    assert first["data"]["changed_fields"] == ["amount", "product_lines"]
    assert first["data"]["values"]["product_lines"] == ["Hardware"]
    assert second["data"]["changed_fields"] == ["approval_comment"]
    ids = {c.request.headers["webhook-id"] for c in webhook_calls(receiver)}
    assert len(ids) == 2


def test_editing_as_someone_who_is_not_a_user_is_refused(
    web: FlaskClient, store: Store, receiver: responses.RequestsMock
) -> None:
    response = web.post("/deals/D-1001", data=deal_form(store, amount="1", edited_by="u-nobody"))
    assert response.status_code == 422
    shown = response.get_data(as_text=True)
    assert "Edit as: there is no user &#39;u-nobody&#39;; pick one from the list" in shown
    assert webhook_calls(receiver) == [] and store.get("deal", "D-1001")["amount"] != 1  # type: ignore[index]


def test_saving_without_changes_sends_nothing(web: FlaskClient, store: Store, receiver: Any) -> None:
    response = web.post("/deals/D-1003", data=deal_form(store, "D-1003"))
    assert response.status_code == 303
    assert webhook_calls(receiver) == []
    assert "Nothing changed" in web.get(response.headers["Location"]).get_data(as_text=True)


def test_invalid_form_input_is_shown_and_nothing_is_saved(
    web: FlaskClient, store: Store, receiver: Any
) -> None:
    before = store.get("deal", "D-1001")
    form = deal_form(store, amount="lots", term_months="1.5", name=" ", owner_id="u-nobody")
    response = web.post("/deals/D-1001", data=form)
    assert response.status_code == 422
    html = response.get_data(as_text=True)
    assert "amount: &#39;lots&#39; is not a number" in html
    assert "term_months: &#39;1.5&#39; is not a whole number" in html
    assert "name is required" in html
    assert "there is no user &#39;u-nobody&#39;" in html
    assert store.get("deal", "D-1001") == before
    assert webhook_calls(receiver) == [] and store.pending_deliveries() == []


def test_unknown_record_page_is_404(web: FlaskClient) -> None:
    assert web.get("/deals/D-9999").status_code == 404
    assert web.post("/companies/C-999", data={"name": "x"}).status_code == 404


def test_company_edit_sends_a_company_webhook_and_deals_see_the_new_credit_score(
    web: FlaskClient, store: Store, receiver: responses.RequestsMock
) -> None:
    response = web.post("/companies/C-100", data={"name": "Northwind Traders GmbH", "credit_score": "455"})
    assert response.status_code == 303
    body = assert_signed(webhook_calls(receiver)[0].request)
    assert body["data"]["object"] == "company"
    assert body["data"]["changed_fields"] == ["credit_score"]
    assert body["data"]["values"]["credit_score"] == 455
    read = web.get("/api/v1/objects/deal/D-1001?fields=company.credit_score", headers=AUTH)
    assert read.get_json()["fields"] == {"company.credit_score": 455}


# --- webhooks that cannot be delivered ------------------------------------------------------------


def test_failed_webhook_is_queued_shown_and_retried_with_the_same_id(
    web: FlaskClient, app: Flask, store: Store, clock: Clock, receiver: responses.RequestsMock
) -> None:
    receiver.replace(
        responses.POST, WEBHOOK_URL, status=503, json={"error": {"code": "x", "message": "down"}}
    )
    response = web.post("/deals/D-1001", data=deal_form(store, amount="210000"))
    assert response.status_code == 303
    [pending] = store.pending_deliveries()
    assert (pending.attempts, pending.last_status) == (1, 503)
    assert "HTTP 503" in (pending.last_error or "")
    page = web.get("/").get_data(as_text=True)
    assert pending.msg_id in page and "Retry now" in page and "1 webhook waiting" in page

    sender = app.extensions["sandbox"].sender
    assert sender.deliver_due() == 0  # not due yet: backoff
    receiver.replace(responses.POST, WEBHOOK_URL, status=202, json={"accepted": 1, "duplicates": 0})
    clock.advance(60)
    first_sent = int(webhook_calls(receiver)[0].request.headers["webhook-timestamp"])
    sender.now = lambda: first_sent + 3600.0  # the retry happens an hour later
    assert sender.deliver_due() == 1
    first, second = (c.request for c in webhook_calls(receiver))
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == pending.msg_id
    assert first.body == second.body
    # signed afresh for the attempt's own time, so our timestamp window still accepts it
    assert second.headers["webhook-timestamp"] == str(first_sent + 3600)
    verify_standard(
        [SANDBOX_SECRET],
        second.headers["webhook-id"],
        second.headers["webhook-timestamp"],
        second.headers["webhook-signature"],
        second.body,
        300,
        now=first_sent + 3600,
    )
    assert store.pending_deliveries() == []
    assert store.recent_deliveries()[0].msg_id == pending.msg_id


def test_unreachable_receiver_does_not_lose_the_webhook(
    web: FlaskClient, store: Store, receiver: responses.RequestsMock
) -> None:
    receiver.replace(responses.POST, WEBHOOK_URL, body=requests.ConnectionError("connection refused"))
    assert web.post("/deals/D-1001", data=deal_form(store, stage="Proposal")).status_code == 303
    [pending] = store.pending_deliveries()
    assert pending.last_error == "ConnectionError: connection refused"
    assert json.loads(pending.body)["data"]["changed_fields"] == ["stage"]
    assert "is queued and will be retried" in web.get("/deals/D-1001?saved=" + pending.msg_id).get_data(
        as_text=True
    )


def test_a_redirect_is_a_failed_delivery_and_is_not_followed(
    web: FlaskClient, store: Store, receiver: responses.RequestsMock
) -> None:
    receiver.replace(
        responses.POST, WEBHOOK_URL, status=308, headers={"Location": "http://elsewhere.test/hook"}
    )
    web.post("/deals/D-1001", data=deal_form(store, amount="5"))
    [pending] = store.pending_deliveries()
    assert pending.last_status == 308
    assert [c.request.url for c in receiver.calls] == [WEBHOOK_URL]


def test_background_thread_delivers_the_queue_after_retry_now(
    config: SandboxConfig, store: Store, receiver: responses.RequestsMock
) -> None:
    receiver.replace(responses.POST, WEBHOOK_URL, status=500)
    app = browser_app(create_sandbox_app(config, store=store, start_delivery=True))
    try:
        client = app.test_client()
        client.post("/deals/D-1001", data=deal_form(store, amount="1"))
        assert len(store.pending_deliveries()) == 1
        receiver.replace(responses.POST, WEBHOOK_URL, status=202)
        assert client.post("/deliveries/retry").status_code == 303
        deadline = time.monotonic() + 5
        while store.pending_deliveries() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store.pending_deliveries() == []
    finally:
        app.extensions["sandbox"].loop.stop()


# --- the REST API -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "MISSING_TOKEN"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "MISSING_TOKEN"),
        ({"Authorization": "Bearer wrong-token"}, "INVALID_TOKEN"),
    ],
)
def test_api_requires_the_bearer_token(web: FlaskClient, headers: dict[str, str], code: str) -> None:
    for response in (
        web.get("/api/v1/objects/deal/D-1001", headers=headers),
        web.post("/api/v1/objects/deal/batch-update", json={"records": []}, headers=headers),
    ):
        assert response.status_code == 401
        assert response.get_json()["error"]["code"] == code
        assert response.headers["WWW-Authenticate"].startswith('Bearer realm="sandbox"')
        assert API_TOKEN not in response.get_data(as_text=True)
    assert web.get("/api/v1/objects/deal/D-1001", headers=AUTH).status_code == 200


def test_read_one_record_with_chosen_and_related_fields(web: FlaskClient) -> None:
    response = web.get("/api/v1/objects/deal/D-1002?fields=amount,currency,company.name", headers=AUTH)
    assert response.get_json() == {
        "id": "D-1002",
        "fields": {"amount": 42000, "currency": "GBP", "company.name": "Contoso Retail Ltd"},
    }
    assert web.get("/api/v1/objects/company/C-300", headers=AUTH).get_json()["fields"]["credit_score"] == 91


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/api/v1/objects/deal/D-1001?fields=amount,discount", 400, "UNKNOWN_FIELD"),
        ("/api/v1/objects/deal/D-9999", 404, "NOT_FOUND"),
        ("/api/v1/objects/invoice/1", 404, "UNKNOWN_OBJECT"),
        ("/api/v1/objects/deal?limit=0", 400, "BAD_REQUEST"),
        ("/api/v1/objects/deal?modified_since=yesterday", 400, "BAD_REQUEST"),
        ("/api/v1/objects/deal?cursor=bm9wZQ", 400, "BAD_CURSOR"),
        ("/api/v1/objects/deal?filter[discount]=5", 400, "UNKNOWN_FIELD"),
        ("/api/v1/nothing-here", 404, "NOT_FOUND"),
    ],
)
def test_bad_reads_get_a_json_error(web: FlaskClient, path: str, status: int, code: str) -> None:
    response = web.get(path, headers=AUTH)
    assert response.status_code == status
    assert response.get_json()["error"]["code"] == code
    assert response.get_json()["error"]["message"]


def test_batch_read_returns_the_found_records_and_names_the_missing(web: FlaskClient) -> None:
    body = {"ids": ["D-1003", "D-9999", "D-1001"], "fields": ["stage", "company.credit_score"]}
    response = web.post("/api/v1/objects/deal/batch-read", json=body, headers=AUTH)
    assert response.get_json() == {
        "records": [
            {"id": "D-1003", "fields": {"stage": "Qualification", "company.credit_score": 91}},
            {"id": "D-1001", "fields": {"stage": "Negotiation", "company.credit_score": 82}},
        ],
        "not_found": ["D-9999"],
    }


def test_batch_update_answers_one_result_per_record(web: FlaskClient, store: Store) -> None:
    store.lock("deal", "D-1006", 60)
    records = [
        {"id": "D-1001", "fields": {"approval_status": "Approved", "approval_expires_on": "2026-12-31"}},
        {"id": "D-1002", "fields": {"approval_status": "Approved", "discount": 5}},
        {"id": "D-9999", "fields": {"approval_status": "Approved"}},
        {"id": "D-1003", "fields": {"amount": "a lot"}},
        {"id": "D-1004", "fields": {"company.credit_score": 800}},
        {"id": "D-1005", "fields": {"owner_id": "u-nobody"}},
        {"id": "D-1006", "fields": {"approval_status": "Approved"}},
    ]
    response = api_update(web, records)
    assert response.status_code == 200
    results = response.get_json()["results"]
    assert [r["id"] for r in results] == [r["id"] for r in records]
    assert results[0] == {"id": "D-1001", "ok": True}
    errors = [(r["ok"], r["error"]["code"], r["error"]["field"]) for r in results[1:]]
    assert errors == [
        (False, "UNKNOWN_FIELD", "discount"),
        (False, "NOT_FOUND", None),
        (False, "INVALID_VALUE", "amount"),
        (False, "READ_ONLY_FIELD", "company.credit_score"),
        (False, "INVALID_VALUE", "owner_id"),
        (False, "RECORD_LOCKED", None),
    ]
    assert results[3]["error"]["message"] == "amount: 'a lot' is not a number"
    assert store.get("deal", "D-1001")["approval_expires_on"] == "2026-12-31"  # type: ignore[index]
    # a record with any bad field is not written at all
    assert store.get("deal", "D-1002")["approval_status"] == "Not submitted"  # type: ignore[index]
    assert store.get("deal", "D-1003")["amount"] == 18500  # type: ignore[index]
    assert [(d.record_id, d.origin) for d in store.pending_deliveries()] == [("D-1001", "api")]
    assert set(store.last_write_backs("deal")) == {"D-1001"}  # a refused write is no write-back


@pytest.mark.parametrize(
    ("fields", "stored"),
    [
        ({"amount": "150000"}, {"amount": 150000}),
        ({"amount": 1234.5, "term_months": 24.0}, {"amount": 1234.5, "term_months": 24}),
        ({"product_lines": "Software;Support"}, {"product_lines": ["Software", "Support"]}),
        (
            {"stage": None, "approval_expires_on": "2027-02-28"},
            {"stage": None, "approval_expires_on": "2027-02-28"},
        ),
    ],
)
def test_api_values_are_stored_in_their_field_type(
    web: FlaskClient, store: Store, fields: dict[str, Any], stored: dict[str, Any]
) -> None:
    assert api_update(web, [{"id": "D-1001", "fields": fields}]).get_json()["results"][0]["ok"] is True
    deal = store.get("deal", "D-1001") or {}
    assert {name: deal[name] for name in stored} == stored


@pytest.mark.parametrize(
    "fields",
    [
        {"amount": True},
        {"amount": "1e400"},
        {"amount": [1]},
        {"term_months": 1.5},
        {"close_date": "31.12.2026"},
        {"close_date": "2026-02-30"},
        {"currency": "JPY"},
        {"product_lines": ["Software", "Gold"]},
        {"name": None},
        {"name": 42},
        {"company_id": "C-999"},
    ],
)
def test_api_values_of_the_wrong_type_are_invalid(
    web: FlaskClient, store: Store, fields: dict[str, Any]
) -> None:
    before = store.get("deal", "D-1001")
    [result] = api_update(web, [{"id": "D-1001", "fields": fields}]).get_json()["results"]
    assert (result["ok"], result["error"]["code"], result["error"]["field"]) == (
        False,
        "INVALID_VALUE",
        next(iter(fields)),
    )
    assert store.get("deal", "D-1001") == before


def test_batch_update_takes_at_most_100_records(web: FlaskClient, store: Store) -> None:
    records = [{"id": "D-1001", "fields": {"term_months": n}} for n in range(101)]
    refused = api_update(web, records)
    assert refused.status_code == 400
    assert refused.get_json()["error"]["code"] == "LIMIT_EXCEEDED"
    assert store.get("deal", "D-1001")["term_months"] == 36  # type: ignore[index]
    accepted = api_update(web, records[:100])
    assert accepted.status_code == 200
    assert len(accepted.get_json()["results"]) == 100
    assert store.get("deal", "D-1001")["term_months"] == 99  # type: ignore[index]


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"data": "records=1", "content_type": "text/plain"}, 415, "UNSUPPORTED_MEDIA_TYPE"),
        ({"data": "{not json", "content_type": "application/json"}, 400, "MALFORMED_JSON"),
        ({"json": {"records": {"id": "D-1001"}}}, 400, "BAD_REQUEST"),
        ({"json": {"records": [{"id": "D-1001", "fields": {}}, {"id": "D-1002"}]}}, 400, "BAD_REQUEST"),
    ],
)
def test_malformed_batch_update_is_refused_whole(
    web: FlaskClient, store: Store, kwargs: dict[str, Any], status: int, code: str
) -> None:
    response = web.post("/api/v1/objects/deal/batch-update", headers=AUTH, **kwargs)
    assert response.status_code == status
    assert response.get_json()["error"]["code"] == code
    assert store.last_write_backs("deal") == {}


def test_api_write_sends_a_webhook_with_origin_api(
    web: FlaskClient, app: Flask, receiver: responses.RequestsMock
) -> None:
    api_update(
        web, [{"id": "D-1004", "fields": {"approval_status": "Pending", "approval_comment": "Over 50k"}}]
    )
    api_update(web, [{"id": "D-1004", "fields": {"approval_status": "Pending"}}])  # no change: no webhook
    assert app.extensions["sandbox"].sender.deliver_due() == 1
    [call] = webhook_calls(receiver)
    data = assert_signed(call.request)["data"]
    assert (data["id"], data["origin"]) == ("D-1004", "api")
    assert data["changed_fields"] == ["approval_status", "approval_comment"]


def test_describe_lists_the_fields_with_their_types(web: FlaskClient) -> None:
    body = web.get("/api/v1/objects/deal/describe", headers=AUTH).get_json()
    fields = {f["name"]: f for f in body["fields"]}
    assert body["object"] == "deal"
    assert (fields["amount"]["type"], fields["amount"]["updateable"]) == ("number", True)
    assert fields["product_lines"]["values"] == ["Software", "Services", "Hardware", "Support", "Training"]
    assert (fields["company_id"]["reference_to"], fields["company_id"]["relationship_name"]) == (
        ["company"],
        "company",
    )
    assert (fields["company.credit_score"]["type"], fields["company.credit_score"]["updateable"]) == (
        "integer",
        False,
    )
    assert fields["approval_expires_on"]["type"] == "date"
    assert fields["name"]["required"] is True


def test_paging_returns_every_record_once(web: FlaskClient) -> None:
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        query = "limit=4&fields=stage" + (f"&cursor={cursor}" if cursor else "")
        body = web.get(f"/api/v1/objects/deal?{query}", headers=AUTH).get_json()
        seen += [r["id"] for r in body["records"]]
        assert all(set(r["fields"]) == {"stage"} for r in body["records"])
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert pages == 2
    assert sorted(seen) == ["D-1001", "D-1002", "D-1003", "D-1004", "D-1005", "D-1006"]


def test_query_filters_by_modified_since_and_field_values(web: FlaskClient, clock: Clock) -> None:
    clock.advance(3600)
    since = clock().isoformat()
    clock.advance(1)
    api_update(web, [{"id": "D-1003", "fields": {"stage": "Proposal"}}])
    changed = web.get(f"/api/v1/objects/deal?modified_since={since.replace('+', '%2B')}", headers=AUTH)
    assert [r["id"] for r in changed.get_json()["records"]] == ["D-1003"]
    negotiating = web.get("/api/v1/objects/deal?filter[stage]=Negotiation", headers=AUTH).get_json()
    assert sorted(r["id"] for r in negotiating["records"]) == ["D-1001", "D-1004"]
    selling = web.get("/api/v1/objects/deal?filter[product_lines]=Support&filter[amount]=96000", headers=AUTH)
    assert [r["id"] for r in selling.get_json()["records"]] == ["D-1004"]


def test_rate_limit_answers_429_with_retry_after(tmp_path: Path, store: Store) -> None:
    ticker = Ticker()
    config = SandboxConfig.from_settings(sandbox_settings(tmp_path, SANDBOX_RATE_LIMIT_PER_SECOND="2"))
    web = create_sandbox_app(config, store=store, start_delivery=False, rate_clock=ticker).test_client()
    assert [web.get("/api/v1/objects/deal/D-1001", headers=AUTH).status_code for _ in range(2)] == [200, 200]
    throttled = web.get("/api/v1/objects/deal/D-1001", headers=AUTH)
    assert throttled.status_code == 429
    assert throttled.headers["Retry-After"] == "1"
    assert throttled.get_json()["error"]["code"] == "RATE_LIMITED"
    ticker.advance(1.0)
    assert web.get("/api/v1/objects/deal/D-1001", headers=AUTH).status_code == 200


# --- SandboxAdapter against the real sandbox app -------------------------------------------------------


def test_adapter_reads_writes_and_describes_the_sandbox(web: FlaskClient, store: Store) -> None:
    store.lock("deal", "D-1006", 60)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        wire_sandbox_api(rsps, web)
        sandbox = adapter()
        got = sandbox.get_records("deal", ["D-1001", "D-9999"], ["amount", "company.credit_score"])
        assert got == {"D-1001": {"amount": 185000, "company.credit_score": 82}}
        results = sandbox.update_records(
            "deal",
            [
                RecordUpdate(
                    "D-1001", {"approval_status": "Approved", "approval_expires_on": date(2026, 12, 31)}
                ),
                RecordUpdate("D-1002", {"amount": "lots"}),
                RecordUpdate("D-1006", {"approval_status": "Approved"}),
                RecordUpdate("D-1003", {"amount": Decimal("19999.50")}),
            ],
        )
        fields = {f.name: f for f in sandbox.describe("deal")}
    ok, fatal, locked, decimal_ok = results
    assert ok.ok and decimal_ok.ok
    assert (fatal.ok, fatal.error_code, fatal.fields, fatal.retriable) == (
        False,
        "INVALID_VALUE",
        ("amount",),
        False,
    )
    assert fatal.message == "amount: 'lots' is not a number"
    assert (locked.ok, locked.error_code, locked.retriable) == (False, "RECORD_LOCKED", True)
    assert store.get("deal", "D-1001")["approval_expires_on"] == "2026-12-31"  # type: ignore[index]
    assert store.get("deal", "D-1003")["amount"] == 19999.5  # type: ignore[index]
    assert fields["company_id"].reference_to == ("company",)
    assert fields["company.credit_score"].updateable is False


def test_adapter_query_follows_the_cursor(web: FlaskClient) -> None:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        wire_sandbox_api(rsps, web)
        sandbox = adapter()
        sandbox.page_size = 2
        records = list(sandbox.query("deal", ["stage", "amount"]))
        negotiating = list(sandbox.query("deal", ["stage"], filters={"stage": "Negotiation"}))
        pages = [c for c in rsps.calls if c.request.method == "GET"]
    assert sorted(r["id"] for r in records) == ["D-1001", "D-1002", "D-1003", "D-1004", "D-1005", "D-1006"]
    assert all(set(r) == {"id", "stage", "amount"} for r in records)
    assert [r["id"] for r in negotiating] == ["D-1001", "D-1004"]
    assert len(pages) == 3 + 1


def test_adapter_waits_out_the_sandbox_rate_limit(tmp_path: Path, store: Store) -> None:
    ticker = Ticker()
    config = SandboxConfig.from_settings(sandbox_settings(tmp_path, SANDBOX_RATE_LIMIT_PER_SECOND="1"))
    web = create_sandbox_app(config, store=store, start_delivery=False, rate_clock=ticker).test_client()
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        ticker.advance(seconds)

    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        wire_sandbox_api(rsps, web)
        sandbox = adapter(RetryPolicy(attempts=3, sleep=sleep))
        assert sandbox.get_record("deal", "D-1001", ["amount"]) == {"amount": 185000}
        [result] = sandbox.update_records("deal", [RecordUpdate("D-1001", {"approval_status": "Pending"})])
        statuses = [c.response.status_code for c in rsps.calls]
    assert result.ok
    assert statuses == [200, 429, 200]
    assert sleeps == [1.0]


def test_adapter_with_a_wrong_token_fails_with_an_auth_error(web: FlaskClient) -> None:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        wire_sandbox_api(rsps, web)
        sandbox = adapter(token="stale")
        assert sandbox.refresh_auth() is False
        with pytest.raises(AuthError, match="INVALID_TOKEN"):
            sandbox.update_records("deal", [RecordUpdate("D-1001", {"approval_status": "Approved"})])
        assert len(rsps.calls) == 1  # a static token: nothing to refresh, no blind retry


@pytest.mark.parametrize(("origin", "own"), [("api", True), ("user", False), (None, None), ("import", None)])
def test_is_own_change_follows_the_webhook_origin(origin: str | None, own: bool | None) -> None:
    event = RecordChangeEvent(
        source="sandbox",
        connection="sandbox",
        object_type="deal",
        record_id="D-1001",
        event_id="msg_1",
        occurred_at=utcnow(),
        dedupe_key="sandbox:std:msg_1",
        origin=origin,
    )
    assert adapter().is_own_change(event) is own


def test_from_config_uses_the_connection_url_else_the_sandbox_url() -> None:
    settings = Settings(connections=parse_connections(ENV), sandbox_url="http://sandbox.local:9001")
    env_without_url = {k: v for k, v in ENV.items() if k != "SANDBOX_URL"}
    plain = Settings(connections=parse_connections(env_without_url), sandbox_url="http://sandbox.local:9001")
    assert SandboxAdapter.from_config(settings.connection("sandbox"), settings).base_url == SANDBOX_URL
    assert (
        SandboxAdapter.from_config(plain.connection("sandbox"), plain).base_url == "http://sandbox.local:9001"
    )
    no_token = Settings(connections=parse_connections({"CRM_CONNECTIONS": "sandbox"}))
    with pytest.raises(ConfigError, match="SANDBOX_API_TOKEN"):
        SandboxAdapter.from_config(no_token.connection("sandbox"), no_token)


# --- the CLI command ---------------------------------------------------------------------------------


def test_sandbox_command_seeds_and_serves_on_the_sandbox_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from connector.cli import main

    served: list[tuple[Any, ...]] = []
    monkeypatch.setattr("werkzeug.serving.run_simple", lambda *args, **kw: served.append((*args, kw)))
    for key, value in {
        **ENV,
        "SANDBOX_URL": "http://127.0.0.1:8765",
        "SANDBOX_DB_PATH": str(tmp_path / "s.db"),
    }.items():
        monkeypatch.setenv(key, value)
    env_file = str(tmp_path / "missing.env")
    result = CliRunner().invoke(main, ["--env-file", env_file, "sandbox"])
    assert result.exit_code == 0, result.output
    [(host, port, app, options)] = served
    assert (host, port, options) == ("127.0.0.1", 8765, {"threaded": True, "use_reloader": False})
    assert app.extensions["sandbox"].store.get("deal", "D-1001")["name"] == "Northwind ERP roll-out"
    app.extensions["sandbox"].loop.stop()
    rebound = CliRunner().invoke(
        main, ["--env-file", env_file, "sandbox", "--reset", "--bind", "0.0.0.0:9000"]
    )
    assert rebound.exit_code == 0, rebound.output
    assert served[-1][:2] == ("0.0.0.0", 9000)
    served[-1][2].extensions["sandbox"].loop.stop()


def test_sandbox_command_without_a_token_says_what_to_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from connector.cli import main

    monkeypatch.setenv("CRM_CONNECTIONS", "sandbox")
    monkeypatch.setenv("SANDBOX_API_TOKEN", "")
    result = CliRunner().invoke(main, ["--env-file", str(tmp_path / "missing.env"), "sandbox"])
    assert result.exit_code != 0
    assert "SANDBOX_API_TOKEN" in result.output


# --- end to end -------------------------------------------------------------------------------------------


def test_end_to_end_edit_reaches_our_inbox_and_the_write_back_shows_on_the_sandbox_page(
    tmp_path: Path,
    settings_factory: Callable[..., Settings],
    runtime_factory: Callable[[Settings], Runtime],
    app_factory: Callable[[Runtime], Flask],
) -> None:
    settings = settings_factory(
        env={"SANDBOX_API_TOKEN": API_TOKEN, "SANDBOX_DB_PATH": str(tmp_path / "e2e.db")}
    )
    runtime = runtime_factory(settings)
    ours = app_factory(runtime).test_client()
    sandbox_app = browser_app(create_sandbox_app(SandboxConfig.from_settings(settings), start_delivery=False))
    sandbox_web = sandbox_app.test_client()
    sandbox_store: Store = sandbox_app.extensions["sandbox"].store

    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.add_callback(
            responses.POST, f"{settings.public_base_url}/webhooks/standard", callback=forward_to(ours)
        )
        for method in (responses.GET, responses.POST):
            rsps.add_callback(
                method, re.compile(re.escape(settings.sandbox_url) + "/api/.*"), forward_to(sandbox_web)
            )

        # 1. A user edits a deal in the sandbox: the signed webhook lands in our inbox.
        edited = sandbox_web.post("/deals/D-1001", data=deal_form(sandbox_store, amount="250000"))
        assert edited.status_code == 303
        assert sandbox_store.pending_deliveries() == []
        [event] = inbox_events(runtime)
        assert (event.source, event.object_type, event.record_id) == ("sandbox", "deal", "D-1001")
        assert event.changed_fields == ("amount",)
        assert event.values is not None and event.values["amount"] == 250000
        assert event.values["company.credit_score"] == 82
        assert event.dedupe_key == f"sandbox:std:{event.event_id}"
        adapter_of_ours = runtime.adapter("sandbox")
        assert adapter_of_ours.is_own_change(event) is False

        # 2. The outcome is written back through the outbox and SandboxAdapter.
        with transaction(runtime.sessions) as session:
            enqueue_update(
                session,
                "sandbox",
                "deal",
                "D-1001",
                {
                    "approval_status": "Approved",
                    "approval_expires_on": "2026-12-31",
                    "approval_comment": "OK by Boris",
                },
                reason="e2e approval",
            )
        report = flush(runtime.sessions, runtime.adapter)
        assert (report.done, report.dead, report.retried) == (1, 0, 0)

        # 3. The sandbox echoes our write as an origin "api" webhook, which we recognise as our own.
        assert sandbox_app.extensions["sandbox"].sender.deliver_due() == 1
        echo = inbox_events(runtime)[-1]
        assert echo.origin == "api"
        assert echo.changed_fields == ("approval_status", "approval_expires_on", "approval_comment")
        assert adapter_of_ours.is_own_change(echo) is True

    # 4. The written values are on the sandbox page.
    page = sandbox_web.get("/").get_data(as_text=True)
    assert 'class="badge ok">Approved<' in page and "2026-12-31" in page
    assert "Last write-back from crm-approvals: <strong>-" not in page
    assert "OK by Boris" in sandbox_web.get("/deals/D-1001").get_data(as_text=True)


def inbox_events(runtime: Runtime) -> list[RecordChangeEvent]:
    with runtime.sessions() as session:
        rows = session.scalars(select(InboxEvent).order_by(InboxEvent.id)).all()
        return [RecordChangeEvent.from_row(row) for row in rows]


def test_seed_users_have_the_documented_ids() -> None:
    assert [u["id"] for u in USERS] == [
        "u-rep-anna",
        "u-rep-felix",
        "u-mgr-boris",
        "u-gm-carla",
        "u-fin-dmitri",
        "u-legal-eva",
        "u-acc-greta",
        "u-com-ivan",
        "u-cfo-hugo",
    ]


def test_lock_button_makes_api_writes_wait_with_record_locked(web: FlaskClient, clock: Clock) -> None:
    response = web.post("/deals/D-1001/lock")
    assert (response.status_code, response.headers["Location"]) == (303, "/deals/D-1001")
    assert "Locked for API writes" in web.get("/deals/D-1001").get_data(as_text=True)
    [result] = api_update(web, [{"id": "D-1001", "fields": {"approval_status": "Approved"}}]).get_json()[
        "results"
    ]
    assert result["error"]["code"] == "RECORD_LOCKED"
    clock.advance(61)
    [result] = api_update(web, [{"id": "D-1001", "fields": {"approval_status": "Approved"}}]).get_json()[
        "results"
    ]
    assert result == {"id": "D-1001", "ok": True}


def test_company_form_redirects_back_to_the_company(web: FlaskClient, receiver: Any) -> None:
    response = web.post("/companies/C-200", data={"name": "Contoso Retail plc", "credit_score": "64"})
    assert response.headers["Location"].startswith("/companies/C-200?saved=msg_")


def test_the_page_links_to_the_approver_app_and_the_mail_catcher_when_it_runs(tmp_path: Path) -> None:
    from dataclasses import replace

    from connector.config import NotifySettings

    settings = replace(sandbox_settings(tmp_path), public_base_url="http://127.0.0.1:9100")
    caught = SandboxConfig.from_settings(replace(settings, notify=NotifySettings(mail_catcher_port=9125)))
    real_smtp = SandboxConfig.from_settings(
        replace(settings, notify=NotifySettings(smtp_host="smtp.example"))
    )
    for config, catcher in ((caught, True), (real_smtp, False)):
        app = create_sandbox_app(config, store=Store(config.db_path), start_delivery=False)
        page = app.test_client().get("/").get_data(as_text=True)
        assert 'href="http://127.0.0.1:9100/app/"' in page
        assert ('href="http://127.0.0.1:9125/"' in page) is catcher
        assert "boris.novak@sandbox.example" in page  # the address to sign in with


# --- Host, Origin and CSRF -----------------------------------------------------------------------


def test_a_form_post_without_the_csrf_token_is_refused_and_changes_nothing(app: Flask, store: Store) -> None:
    plain = FlaskClient(app)  # posts the form without the page's token, as a cross-site form would
    response = plain.post("/deals/D-1001", data=deal_form(store, amount="999999"))
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["code"] == "CSRF_FAILED" and "Reload the page" in error["message"]
    assert store.get("deal", "D-1001")["amount"] == 185000
    assert plain.post("/deliveries/retry").status_code == 400
    assert plain.post("/deals/D-1001/lock").status_code == 400
    assert store.locked_until("deal", "D-1001") is None


def test_a_token_from_another_session_is_refused(app: Flask, store: Store) -> None:
    token = app.test_client().csrf_token()  # type: ignore[attr-defined]
    other = FlaskClient(app)
    response = other.post("/deals/D-1001", data={**deal_form(store, amount="1"), "csrf_token": token})
    assert response.status_code == 400
    assert store.get("deal", "D-1001")["amount"] == 185000


def test_every_form_on_the_pages_carries_the_token(web: FlaskClient, store: Store) -> None:
    store.lock("deal", "D-1001", 60)
    for path in ("/deals/D-1001", "/companies/C-100"):
        page = web.get(path).get_data(as_text=True)
        assert page.count("<form") == page.count('name="csrf_token"'), path


@pytest.mark.parametrize("origin", ["http://evil.test", "null", "http://127.0.0.1:9999", "https://localhost"])
def test_a_cross_origin_form_post_is_refused(web: FlaskClient, store: Store, origin: str) -> None:
    response = web.post("/deals/D-1001", data=deal_form(store, amount="1"), headers={"Origin": origin})
    assert response.status_code == 403
    assert response.get_json()["error"]["code"] == "CROSS_ORIGIN"
    assert store.get("deal", "D-1001")["amount"] == 185000


def test_a_same_origin_form_post_is_accepted(web: FlaskClient, store: Store, receiver: Any) -> None:
    response = web.post(
        "/deals/D-1001", data=deal_form(store, amount="1"), headers={"Origin": "http://localhost"}
    )
    assert response.status_code == 303
    assert store.get("deal", "D-1001")["amount"] == 1


@pytest.mark.parametrize("host", ["evil.test", "evil.test:8001", "127.0.0.2:8001", "sandbox.local"])
def test_an_unknown_host_header_is_refused_on_pages_and_api(web: FlaskClient, host: str) -> None:
    for path, headers in (("/", {}), ("/api/v1/objects/deal/D-1001", AUTH)):
        response = web.get(path, headers={**headers, "Host": host})
        assert response.status_code == 400, (path, host)
        error = response.get_json()["error"]
        assert error["code"] == "UNKNOWN_HOST" and host in error["message"]


@pytest.mark.parametrize(
    "host", ["127.0.0.1:8001", "localhost", "localhost:8001", "[::1]:8001", "LOCALHOST:8001"]
)
def test_its_own_and_loopback_hosts_are_answered(web: FlaskClient, host: str) -> None:
    assert web.get("/", headers={"Host": host}).status_code == 200
    assert web.get("/api/v1/objects/deal/D-1001", headers={**AUTH, "Host": host}).status_code == 200


def test_the_api_needs_no_csrf_token(web: FlaskClient) -> None:
    plain = FlaskClient(web.application)
    assert api_update(plain, [{"id": "D-1001", "fields": {"stage": "Proposal"}}]).status_code == 200
