"""Zoho CRM: both intake kinds (notification callbacks, workflow webhooks) and the adapter
(data centres, OAuth token cache/refresh, write-back, reads with lookups, queries, describe)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

import pytest
import responses
from flask.testing import FlaskClient
from sqlalchemy import func, select

from connector.config import ConfigError, Settings, parse_connections
from connector.crm.base import RecordUpdate
from connector.crm.errors import AuthError, FatalError, RateLimitedError
from connector.crm.registry import build_adapter
from connector.crm.retry import RetryPolicy
from connector.crm.zoho import ZohoAdapter, escape_search_value, search_criteria
from connector.events import RecordChangeEvent
from connector.runtime import Runtime
from connector.storage.models import InboxEvent
from tests.contract.harness_zoho import (
    ADAPTER_ENV,
    API,
    CHANNEL_ID,
    INTAKE_ENV,
    NOTIFY_TOKEN,
    TOKEN_URL,
    WORKFLOW_SECRET,
    error_body,
    first_then_ok,
    json_reply,
    mock_fields,
    mock_module_records,
    mock_token,
    mock_update_endpoint,
    notification,
    per_record_reply,
    query,
    record_locked,
    record_success,
    token_body,
    updates_reply,
)

RID = "5725767000003000064"
RID2 = "5725767000003000065"


# --- intake fixtures ------------------------------------------------------------------


@pytest.fixture
def runtime(settings_factory: Any, runtime_factory: Any) -> Runtime:
    return runtime_factory(settings_factory(env=dict(INTAKE_ENV)))  # type: ignore[no-any-return]


@pytest.fixture
def client(runtime: Runtime, app_factory: Any) -> FlaskClient:
    return app_factory(runtime).test_client()  # type: ignore[no-any-return]


def now_ms(offset_seconds: int = 0) -> int:
    return (int(time.time()) + offset_seconds) * 1000


def notify(
    client: FlaskClient,
    body: Any,
    *,
    raw: bytes | None = None,
    content_type: str = "application/json",
    path: str = "/webhooks/zoho/notify",
) -> Any:
    data = raw if raw is not None else json.dumps(body).encode()
    return client.post(path, data=data, headers={"Content-Type": content_type})


def rows(runtime: Runtime) -> list[InboxEvent]:
    with runtime.sessions() as session:
        return list(session.scalars(select(InboxEvent).order_by(InboxEvent.id)))


def inbox_count(runtime: Runtime) -> int:
    with runtime.sessions() as session:
        return session.scalar(select(func.count()).select_from(InboxEvent)) or 0


# --- notification callbacks -----------------------------------------------------------


def test_notification_gives_one_event_per_id_with_fields_and_values(
    client: FlaskClient, runtime: Runtime
) -> None:
    sent_at = now_ms()
    body = notification(
        RID,
        sent_at,
        ids=[RID, RID2],
        affected_fields=[{RID: ["Stage", "Amount"]}, {RID2: ["Stage"]}],
        affected_values=[{"record_id": RID, "values": {"Stage": "Closed Won", "Amount": 150000}}],
    )
    response = notify(client, body)
    assert response.status_code == 202, response.get_json()
    assert response.get_json() == {"accepted": 2, "duplicates": 0}
    first, second = rows(runtime)
    assert (first.source, first.connection, first.object_type, first.record_id) == (
        "zoho",
        "zoho",
        "Deals",
        RID,
    )
    assert first.change_type == "updated"
    assert first.changed_fields == ["Stage", "Amount"]
    assert first.values == {"Stage": "Closed Won", "Amount": 150000}
    assert first.origin is None
    assert first.dedupe_key == f"zoho:notify:{CHANNEL_ID}:{sent_at}:{RID}"
    assert first.event_id == f"{CHANNEL_ID}:{sent_at}:{RID}"
    assert first.occurred_at.replace(tzinfo=UTC) == datetime.fromtimestamp(sent_at / 1000, UTC)
    assert (second.record_id, second.changed_fields, second.values) == (RID2, ["Stage"], None)


@pytest.mark.parametrize(("operation", "change_type"), [("insert", "created"), ("delete", "deleted")])
def test_notification_operations_map_to_change_types(
    client: FlaskClient, runtime: Runtime, operation: str, change_type: str
) -> None:
    assert (
        notify(client, notification(RID, now_ms(), operation=operation, affected_fields=[])).status_code
        == 202
    )
    [row] = rows(runtime)
    assert row.change_type == change_type
    assert row.changed_fields == []


def test_flat_affected_fields_apply_to_every_id(client: FlaskClient, runtime: Runtime) -> None:
    notify(client, notification(RID, now_ms(), ids=[RID, RID2], affected_fields=["Stage"]))
    assert [r.changed_fields for r in rows(runtime)] == [["Stage"], ["Stage"]]


def test_notification_redelivery_is_acknowledged_and_dropped(client: FlaskClient, runtime: Runtime) -> None:
    body = notification(RID, now_ms())
    assert notify(client, body).status_code == 202
    again = notify(client, body)
    assert again.status_code == 200
    assert again.get_json() == {"accepted": 0, "duplicates": 1}
    assert inbox_count(runtime) == 1


def test_same_record_in_a_later_notification_is_a_new_event(client: FlaskClient, runtime: Runtime) -> None:
    notify(client, notification(RID, now_ms()))
    notify(client, notification(RID, now_ms() + 1))
    assert inbox_count(runtime) == 2


@pytest.mark.parametrize(
    ("make_body", "code"),
    [
        (lambda: notification(RID, now_ms(), token="TOKEN_GUESSED"), "bad_token"),
        (lambda: notification(RID, now_ms(), token=""), "missing_token"),
        (lambda: {k: v for k, v in notification(RID, now_ms()).items() if k != "token"}, "missing_token"),
        (lambda: notification(RID, now_ms(-301)), "stale_timestamp"),
        (lambda: notification(RID, now_ms(+310)), "stale_timestamp"),
    ],
)
def test_forged_or_stale_notifications_are_refused(
    client: FlaskClient, runtime: Runtime, make_body: Callable[[], Any], code: str
) -> None:
    response = notify(client, make_body())
    assert response.status_code == 401
    assert response.get_json()["error"]["code"] == code
    assert inbox_count(runtime) == 0


def test_notification_inside_the_window_is_accepted(client: FlaskClient) -> None:
    assert notify(client, notification(RID, now_ms(-290))).status_code == 202


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"raw": b"{not json"}, 400, "malformed_json"),
        ({"raw": b"[1, 2]"}, 400, "bad_payload"),
        ({"content_type": "application/x-www-form-urlencoded"}, 415, "unsupported_content_type"),
        ({"body": notification(RID, now_ms(), module="Invoices")}, 422, "unknown_object"),
        ({"body": notification(RID, now_ms(), ids=[])}, 400, "bad_payload"),
        ({"body": notification(RID, now_ms(), ids=RID)}, 400, "bad_payload"),
        ({"body": notification(RID, now_ms(), operation="explode")}, 400, "bad_payload"),
        ({"body": notification(RID, now_ms(), server_time="yesterday")}, 400, "bad_payload"),
        (
            {"body": {k: v for k, v in notification(RID, now_ms()).items() if k != "server_time"}},
            400,
            "bad_payload",
        ),
        ({"body": notification(RID, now_ms(), channel_id=None)}, 400, "bad_payload"),
        ({"body": notification(RID, now_ms(), affected_fields=[{RID: "Stage"}])}, 400, "bad_payload"),
        ({"body": notification(RID, now_ms(), affected_values=[{"values": {}}])}, 400, "bad_payload"),
    ],
)
def test_bad_notifications_get_a_clear_4xx_and_write_nothing(
    client: FlaskClient, runtime: Runtime, kwargs: dict[str, Any], status: int, code: str
) -> None:
    body = kwargs.pop("body", notification(RID, now_ms()))
    response = notify(client, body, **kwargs)
    assert response.status_code == status, response.get_json()
    error = response.get_json()["error"]
    assert error["code"] == code
    assert error["message"]
    assert inbox_count(runtime) == 0


def test_connection_without_notify_token_refuses_everything(
    settings_factory: Any, runtime_factory: Any, app_factory: Any
) -> None:
    runtime = runtime_factory(settings_factory(env={"CRM_CONNECTIONS": "zoho"}))
    response = notify(app_factory(runtime).test_client(), notification(RID, now_ms()))
    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "not_configured"
    assert "ZOHO_NOTIFY_TOKEN" in response.get_json()["error"]["hint"]
    assert inbox_count(runtime) == 0


def test_rejections_never_echo_or_log_the_token(
    client: FlaskClient, caplog: pytest.LogCaptureFixture
) -> None:
    response = notify(client, notification(RID, now_ms(), token="TOKEN_GUESSED_X"))
    assert NOTIFY_TOKEN not in response.get_data(as_text=True)
    assert "TOKEN_GUESSED_X" not in response.get_data(as_text=True)
    assert "bad_token" in caplog.text
    assert NOTIFY_TOKEN not in caplog.text and "TOKEN_GUESSED_X" not in caplog.text


def test_the_connection_is_chosen_by_query_parameter(
    settings_factory: Any, runtime_factory: Any, app_factory: Any
) -> None:
    env = {
        "CRM_CONNECTIONS": "zoho_eu=zoho,zoho_in=zoho",
        "ZOHO_EU_NOTIFY_TOKEN": "eu-token",
        "ZOHO_IN_NOTIFY_TOKEN": NOTIFY_TOKEN,
    }
    runtime = runtime_factory(settings_factory(env=env))
    client = app_factory(runtime).test_client()
    assert notify(client, notification(RID, now_ms())).status_code == 400  # ambiguous
    assert (
        notify(
            client, notification(RID, now_ms()), path="/webhooks/zoho/notify?connection=zoho_eu"
        ).status_code
        == 401
    )
    response = notify(client, notification(RID, now_ms()), path="/webhooks/zoho/notify?connection=zoho_in")
    assert response.status_code == 202
    assert rows(runtime)[0].connection == "zoho_in"
    assert rows(runtime)[0].dedupe_key.startswith("zoho_in:")


# --- workflow webhooks ----------------------------------------------------------------


def workflow_params(**overrides: Any) -> dict[str, Any]:
    params: dict[str, Any] = {
        "crm_approvals_secret": WORKFLOW_SECRET,
        "module": "Deals",
        "id": RID,
        "modified_time": "2026-11-23T10:00:00+05:30",
        "modified_by": "554023000000235011",
        "Amount": "150000.00",
        "Stage": "Negotiation/Review",
    }
    params.update(overrides)
    return {k: v for k, v in params.items() if v is not None}


def post_workflow(
    client: FlaskClient, params: dict[str, Any], *, as_json: bool = False, content_type: str | None = None
) -> Any:
    if as_json:
        return client.post(
            "/webhooks/zoho/workflow",
            data=json.dumps(params),
            headers={"Content-Type": content_type or "application/json"},
        )
    if content_type:
        return client.post("/webhooks/zoho/workflow", data="x=1", headers={"Content-Type": content_type})
    return client.post("/webhooks/zoho/workflow", data=params)  # form-urlencoded


def test_form_workflow_webhook_becomes_an_event_with_string_values(
    client: FlaskClient, runtime: Runtime
) -> None:
    response = post_workflow(client, workflow_params())
    assert response.status_code == 202, response.get_json()
    [row] = rows(runtime)
    assert (row.source, row.object_type, row.record_id, row.change_type) == ("zoho", "Deals", RID, "updated")
    assert row.values == {"Amount": "150000.00", "Stage": "Negotiation/Review"}
    assert row.changed_fields == []
    assert row.origin == "554023000000235011"
    assert row.dedupe_key == f"zoho:workflow:Deals:{RID}:2026-11-23T10:00:00+05:30"
    assert row.occurred_at.replace(tzinfo=UTC) == datetime(2026, 11, 23, 4, 30, tzinfo=UTC)


def test_json_and_multipart_workflow_webhooks_are_accepted(client: FlaskClient, runtime: Runtime) -> None:
    assert post_workflow(client, workflow_params(), as_json=True).status_code == 202
    multipart = client.post(
        "/webhooks/zoho/workflow", data=workflow_params(id=RID2), content_type="multipart/form-data"
    )
    assert multipart.status_code == 202
    assert [r.record_id for r in rows(runtime)] == [RID, RID2]


def test_the_secret_is_never_stored_as_a_value(client: FlaskClient, runtime: Runtime) -> None:
    post_workflow(client, workflow_params())
    assert WORKFLOW_SECRET not in json.dumps(rows(runtime)[0].values)


def test_workflow_redelivery_is_dropped_but_a_later_change_is_not(
    client: FlaskClient, runtime: Runtime
) -> None:
    assert post_workflow(client, workflow_params()).status_code == 202
    assert post_workflow(client, workflow_params()).get_json() == {"accepted": 0, "duplicates": 1}
    assert (
        post_workflow(client, workflow_params(modified_time="2026-11-23T10:05:00+05:30")).status_code == 202
    )
    assert inbox_count(runtime) == 2


def test_display_formatted_modified_time_still_dedupes(client: FlaskClient, runtime: Runtime) -> None:
    before = datetime.now(UTC)
    assert post_workflow(client, workflow_params(modified_time="Nov 23, 2026 10:00 AM")).status_code == 202
    assert post_workflow(client, workflow_params(modified_time="Nov 23, 2026 10:00 AM")).status_code == 200
    [row] = rows(runtime)
    assert row.occurred_at.replace(tzinfo=UTC) >= before.replace(microsecond=0)


@pytest.mark.parametrize(
    ("params", "status", "code"),
    [
        (workflow_params(crm_approvals_secret=None), 401, "missing_token"),
        (workflow_params(crm_approvals_secret="guessed"), 401, "bad_token"),
        (workflow_params(modified_time=None), 400, "bad_payload"),
        (workflow_params(id=None), 400, "bad_payload"),
        (workflow_params(module=None), 400, "bad_payload"),
        (workflow_params(module="Invoices"), 422, "unknown_object"),
    ],
)
def test_bad_workflow_webhooks_get_a_clear_4xx_and_write_nothing(
    client: FlaskClient, runtime: Runtime, params: dict[str, Any], status: int, code: str
) -> None:
    response = post_workflow(client, params)
    assert response.status_code == status, response.get_json()
    assert response.get_json()["error"]["code"] == code
    assert inbox_count(runtime) == 0


def test_missing_modified_time_says_how_to_fix_it(client: FlaskClient) -> None:
    hint = post_workflow(client, workflow_params(modified_time=None)).get_json()["error"]["hint"]
    assert "Modified Time" in hint


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"content_type": "text/plain"}, 415, "unsupported_content_type"),
        (
            {"as_json": True, "params": {"crm_approvals_secret": WORKFLOW_SECRET, "nested": {"a": 1}}},
            400,
            "bad_payload",
        ),
        ({"as_json": True, "params": ["not", "an", "object"]}, 400, "bad_payload"),
    ],
)
def test_malformed_workflow_bodies_are_refused(
    client: FlaskClient, runtime: Runtime, kwargs: dict[str, Any], status: int, code: str
) -> None:
    params = kwargs.pop("params", workflow_params())
    response = post_workflow(client, params, **kwargs)
    assert response.status_code == status
    assert response.get_json()["error"]["code"] == code
    assert inbox_count(runtime) == 0


# --- adapter fixtures -----------------------------------------------------------------


@pytest.fixture
def rsps() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def make_adapter(sleeps: list[float]) -> Callable[..., ZohoAdapter]:
    def make(clock: Callable[[], float] = time.monotonic, **env: str) -> ZohoAdapter:
        settings_env = {**ADAPTER_ENV, **{f"ZOHO_{k}": v for k, v in env.items()}}
        connection = parse_connections(settings_env)["zoho"]
        adapter = ZohoAdapter(
            connection, timeout=5, retry=RetryPolicy(attempts=3, sleep=sleeps.append), clock=clock
        )
        return adapter

    return make


def calls_to(rsps: responses.RequestsMock, url_prefix: str) -> list[Any]:
    return [c for c in rsps.calls if (c.request.url or "").startswith(url_prefix)]


# --- configuration, data centres, tokens ----------------------------------------------


@pytest.mark.parametrize(
    ("center", "accounts", "api"),
    [
        ("eu", "https://accounts.zoho.eu", "https://www.zohoapis.eu"),
        ("in", "https://accounts.zoho.in", "https://www.zohoapis.in"),
        ("com.au", "https://accounts.zoho.com.au", "https://www.zohoapis.com.au"),
        ("ca", "https://accounts.zohocloud.ca", "https://www.zohoapis.ca"),
        ("com", "https://accounts.zoho.com", "https://www.zohoapis.com"),
    ],
)
def test_data_centre_selects_accounts_server_and_api_domain(
    rsps: responses.RequestsMock,
    make_adapter: Callable[..., ZohoAdapter],
    center: str,
    accounts: str,
    api: str,
) -> None:
    mock_token(rsps, f"{accounts}/oauth/v2/token", api_domain=None)
    mock_update_endpoint_at(rsps, f"{api}/crm/v6/Deals")
    results = make_adapter(DATA_CENTER=center).update_records("Deals", [RecordUpdate(RID, {"Stage": "Won"})])
    assert results[0].ok
    assert [c.request.url for c in rsps.calls] == [f"{accounts}/oauth/v2/token", f"{api}/crm/v6/Deals"]


def mock_update_endpoint_at(rsps: responses.RequestsMock, url: str) -> None:
    rsps.add_callback(
        responses.PUT,
        url,
        callback=lambda r: updates_reply([record_success(i["id"]) for i in json.loads(r.body)["data"]]),
    )


def test_api_domain_from_the_token_response_wins_over_the_data_centre(
    rsps: responses.RequestsMock, make_adapter: Callable[..., ZohoAdapter]
) -> None:
    mock_token(rsps, "https://accounts.zoho.com/oauth/v2/token", api_domain="https://www.zohoapis.eu")
    mock_update_endpoint_at(rsps, "https://www.zohoapis.eu/crm/v6/Deals")
    assert make_adapter(DATA_CENTER="com").update_records("Deals", [RecordUpdate(RID, {"A": 1})])[0].ok


def test_explicit_api_domain_and_version_override_everything(
    rsps: responses.RequestsMock, make_adapter: Callable[..., ZohoAdapter]
) -> None:
    mock_token(rsps)
    mock_update_endpoint_at(rsps, "https://sandbox.zohoapis.com/crm/v7/Deals")
    adapter = make_adapter(API_DOMAIN="https://sandbox.zohoapis.com", API_VERSION="v7")
    assert adapter.update_records("Deals", [RecordUpdate(RID, {"A": 1})])[0].ok


def test_unknown_data_centre_and_missing_credentials_are_config_errors(
    make_adapter: Callable[..., ZohoAdapter],
) -> None:
    with pytest.raises(ConfigError, match="DATA_CENTER='mars'"):
        make_adapter(DATA_CENTER="mars")
    connection = parse_connections({"CRM_CONNECTIONS": "zoho", "ZOHO_CLIENT_ID": "x"})["zoho"]
    with pytest.raises(ConfigError, match="ZOHO_CLIENT_SECRET"):
        ZohoAdapter(connection)


def test_registry_builds_the_zoho_adapter() -> None:
    settings = Settings(connections=parse_connections(dict(ADAPTER_ENV)), http_timeout_seconds=7)
    adapter = build_adapter(settings.connection("zoho"), settings)
    assert isinstance(adapter, ZohoAdapter)
    assert adapter.timeout == 7


def test_one_token_call_serves_many_api_calls(
    rsps: responses.RequestsMock, make_adapter: Callable[..., ZohoAdapter]
) -> None:
    mock_token(rsps)
    mock_update_endpoint(rsps, per_record_reply({}))
    adapter = make_adapter()
    for _ in range(3):
        adapter.update_records("Deals", [RecordUpdate(RID, {"Stage": "Won"})])
    token_calls = calls_to(rsps, TOKEN_URL)
    assert len(token_calls) == 1
    api_calls = calls_to(rsps, API)
    assert len(api_calls) == 3
    assert all(c.request.headers["Authorization"] == "Zoho-oauthtoken 1000.access.1" for c in api_calls)


def test_token_request_carries_credentials_in_the_body_not_the_url(
    rsps: responses.RequestsMock, make_adapter: Callable[..., ZohoAdapter]
) -> None:
    mock_token(rsps)
    mock_update_endpoint(rsps, per_record_reply({}))
    make_adapter().update_records("Deals", [RecordUpdate(RID, {"A": 1})])
    request = calls_to(rsps, TOKEN_URL)[0].request
    assert request.url == TOKEN_URL
    assert parse_qs(request.body) == {
        "grant_type": ["refresh_token"],
        "client_id": ["1000.CLIENTID"],
        "client_secret": ["client-secret-value"],
        "refresh_token": ["1000.refresh.token"],
    }


def test_an_expiring_token_is_renewed_before_use(
    rsps: responses.RequestsMock, make_adapter: Callable[..., ZohoAdapter]
) -> None:
    now = [1000.0]
    mock_token(rsps)
    mock_update_endpoint(rsps, per_record_reply({}))
    adapter = make_adapter(clock=lambda: now[0])
    adapter.update_records("Deals", [RecordUpdate(RID, {"A": 1})])
    now[0] += 3600 - 30  # inside the renewal margin
    adapter.update_records("Deals", [RecordUpdate(RID, {"A": 1})])
    assert len(calls_to(rsps, TOKEN_URL)) == 2
    assert calls_to(rsps, API)[-1].request.headers["Authorization"] == "Zoho-oauthtoken 1000.access.2"


def test_invalid_token_401_refreshes_once_and_retries_with_the_new_token(
    rsps: responses.RequestsMock, make_adapter: Callable[..., ZohoAdapter]
) -> None:
    mock_token(rsps)
    log = mock_update_endpoint(rsps, first_then_ok(401, error_body("INVALID_TOKEN", "invalid oauth token")))
    results = make_adapter().update_records("Deals", [RecordUpdate(RID, {"A": 1})])
    assert results[0].ok
    assert len(log.calls) == 2
    assert len(calls_to(rsps, TOKEN_URL)) == 2
    headers = [c.request.headers["Authorization"] for c in calls_to(rsps, API)]
    assert headers == ["Zoho-oauthtoken 1000.access.1", "Zoho-oauthtoken 1000.access.2"]


def test_scope_mismatch_401_is_a_configuration_error_without_refresh(
    rsps: responses.RequestsMock, make_adapter: Callable[..., ZohoAdapter]
) -> None:
    mock_token(rsps)
    mock_update_endpoint(rsps, first_then_ok(401, error_body("OAUTH_SCOPE_MISMATCH", "invalid oauth scope")))
    with pytest.raises(AuthError, match="invalid oauth scope") as caught:
        make_adapter().update_records("Deals", [RecordUpdate(RID, {"A": 1})])
    assert caught.value.code == "OAUTH_SCOPE_MISMATCH"
    assert len(calls_to(rsps, TOKEN_URL)) == 1


def test_refused_refresh_token_is_a_clear_auth_error_without_secrets(
    rsps: responses.RequestsMock, make_adapter: Callable[..., ZohoAdapter]
) -> None:
    rsps.add(responses.POST, TOKEN_URL, json={"error": "invalid_code"})
    with pytest.raises(AuthError) as caught:
        make_adapter().update_records("Deals", [RecordUpdate(RID, {"A": 1})])
    text = str(caught.value)
    assert "invalid_code" in text and "ZOHO_REFRESH_TOKEN" in text
    assert "client-secret-value" not in text and "1000.refresh.token" not in text


def test_throttled_token_endpoint_is_retried(
    rsps: responses.RequestsMock, sleeps: list[float], make_adapter: Callable[..., ZohoAdapter]
) -> None:
    throttled = {
        "error_description": "You have made too many requests continuously. Please try again after "
        "some time.",
        "error": "Access Denied",
        "status": "failure",
    }
    rsps.add(responses.POST, TOKEN_URL, json=throttled, status=400)
    rsps.add(responses.POST, TOKEN_URL, json=token_body())
    mock_update_endpoint(rsps, per_record_reply({}))
    assert make_adapter().update_records("Deals", [RecordUpdate(RID, {"A": 1})])[0].ok
    assert sleeps == [60.0]


# --- write-back -----------------------------------------------------------------------


def test_per_record_errors_map_back_by_position_with_the_blamed_field(
    rsps: responses.RequestsMock, make_adapter: Callable[..., ZohoAdapter]
) -> None:
    mandatory = {
        "code": "MANDATORY_NOT_FOUND",
        "details": {"api_name": "Closing_Date", "json_path": "$.data[1]"},
        "message": "required field not found",
        "status": "error",
    }
    duplicate = {
        "code": "DUPLICATE_DATA",
        "details": {"api_name": "Deal_Name", "id": "5725767000000000001"},
        "message": "duplicate data",
        "status": "error",
    }
    invalid = {
        "code": "INVALID_DATA",
        "details": {"expected_data_type": "double", "api_name": "Amount", "json_path": "$.data[3].Amount"},
        "message": "invalid data",
        "status": "error",
    }
    ids = [f"57257670000005241{i}" for i in range(5)]
    items = [record_success(ids[0]), mandatory, duplicate, invalid, record_locked()]
    mock_token(rsps)
    mock_update_endpoint(rsps, lambda _r, _c: updates_reply(items))
    results = make_adapter().update_records("Deals", [RecordUpdate(i, {"Amount": "lots"}) for i in ids])
    assert [r.record_id for r in results] == ids
    assert results[0].ok
    assert [(r.error_code, r.fields, r.message, r.retriable) for r in results[1:]] == [
        ("MANDATORY_NOT_FOUND", ("Closing_Date",), "required field not found", False),
        ("DUPLICATE_DATA", ("Deal_Name",), "duplicate data", False),
        ("INVALID_DATA", ("Amount",), "invalid data", False),
        ("RECORD_LOCKED", (), "You cannot perform this operation as the record is locked.", True),
    ]


def test_all_failed_batch_answered_with_400_still_maps_per_record(
    rsps: responses.RequestsMock, make_adapter: Callable[..., ZohoAdapter]
) -> None:
    item = {
        "code": "INVALID_DATA",
        "details": {"api_name": "id"},
        "message": "the id given seems to be invalid",
        "status": "error",
    }
    mock_token(rsps)
    mock_update_endpoint(rsps, lambda _r, _c: json_reply(400, {"data": [item]}))
    [result] = make_adapter().update_records("Deals", [RecordUpdate("999", {"A": 1})])
    assert (result.ok, result.error_code, result.fields) == (False, "INVALID_DATA", ("id",))


def test_request_level_400_is_fatal_with_zohos_message(
    rsps: responses.RequestsMock, make_adapter: Callable[..., ZohoAdapter]
) -> None:
    mock_token(rsps)
    body = error_body("INVALID_MODULE", "the module name given seems to be invalid")
    mock_update_endpoint(rsps, lambda _r, _c: json_reply(400, body), module="Dealz")
    with pytest.raises(FatalError, match="module name given seems to be invalid") as caught:
        make_adapter().update_records("Dealz", [RecordUpdate(RID, {"A": 1})])
    assert caught.value.code == "INVALID_MODULE"


def test_250_updates_go_out_in_calls_of_100_100_50(
    rsps: responses.RequestsMock, make_adapter: Callable[..., ZohoAdapter]
) -> None:
    mock_token(rsps)
    log = mock_update_endpoint(rsps, per_record_reply({}))
    ids = [str(5725767000000600000 + i) for i in range(250)]
    results = make_adapter().update_records("Deals", [RecordUpdate(i, {"Stage": "Won"}) for i in ids])
    assert [len(c) for c in log.calls] == [100, 100, 50]
    assert [i for call in log.calls for i in call] == ids
    assert all(r.ok for r in results)


@pytest.mark.parametrize(("setting", "sent"), [(None, []), ("workflow, Approval", ["workflow", "approval"])])
def test_trigger_option_is_always_sent(
    rsps: responses.RequestsMock,
    make_adapter: Callable[..., ZohoAdapter],
    setting: str | None,
    sent: list[str],
) -> None:
    mock_token(rsps)
    mock_update_endpoint(rsps, per_record_reply({}))
    adapter = make_adapter(**({"TRIGGER": setting} if setting else {}))
    adapter.update_records("Deals", [RecordUpdate(RID, {"Stage": "Won", "Amount": 10})])
    body = json.loads(calls_to(rsps, API)[0].request.body)
    assert body == {"data": [{"Stage": "Won", "Amount": 10, "id": RID}], "trigger": sent}


def test_unknown_trigger_is_a_config_error(make_adapter: Callable[..., ZohoAdapter]) -> None:
    with pytest.raises(ConfigError, match="ZOHO_TRIGGER"):
        make_adapter(TRIGGER="workflow,everything")


def test_429_is_retried_honouring_retry_after(
    rsps: responses.RequestsMock, sleeps: list[float], make_adapter: Callable[..., ZohoAdapter]
) -> None:
    mock_token(rsps)
    body = error_body("TOO_MANY_REQUESTS", "Too many requests")
    log = mock_update_endpoint(rsps, first_then_ok(429, body, {"Retry-After": "7"}))
    assert make_adapter().update_records("Deals", [RecordUpdate(RID, {"A": 1})])[0].ok
    assert len(log.calls) == 2
    assert sleeps == [7]


def test_429_without_retry_after_backs_off_and_gives_up_as_retriable(
    rsps: responses.RequestsMock, sleeps: list[float], make_adapter: Callable[..., ZohoAdapter]
) -> None:
    mock_token(rsps)
    body = error_body("TOO_MANY_REQUESTS", "Too many requests")
    log = mock_update_endpoint(rsps, lambda _r, _c: json_reply(429, body))
    with pytest.raises(RateLimitedError):
        make_adapter().update_records("Deals", [RecordUpdate(RID, {"A": 1})])
    assert len(log.calls) == 3
    assert len(sleeps) == 2


def test_too_many_requests_code_under_another_status_is_a_throttle(
    rsps: responses.RequestsMock, sleeps: list[float], make_adapter: Callable[..., ZohoAdapter]
) -> None:
    mock_token(rsps)
    log = mock_update_endpoint(rsps, first_then_ok(400, error_body("TOO_MANY_REQUESTS", "concurrency limit")))
    assert make_adapter().update_records("Deals", [RecordUpdate(RID, {"A": 1})])[0].ok
    assert len(log.calls) == 2


def test_server_error_is_retried(
    rsps: responses.RequestsMock, sleeps: list[float], make_adapter: Callable[..., ZohoAdapter]
) -> None:
    mock_token(rsps)
    log = mock_update_endpoint(
        rsps, first_then_ok(500, error_body("INTERNAL_ERROR", "Internal Server Error"))
    )
    assert make_adapter().update_records("Deals", [RecordUpdate(RID, {"A": 1})])[0].ok
    assert len(log.calls) == 2 and len(sleeps) == 1


# --- reads ----------------------------------------------------------------------------

DEALS = {
    RID: {
        "Deal_Name": "Zylker renewal",
        "Amount": 150000.0,
        "Account_Name": {"name": "Zylker", "id": "4150868000000224005"},
        "Owner": {"name": "Patricia Boyle", "id": "554023000000235011", "email": "p.boyle@zylker.com"},
    },
    RID2: {
        "Deal_Name": "No account",
        "Amount": 10.0,
        "Account_Name": None,
        "Owner": {"name": "Patricia Boyle", "id": "554023000000235011", "email": "p.boyle@zylker.com"},
    },
}
ACCOUNTS = {"4150868000000224005": {"Credit_Score": 720, "Industry": "Manufacturing"}}


def test_get_records_asks_for_ids_and_fields_and_resolves_lookups(
    rsps: responses.RequestsMock, make_adapter: Callable[..., ZohoAdapter]
) -> None:
    mock_token(rsps)
    mock_fields(rsps)
    mock_module_records(rsps, "Deals", DEALS)
    mock_module_records(rsps, "Accounts", ACCOUNTS)
    fields = [
        "Deal_Name",
        "Amount",
        "Account_Name.name",
        "Account_Name.Credit_Score",
        "Account_Name.Industry",
        "Owner.email",
    ]
    got = make_adapter().get_records("Deals", [RID, RID2, "404"], fields)
    assert got == {
        RID: {
            "id": RID,
            "Deal_Name": "Zylker renewal",
            "Amount": 150000.0,
            "Account_Name.name": "Zylker",
            "Account_Name.Credit_Score": 720,
            "Account_Name.Industry": "Manufacturing",
            "Owner.email": "p.boyle@zylker.com",
        },
        RID2: {
            "id": RID2,
            "Deal_Name": "No account",
            "Amount": 10.0,
            "Account_Name.name": None,
            "Account_Name.Credit_Score": None,
            "Account_Name.Industry": None,
            "Owner.email": "p.boyle@zylker.com",
        },
    }
    deals_call = query(calls_to(rsps, f"{API}/Deals")[0].request)
    assert deals_call == {"ids": f"{RID},{RID2},404", "fields": "Deal_Name,Amount,Account_Name,Owner"}
    [accounts_call] = calls_to(rsps, f"{API}/Accounts")
    assert query(accounts_call.request) == {"ids": "4150868000000224005", "fields": "Credit_Score,Industry"}


def test_embedded_lookup_keys_need_no_second_call(
    rsps: responses.RequestsMock, make_adapter: Callable[..., ZohoAdapter]
) -> None:
    mock_token(rsps)
    mock_module_records(rsps, "Deals", DEALS)
    got = make_adapter().get_record("Deals", RID, ["Account_Name.id", "Owner.name"])
    assert got == {"id": RID, "Account_Name.id": "4150868000000224005", "Owner.name": "Patricia Boyle"}
    assert calls_to(rsps, f"{API}/settings") == [] and calls_to(rsps, f"{API}/Accounts") == []


def test_no_content_means_not_found(
    rsps: responses.RequestsMock, make_adapter: Callable[..., ZohoAdapter]
) -> None:
    mock_token(rsps)
    mock_module_records(rsps, "Deals", {})
    assert make_adapter().get_record("Deals", "404", ["Deal_Name"]) is None


@pytest.mark.parametrize("field", ["Owner.Phone", "Deal_Name.Anything"])
def test_dotted_field_through_a_non_module_lookup_is_a_clear_error(
    rsps: responses.RequestsMock, make_adapter: Callable[..., ZohoAdapter], field: str
) -> None:
    mock_token(rsps)
    mock_fields(rsps)
    mock_module_records(rsps, "Deals", DEALS)
    with pytest.raises(FatalError, match="not a lookup to another module"):
        make_adapter().get_record("Deals", RID, [field])


@pytest.mark.parametrize("field", ["Account_Name.Parent.Name", "Bad Field", "A:B"])
def test_malformed_field_names_are_refused_before_any_call(
    make_adapter: Callable[..., ZohoAdapter], field: str
) -> None:
    with pytest.raises(FatalError):
        make_adapter()._read_plan("Deals", [field])


# --- queries --------------------------------------------------------------------------


def test_search_criteria_escape_parentheses_and_commas() -> None:
    assert escape_search_value("Burns,B (UK)") == r"Burns\,B \(UK\)"
    assert escape_search_value(True) == "true"
    assert search_criteria({"Stage": "Closed Won"}) == "(Stage:equals:Closed Won)"
    since = datetime(2026, 1, 2, 3, 4, 5, 678, tzinfo=UTC)
    assert search_criteria({"Account_Name": "Burns,B"}, since) == (
        r"((Account_Name:equals:Burns\,B)and(Modified_Time:greater_equal:2026-01-02T03:04:05+00:00))"
    )
    with pytest.raises(FatalError):
        search_criteria({"Stage": None})
    with pytest.raises(FatalError):
        search_criteria({"Stage) or (Amount": "1"})


def test_query_with_filters_uses_search_pages_and_keeps_exact_matches(
    rsps: responses.RequestsMock, make_adapter: Callable[..., ZohoAdapter]
) -> None:
    mock_token(rsps)
    pages = [
        {
            "data": [
                {"id": "1", "Deal_Name": "A", "Stage": "Won (final)"},
                {"id": "2", "Deal_Name": "B", "Stage": "Won (final) later"},
            ],
            "info": {"per_page": 200, "count": 2, "page": 1, "more_records": True},
        },
        {
            "data": [{"id": "3", "Deal_Name": "C", "Stage": "Won (final)"}],
            "info": {"per_page": 200, "count": 1, "page": 2, "more_records": False},
        },
    ]
    for page in pages:
        rsps.add(responses.GET, f"{API}/Deals/search", json=page)
    got = list(make_adapter().query("Deals", ["Deal_Name"], {"Stage": "Won (final)"}))
    assert got == [{"id": "1", "Deal_Name": "A"}, {"id": "3", "Deal_Name": "C"}]
    params = [query(c.request) for c in calls_to(rsps, f"{API}/Deals/search")]
    assert [p["page"] for p in params] == ["1", "2"]
    assert params[0]["criteria"] == r"(Stage:equals:Won \(final\))"
    assert params[0]["fields"] == "Deal_Name,Stage"
    assert r"Won%20%5C%28final%5C%29" in calls_to(rsps, f"{API}/Deals/search")[0].request.url.replace(
        "+", "%20"
    )


def test_query_by_modified_since_lists_with_if_modified_since_and_page_tokens(
    rsps: responses.RequestsMock, make_adapter: Callable[..., ZohoAdapter]
) -> None:
    mock_token(rsps)
    rsps.add(
        responses.GET,
        f"{API}/Deals",
        json={
            "data": [{"id": "1", "Amount": 5}],
            "info": {
                "per_page": 200,
                "more_records": True,
                "next_page_token": "c8582xx9e7c",
                "page_token_expiry": "2026-01-03",
            },
        },
    )
    rsps.add(
        responses.GET,
        f"{API}/Deals",
        json={"data": [{"id": "2", "Amount": 6}], "info": {"per_page": 200, "more_records": False}},
    )
    since = datetime(2026, 1, 2, 8, 0, tzinfo=UTC)
    got = list(make_adapter().query("Deals", ["Amount"], modified_since=since))
    assert got == [{"id": "1", "Amount": 5}, {"id": "2", "Amount": 6}]
    first, second = calls_to(rsps, f"{API}/Deals")
    assert first.request.headers["If-Modified-Since"] == "2026-01-02T08:00:00+00:00"
    assert "page_token" not in query(first.request)
    assert query(second.request)["page_token"] == "c8582xx9e7c"


def test_query_with_nothing_modified_is_empty(
    rsps: responses.RequestsMock, make_adapter: Callable[..., ZohoAdapter]
) -> None:
    mock_token(rsps)
    rsps.add(responses.GET, f"{API}/Deals", status=304)
    assert (
        list(make_adapter().query("Deals", ["Amount"], modified_since=datetime(2026, 1, 1, tzinfo=UTC))) == []
    )


# --- describe, loop prevention --------------------------------------------------------


def test_describe_maps_field_metadata_and_is_fetched_once(
    rsps: responses.RequestsMock, make_adapter: Callable[..., ZohoAdapter]
) -> None:
    mock_token(rsps)
    mock_fields(rsps)
    adapter = make_adapter()
    fields = {f.name: f for f in adapter.describe("Deals")}
    adapter.describe("Deals")
    assert len(calls_to(rsps, f"{API}/settings/fields")) == 1
    assert query(calls_to(rsps, f"{API}/settings/fields")[0].request) == {"module": "Deals"}
    account = fields["Account_Name"]
    assert (account.label, account.type, account.reference_to, account.updateable) == (
        "Account Name",
        "lookup",
        ("Accounts",),
        True,
    )
    assert fields["Modified_Time"].updateable is False
    assert fields["Amount"].type == "currency"


def event(origin: str | None) -> RecordChangeEvent:
    return RecordChangeEvent(
        source="zoho",
        connection="zoho",
        object_type="Deals",
        record_id=RID,
        event_id="e",
        occurred_at=datetime.now(UTC),
        dedupe_key="k",
        origin=origin,
    )


def test_is_own_change_uses_modified_by_against_api_user_id(make_adapter: Callable[..., ZohoAdapter]) -> None:
    adapter = make_adapter(API_USER_ID="554023000000235011, Integration User")
    assert adapter.is_own_change(event(None)) is None  # notification callbacks never say who
    assert adapter.is_own_change(event("554023000000235011")) is True
    assert adapter.is_own_change(event("Integration User")) is True
    assert adapter.is_own_change(event("554023000000999999")) is False
    assert make_adapter().is_own_change(event("554023000000235011")) is None


def test_workflow_origin_reaches_is_own_change_end_to_end(
    client: FlaskClient, runtime: Runtime, make_adapter: Callable[..., ZohoAdapter]
) -> None:
    post_workflow(client, workflow_params(modified_by="554023000000235011"))
    notify(client, notification(RID2, now_ms()))
    workflow_event, notify_event = (RecordChangeEvent.from_row(r) for r in rows(runtime))
    adapter = make_adapter(API_USER_ID="554023000000235011")
    assert adapter.is_own_change(workflow_event) is True
    assert adapter.is_own_change(notify_event) is None


def test_a_module_name_cannot_leave_the_records_api(
    rsps: responses.RequestsMock, make_adapter: Callable[..., ZohoAdapter]
) -> None:
    mock_token(rsps)
    with pytest.raises(FatalError, match="not a Zoho API name"):
        make_adapter().update_records("../settings/variables", [RecordUpdate(RID, {"A": 1})])
    assert calls_to(rsps, API) == []
