"""HubSpot: the signed webhook intake (v3 signature, coalescing, redelivery, bad input) and the
CRM v3 adapter (batch writes and their 207 results, rate limits, associations, search, auth,
echo detection). HTTP to HubSpot is mocked with `responses` in HubSpot's documented formats."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import responses
from flask.testing import FlaskClient
from sqlalchemy import select

from connector.config import ConfigError, Settings, parse_connections
from connector.crm.auth import AccessToken
from connector.crm.base import RecordUpdate
from connector.crm.errors import AuthError, FatalError, RateLimitedError
from connector.crm.hubspot import HubSpotAdapter, rate_limited, to_hubspot_value
from connector.crm.retry import RetryPolicy
from connector.events import RecordChangeEvent
from connector.runtime import Runtime
from connector.storage.models import InboxEvent
from tests.contract.harness import CallLog
from tests.contract.harness_hubspot import (
    API,
    APP_ID,
    CLIENT_SECRET,
    OAUTH_ACCESS_TOKEN,
    OAUTH_ENV,
    OAUTH_RENEWED_TOKEN,
    PRIVATE_APP_ENV,
    PRIVATE_APP_TOKEN,
    RATE_LIMIT_HEADERS,
    association_result,
    batch_response,
    error_body,
    hubspot_event,
    invalid_option_error,
    json_of,
    mock_deals_with_companies,
    oauth_token_response,
    rate_limit_body,
    signed_headers,
    simple_object,
    standard_error,
    update_responder,
)
from webhooks.hubspot import decode_for_signature

REPO = Path(__file__).resolve().parents[2]
LOCAL_URI = "http://127.0.0.1:8000/webhooks/hubspot"  # Settings' default PUBLIC_BASE_URL + path
UPDATE_URL = f"{API}/crm/v3/objects/deals/batch/update"


# --- intake fixtures ----------------------------------------------------------------------


@pytest.fixture
def hubspot_runtime(
    settings_factory: Callable[..., Settings], runtime_factory: Callable[[Settings], Runtime]
) -> Runtime:
    return runtime_factory(settings_factory(env=PRIVATE_APP_ENV))


@pytest.fixture
def client(hubspot_runtime: Runtime, app_factory: Any) -> FlaskClient:
    return app_factory(hubspot_runtime).test_client()


def post(
    client: FlaskClient,
    events: Any,
    *,
    uri: str = LOCAL_URI,
    path: str = "/webhooks/hubspot",
    raw: bytes | None = None,
    **sign: Any,
) -> Any:
    body = raw if raw is not None else json.dumps(events).encode()
    return client.post(path, data=body, headers=signed_headers(body, uri, **sign))


def inbox(runtime: Runtime) -> list[InboxEvent]:
    with runtime.sessions() as session:
        return list(session.scalars(select(InboxEvent).order_by(InboxEvent.id)))


# --- intake: signature --------------------------------------------------------------------


def test_signed_delivery_becomes_a_canonical_event(client: FlaskClient, hubspot_runtime: Runtime) -> None:
    response = post(client, [hubspot_event(1001, 3029365631)])
    assert response.status_code == 202, response.get_json()
    assert response.get_json() == {"accepted": 1, "duplicates": 0}
    [row] = inbox(hubspot_runtime)
    assert (row.source, row.connection, row.object_type, row.record_id) == (
        "hubspot",
        "hubspot",
        "deals",
        "1001",
    )
    assert (row.change_type, row.changed_fields, row.values) == ("updated", ["amount"], {"amount": "150000"})
    assert row.event_id == "3029365631"
    assert row.origin == "CRM_UI:userId:882761034"
    assert row.occurred_at.replace(tzinfo=UTC) == datetime.fromtimestamp(1795600000, UTC)
    assert row.dedupe_key.startswith("hubspot:hubspot:deals:1001:")


@pytest.mark.parametrize(
    ("sign", "skew_seconds", "code"),
    [
        ({"secret": "0" * 36}, 0, "bad_signature"),
        ({"method": "GET"}, 0, "bad_signature"),
        ({}, -310, "stale_timestamp"),
        ({}, +310, "stale_timestamp"),
    ],
    ids=["forged-secret", "other-method", "stale", "future"],
)
def test_forged_stale_or_future_deliveries_are_refused(
    client: FlaskClient, hubspot_runtime: Runtime, sign: dict[str, Any], skew_seconds: int, code: str
) -> None:
    timestamp_ms = int((time.time() + skew_seconds) * 1000)
    response = post(client, [hubspot_event(1001, 1)], timestamp_ms=timestamp_ms, **sign)
    assert response.status_code == 401
    assert response.get_json()["error"]["code"] == code
    assert inbox(hubspot_runtime) == []


def test_timestamp_inside_the_five_minute_window_is_accepted(client: FlaskClient) -> None:
    assert (
        post(client, [hubspot_event(1001, 1)], timestamp_ms=int(time.time() * 1000) - 290_000).status_code
        == 202
    )


def test_tampered_body_fails_the_signature(client: FlaskClient, hubspot_runtime: Runtime) -> None:
    body = json.dumps([hubspot_event(1001, 1)]).encode()
    headers = signed_headers(body, LOCAL_URI)
    response = client.post("/webhooks/hubspot", data=body.replace(b"150000", b"950000"), headers=headers)
    assert response.status_code == 401
    assert response.get_json()["error"]["code"] == "bad_signature"
    assert inbox(hubspot_runtime) == []


@pytest.mark.parametrize(
    ("drop", "code"),
    [("X-HubSpot-Signature-v3", "missing_signature"), ("X-HubSpot-Request-Timestamp", "missing_timestamp")],
)
def test_missing_signature_headers_are_refused(client: FlaskClient, drop: str, code: str) -> None:
    body = json.dumps([hubspot_event(1001, 1)]).encode()
    headers = {k: v for k, v in signed_headers(body, LOCAL_URI).items() if k != drop}
    response = client.post("/webhooks/hubspot", data=body, headers=headers)
    assert response.status_code == 401
    assert response.get_json()["error"]["code"] == code


def test_signature_covers_the_public_uri_behind_a_proxy(
    settings_factory: Callable[..., Settings], runtime_factory: Any, app_factory: Any
) -> None:
    settings = settings_factory(env=PRIVATE_APP_ENV, public_base_url="https://crm.example.com/approvals")
    client = app_factory(runtime_factory(settings)).test_client()
    path = "/webhooks/hubspot?connection=hubspot"
    public = "https://crm.example.com/approvals/webhooks/hubspot?connection=hubspot"
    local = response = post(client, [hubspot_event(1001, 1)], path=path, uri="http://localhost" + path)
    assert local.status_code == 401  # what we saw locally is not what HubSpot signed
    response = post(client, [hubspot_event(1001, 1)], path=path, uri=public)
    assert response.status_code == 202, response.get_json()


def test_uri_is_signed_with_hubspots_listed_characters_decoded(client: FlaskClient) -> None:
    path = "/webhooks/hubspot?connection=hubspot&tag=q%3A1%2C2%20x"
    as_sent = "http://127.0.0.1:8000" + path
    assert post(client, [hubspot_event(1001, 1)], path=path, uri=as_sent).status_code == 401
    decoded = "http://127.0.0.1:8000/webhooks/hubspot?connection=hubspot&tag=q:1,2%20x"
    assert post(client, [hubspot_event(1001, 2)], path=path, uri=decoded).status_code == 202


def test_uri_without_a_query_has_no_trailing_question_mark(client: FlaskClient) -> None:
    assert post(client, [hubspot_event(1001, 1)], uri=LOCAL_URI + "?").status_code == 401
    assert post(client, [hubspot_event(1001, 1)], uri=LOCAL_URI).status_code == 202


def test_decoding_follows_hubspots_table_only() -> None:
    uri = "https://x.io/h?a=%3a%2F%3F%40%21%24%27%28%29%2A%2c%3B&b=%20%26%3D%25"
    assert decode_for_signature(uri) == "https://x.io/h?a=:/?@!$'()*,;&b=%20%26%3D%25"


def test_rejections_are_logged_without_secrets(client: FlaskClient, caplog: pytest.LogCaptureFixture) -> None:
    post(client, [hubspot_event(1001, 1)], secret="0" * 36)
    assert "bad_signature" in caplog.text
    assert CLIENT_SECRET not in caplog.text


def test_a_connection_without_client_secret_is_a_config_error_not_a_crash(
    settings_factory: Callable[..., Settings], runtime_factory: Any, app_factory: Any
) -> None:
    env = {k: v for k, v in PRIVATE_APP_ENV.items() if k != "HUBSPOT_CLIENT_SECRET"}
    client = app_factory(runtime_factory(settings_factory(env=env))).test_client()
    response = post(client, [hubspot_event(1001, 1)])
    assert response.status_code == 503
    assert "HUBSPOT_CLIENT_SECRET" in response.get_json()["error"]["hint"]


# --- intake: payload ----------------------------------------------------------------------


def test_events_for_one_record_are_coalesced(client: FlaskClient, hubspot_runtime: Runtime) -> None:
    events = [
        hubspot_event(1001, 11, propertyName="amount", propertyValue="100", occurredAt=1795600000000),
        hubspot_event(
            2002,
            12,
            subscriptionType="company.propertyChange",
            propertyName="credit_score",
            propertyValue="712",
        ),
        hubspot_event(1001, 13, propertyName="amount", propertyValue="120", occurredAt=1795600009000),
        hubspot_event(
            1001, 14, propertyName="dealstage", propertyValue="contractsent", occurredAt=1795600005000
        ),
    ]
    response = post(client, events)
    assert response.get_json() == {"accepted": 2, "duplicates": 0}
    deal, company = inbox(hubspot_runtime)
    assert (deal.object_type, deal.record_id) == ("deals", "1001")
    assert deal.changed_fields == ["amount", "dealstage"]
    assert deal.values == {"amount": "120", "dealstage": "contractsent"}  # the latest amount wins
    assert deal.occurred_at.replace(tzinfo=UTC) == datetime.fromtimestamp(1795600009, UTC)
    assert deal.event_id == "11,14,13"  # in the order they happened
    assert (company.object_type, company.record_id, company.values) == (
        "companies",
        "2002",
        {"credit_score": "712"},
    )


def test_creation_coalesced_with_changes_is_a_creation_of_the_whole_record(
    client: FlaskClient, hubspot_runtime: Runtime
) -> None:
    events = [
        hubspot_event(
            1001,
            21,
            subscriptionType="deal.creation",
            propertyName=None,
            propertyValue=None,
            changeFlag="CREATED",
        ),
        hubspot_event(1001, 22, occurredAt=1795600001000),
    ]
    assert post(client, events).status_code == 202
    [row] = inbox(hubspot_runtime)
    assert row.change_type == "created"
    assert row.changed_fields == []  # unknown: the worker fetches the whole record
    assert row.values == {"amount": "150000"}


@pytest.mark.parametrize(
    ("subscription", "change_type"),
    [("deal.deletion", "deleted"), ("deal.restore", "undeleted"), ("deal.merge", "updated")],
)
def test_change_type_follows_the_subscription_type(
    client: FlaskClient, hubspot_runtime: Runtime, subscription: str, change_type: str
) -> None:
    assert (
        post(client, [hubspot_event(1001, 1, subscriptionType=subscription, propertyName=None)]).status_code
        == 202
    )
    assert inbox(hubspot_runtime)[0].change_type == change_type


def test_generic_object_subscriptions_use_the_object_type_id(
    client: FlaskClient, hubspot_runtime: Runtime
) -> None:
    event = hubspot_event(1001, 1, subscriptionType="object.propertyChange", objectTypeId="0-3")
    assert post(client, [event]).status_code == 202
    assert inbox(hubspot_runtime)[0].object_type == "deals"


def test_sensitive_values_are_not_stored(client: FlaskClient, hubspot_runtime: Runtime) -> None:
    event = hubspot_event(
        1001,
        1,
        subscriptionType="object.propertyChange",
        objectTypeId="0-3",
        propertyName="passport_number",
        propertyValue="X1234567",
        isSensitive=True,
    )
    assert post(client, [event]).status_code == 202
    [row] = inbox(hubspot_runtime)
    assert row.changed_fields == ["passport_number"] and row.values is None


def test_redelivered_batch_is_acknowledged_and_dropped(client: FlaskClient, hubspot_runtime: Runtime) -> None:
    batch = [
        hubspot_event(1001, 31),
        hubspot_event(1001, 32, propertyName="dealstage"),
        hubspot_event(1002, 33),
    ]
    assert post(client, batch).get_json() == {"accepted": 2, "duplicates": 0}
    # HubSpot's retry: attemptNumber goes up and the request is signed again, later.
    retry = [{**event, "attemptNumber": 1} for event in batch]
    again = post(client, retry, timestamp_ms=int(time.time() * 1000) + 5000)
    assert again.status_code == 200
    assert again.get_json() == {"accepted": 0, "duplicates": 2}
    assert len(inbox(hubspot_runtime)) == 2
    later = post(client, [hubspot_event(1001, 34)])  # a new change to the same record is new
    assert later.get_json() == {"accepted": 1, "duplicates": 0}


@pytest.mark.parametrize(
    ("payload", "status", "code", "where"),
    [
        (b"[{not json", 400, "malformed_json", "line 1 column 3"),
        (b'{"objectId": 1001}', 400, "bad_payload", "JSON array"),
        (b"[]", 400, "bad_payload", "empty"),
        (b"[42]", 400, "bad_payload", "body[0]"),
        ([hubspot_event(1001, 1), hubspot_event(None, 2)], 400, "bad_payload", "body[1].objectId"),
        ([hubspot_event(1001, None)], 400, "bad_payload", "body[0].eventId"),
        ([hubspot_event(1001, 1, occurredAt="yesterday")], 400, "bad_payload", "body[0].occurredAt"),
        ([hubspot_event(1001, 1, occurredAt=10**20)], 400, "bad_payload", "body[0].occurredAt"),
        ([hubspot_event(1001, 1, subscriptionType=None)], 400, "bad_payload", "body[0].subscriptionType"),
        ([hubspot_event(1001, 1, propertyName=None)], 400, "bad_payload", "body[0].propertyName"),
        (
            [hubspot_event(1001, 1, subscriptionType="deal.exploded")],
            400,
            "unsupported_event",
            "deal.exploded",
        ),
        (
            [hubspot_event(1001, 1, subscriptionType="ticket.propertyChange")],
            422,
            "unknown_object",
            "tickets",
        ),
        ([hubspot_event(1001, 1, subscriptionType="object.creation")], 400, "bad_payload", "objectTypeId"),
    ],
)
def test_bad_input_gets_a_clear_4xx_and_writes_nothing(
    client: FlaskClient, hubspot_runtime: Runtime, payload: Any, status: int, code: str, where: str
) -> None:
    raw = payload if isinstance(payload, bytes) else None
    response = post(client, payload, raw=raw)
    assert response.status_code == status, response.get_json()
    error = response.get_json()["error"]
    assert error["code"] == code
    assert where in error["message"]
    assert inbox(hubspot_runtime) == []


def test_wrong_content_type_is_415(client: FlaskClient, hubspot_runtime: Runtime) -> None:
    body = json.dumps([hubspot_event(1001, 1)]).encode()
    headers = {**signed_headers(body, LOCAL_URI), "Content-Type": "text/plain"}
    response = client.post("/webhooks/hubspot", data=body, headers=headers)
    assert response.status_code == 415
    assert inbox(hubspot_runtime) == []


def test_unknown_connection_is_404(client: FlaskClient) -> None:
    path = "/webhooks/hubspot?connection=eu"
    response = post(client, [hubspot_event(1001, 1)], path=path, uri="http://127.0.0.1:8000" + path)
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "unknown_connection"


@pytest.mark.parametrize(
    ("sources", "origin"),
    [
        ([("INTEGRATION", APP_ID)], f"INTEGRATION:{APP_ID}"),
        ([("CRM_UI", "userId:882761034"), ("CRM_UI", "userId:882761034")], "CRM_UI:userId:882761034"),
        ([("INTEGRATION", APP_ID), ("CRM_UI", "userId:882761034")], "MIXED"),
        ([("IMPORT", None)], "IMPORT"),
        ([(None, None)], None),
    ],
)
def test_origin_is_change_source_and_source_id(
    client: FlaskClient,
    hubspot_runtime: Runtime,
    sources: list[tuple[str | None, str | None]],
    origin: str | None,
) -> None:
    events = [
        hubspot_event(1001, n, propertyName=f"p{n}", changeSource=source, sourceId=source_id)
        for n, (source, source_id) in enumerate(sources, start=1)
    ]
    assert post(client, events).status_code == 202
    assert inbox(hubspot_runtime)[0].origin == origin


# --- adapter fixtures ---------------------------------------------------------------------


@pytest.fixture
def sleeps() -> list[float]:
    return []


def make_adapter(env: dict[str, str] = PRIVATE_APP_ENV, sleeps: list[float] | None = None) -> HubSpotAdapter:
    connection = parse_connections(env)["hubspot"]
    adapter = HubSpotAdapter.from_config(connection, Settings(connections={"hubspot": connection}))
    adapter.retry = RetryPolicy(attempts=3, sleep=(sleeps if sleeps is not None else []).append)
    return adapter


@pytest.fixture
def rsps() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock() as mock:
        yield mock


def updates(count: int, **fields: Any) -> list[RecordUpdate]:
    return [RecordUpdate(str(1000 + n), fields or {"approval_status": "Approved"}) for n in range(count)]


# --- adapter: writes ----------------------------------------------------------------------


def test_updates_go_100_per_call_as_string_properties_with_the_token(rsps: responses.RequestsMock) -> None:
    log = CallLog()
    rsps.add_callback(responses.POST, UPDATE_URL, update_responder(log))
    fields = {
        "approved": True,
        "note": None,
        "amount": Decimal("1500.50"),
        "close": date(2026, 12, 1),
        "approved_at": datetime(2026, 11, 23, 10, 0, tzinfo=UTC),
        "regions": ["EMEA", "APAC"],
    }
    results = make_adapter().update_records("deals", updates(205, **fields))
    assert [len(call) for call in log.calls] == [100, 100, 5]
    assert all(r.ok for r in results) and len(results) == 205
    first = rsps.calls[0].request
    assert first.headers["Authorization"] == f"Bearer {PRIVATE_APP_TOKEN}"
    assert first.req_kwargs["timeout"] == 30.0  # type: ignore[attr-defined]
    assert json_of(first)["inputs"][0] == {
        "id": "1000",
        "properties": {
            "approved": "true",
            "note": "",
            "amount": "1500.50",
            "close": "2026-12-01",
            "approved_at": "1795428000000",
            "regions": "EMEA;APAC",
        },
    }


def test_multi_status_errors_map_back_to_their_records(rsps: responses.RequestsMock) -> None:
    body = batch_response(
        [simple_object("1000", {"approval_status": "Approved"})],
        [
            invalid_option_error(["1001"]),
            standard_error("OBJECT_NOT_FOUND", "Could not get some DEAL objects", ["1002"], key="ids"),
            standard_error("RATE_LIMITS", "You have reached your secondly limit.", ["1003"]),
            {
                "status": "error",
                "category": "VALIDATION_ERROR",
                "message": "No properties found to update",
                "errors": [{"message": "bad", "context": {"propertyName": ["approval_status"]}}],
                "context": {},
            },
        ],
    )
    rsps.add(responses.POST, UPDATE_URL, json=body, status=207)
    results = make_adapter().update_records("deals", updates(5))
    by_id = {r.record_id: r for r in results}
    assert [r.record_id for r in results] == ["1000", "1001", "1002", "1003", "1004"]
    assert by_id["1000"].ok
    invalid = by_id["1001"]
    assert (invalid.ok, invalid.error_code, invalid.fields, invalid.retriable) == (
        False,
        "VALIDATION_ERROR",
        ("approval_status",),
        False,
    )
    assert invalid.message is not None and invalid.message.startswith("Property values were not valid")
    assert (by_id["1002"].error_code, by_id["1002"].retriable) == ("OBJECT_NOT_FOUND", False)
    assert (by_id["1003"].error_code, by_id["1003"].retriable) == ("RATE_LIMITS", True)
    # An error naming no record applies to every record missing from `results`.
    assert (by_id["1004"].error_code, by_id["1004"].message) == (
        "VALIDATION_ERROR",
        "No properties found to update",
    )
    assert by_id["1004"].fields == ("approval_status",)


def test_a_batch_refused_whole_fails_every_record_with_hubspots_words(rsps: responses.RequestsMock) -> None:
    detail = [
        {
            "isValid": False,
            "message": 'Property "approval_state" does not exist',
            "error": "PROPERTY_DOESNT_EXIST",
            "name": "approval_state",
        }
    ]
    body = error_body("VALIDATION_ERROR", f"Property values were not valid: {json.dumps(detail)}")
    rsps.add(responses.POST, UPDATE_URL, json=body, status=400)
    results = make_adapter().update_records("deals", updates(3))
    assert [(r.ok, r.error_code, r.fields) for r in results] == [
        (False, "VALIDATION_ERROR", ("approval_state",))
    ] * 3
    assert all("does not exist" in (r.message or "") for r in results)


def test_rate_limit_honours_retry_after(rsps: responses.RequestsMock, sleeps: list[float]) -> None:
    rsps.add(
        responses.POST,
        UPDATE_URL,
        json=rate_limit_body(),
        status=429,
        headers={**RATE_LIMIT_HEADERS, "Retry-After": "3"},
    )
    rsps.add(responses.POST, UPDATE_URL, json=batch_response([simple_object("1000", {})]))
    assert make_adapter(sleeps=sleeps).update_records("deals", updates(1))[0].ok
    assert sleeps == [3.0]


def test_rate_limit_without_retry_after_waits_out_the_rolling_window(
    rsps: responses.RequestsMock, sleeps: list[float]
) -> None:
    rsps.add(responses.POST, UPDATE_URL, json=rate_limit_body(), status=429, headers=RATE_LIMIT_HEADERS)
    rsps.add(responses.POST, UPDATE_URL, json=batch_response([simple_object("1000", {})]))
    assert make_adapter(sleeps=sleeps).update_records("deals", updates(1))[0].ok
    assert sleeps == [10.0]  # X-HubSpot-RateLimit-Interval-Milliseconds: 10000


@pytest.mark.parametrize(("policy", "wait"), [("SECONDLY", 1.0), ("DAILY", None)])
def test_other_rate_limit_policies(rsps: responses.RequestsMock, policy: str, wait: float | None) -> None:
    rsps.add(responses.POST, UPDATE_URL, json=rate_limit_body(policy), status=429, headers=RATE_LIMIT_HEADERS)
    import requests

    error = rate_limited(requests.post(UPDATE_URL, timeout=1))
    assert isinstance(error, RateLimitedError)
    assert (error.code, error.retry_after) == (policy, wait)  # daily quota: no 10 s wait, back off instead


def test_server_errors_are_retried(rsps: responses.RequestsMock, sleeps: list[float]) -> None:
    rsps.add(responses.POST, UPDATE_URL, json=error_body("INTERNAL_ERROR", "internal error"), status=502)
    rsps.add(responses.POST, UPDATE_URL, json=batch_response([simple_object("1000", {})]))
    assert make_adapter(sleeps=sleeps).update_records("deals", updates(1))[0].ok
    assert len(sleeps) == 1


# --- adapter: reads -----------------------------------------------------------------------


def test_related_fields_come_from_the_primary_associated_record(rsps: responses.RequestsMock) -> None:
    records = {
        "1001": {"dealname": "Acme", "companies.credit_score": "712"},
        "1002": {"dealname": "Globex", "companies.credit_score": None},
    }
    mock_deals_with_companies(rsps, records)
    got = make_adapter().get_records(
        "deals", ["1001", "1002", "1404"], ["dealname", "companies.credit_score"]
    )
    assert got == {
        "1001": {"dealname": "Acme", "companies.credit_score": "712"},  # company 91001, labelled Primary
        "1002": {"dealname": "Globex", "companies.credit_score": None},  # no associated company
    }  # 1404 does not exist: absent
    deals, links, companies = (json_of(c.request) for c in rsps.calls)
    assert deals["properties"] == ["dealname"] and deals["inputs"] == [
        {"id": "1001"},
        {"id": "1002"},
        {"id": "1404"},
    ]
    assert links["inputs"] == [{"id": "1001"}, {"id": "1002"}]
    assert companies == {
        "properties": ["credit_score"],
        "propertiesWithHistory": [],
        "inputs": [{"id": "91001"}],
    }


def test_without_a_primary_label_the_first_association_is_used(rsps: responses.RequestsMock) -> None:
    rsps.add(
        responses.POST,
        f"{API}/crm/v3/objects/deals/batch/read",
        json=batch_response([simple_object("1001", {})]),
    )
    rsps.add(
        responses.POST,
        f"{API}/crm/v4/associations/deals/companies/batch/read",
        json=batch_response([association_result("1001", ["5005", "6006"])]),
    )
    rsps.add(
        responses.POST,
        f"{API}/crm/v3/objects/companies/batch/read",
        json=batch_response([simple_object("5005", {"name": "First Co"})]),
    )
    got = make_adapter().get_record("deals", "1001", ["companies.name"])
    assert got == {"companies.name": "First Co"}
    assert json_of(rsps.calls[2].request)["inputs"] == [{"id": "5005"}]


def test_related_fields_deeper_than_one_level_are_refused() -> None:
    with pytest.raises(FatalError, match="one level deep"):
        make_adapter().get_records("deals", ["1001"], ["companies.parent.name"])


def test_query_pages_through_search_with_eq_and_modified_since(rsps: responses.RequestsMock) -> None:
    page1 = {
        "total": 3,
        "results": [simple_object("1", {"dealstage": "won"}), simple_object("2", {"dealstage": "won"})],
        "paging": {"next": {"after": "2", "link": "?after=2"}},
    }
    page2 = {"total": 3, "results": [simple_object("3", {"dealstage": "won"})]}
    rsps.add(responses.POST, f"{API}/crm/v3/objects/deals/search", json=page1)
    rsps.add(responses.POST, f"{API}/crm/v3/objects/deals/search", json=page2)
    since = datetime(2026, 11, 1, tzinfo=UTC)
    got = list(
        make_adapter().query("deals", ["dealstage"], {"dealstage": "won", "pipeline": "default"}, since)
    )
    assert got == [
        {"id": "1", "dealstage": "won"},
        {"id": "2", "dealstage": "won"},
        {"id": "3", "dealstage": "won"},
    ]
    first, second = (json_of(c.request) for c in rsps.calls)
    assert first == {
        "filterGroups": [
            {
                "filters": [
                    {"propertyName": "dealstage", "operator": "EQ", "value": "won"},
                    {"propertyName": "pipeline", "operator": "EQ", "value": "default"},
                    {"propertyName": "hs_lastmodifieddate", "operator": "GTE", "value": "1793491200000"},
                ]
            }
        ],
        "properties": ["dealstage"],
        "limit": 100,
    }
    assert second["after"] == "2"


def test_contacts_are_searched_by_their_own_modified_date(rsps: responses.RequestsMock) -> None:
    rsps.add(responses.POST, f"{API}/crm/v3/objects/contacts/search", json={"total": 0, "results": []})
    list(make_adapter().query("contacts", ["email"], modified_since=datetime(2026, 11, 1, tzinfo=UTC)))
    [condition] = json_of(rsps.calls[0].request)["filterGroups"][0]["filters"]
    assert condition["propertyName"] == "lastmodifieddate"


def test_query_without_filters_sends_no_filter_group(rsps: responses.RequestsMock) -> None:
    rsps.add(responses.POST, f"{API}/crm/v3/objects/deals/search", json={"total": 0, "results": []})
    assert list(make_adapter().query("deals", ["dealname"])) == []
    assert json_of(rsps.calls[0].request) == {"properties": ["dealname"], "limit": 100}


def test_describe_reads_the_properties_api(rsps: responses.RequestsMock) -> None:
    properties = {
        "results": [
            {
                "name": "approval_status",
                "label": "Approval status",
                "type": "enumeration",
                "fieldType": "select",
                "groupName": "dealinformation",
                "options": [{"label": "Approved", "value": "approved"}],
                "modificationMetadata": {
                    "archivable": True,
                    "readOnlyDefinition": False,
                    "readOnlyValue": False,
                },
            },
            {
                "name": "hs_object_id",
                "label": "Record ID",
                "type": "number",
                "fieldType": "number",
                "modificationMetadata": {"readOnlyValue": True},
            },
            {
                "name": "days_to_close",
                "label": "Days to close",
                "type": "number",
                "fieldType": "calculation_equation",
                "calculated": True,
                "modificationMetadata": {"readOnlyValue": False},
            },
        ]
    }
    rsps.add(responses.GET, f"{API}/crm/v3/properties/deals", json=properties)
    fields = {f.name: f for f in make_adapter().describe("deals")}
    assert fields["approval_status"].updateable and fields["approval_status"].type == "enumeration"
    assert fields["approval_status"].extra["options"] == ["approved"]
    assert not fields["hs_object_id"].updateable
    assert not fields["days_to_close"].updateable
    # Associations are listed as relations, so `companies.credit_score` validates on a deal.
    assert fields["companies"].type == "association" and fields["companies"].reference_to == ("companies",)
    assert "deals" not in fields and not fields["contacts"].updateable


def test_the_shipped_deals_mapping_validates_against_describe(rsps: responses.RequestsMock) -> None:
    from connector.commands.validate import check_api_fields
    from connector.rules.loader import load_mapping_text

    names = [
        "dealname",
        "amount",
        "dealstage",
        "hubspot_owner_id",
        "owner_manager_id",
        "term_months",
        "product_lines",
        "closedate",
        "approval_status",
        "approval_expires_on",
        "approval_comment",
    ]
    rsps.add(responses.GET, f"{API}/crm/v3/properties/deals", json={"results": [{"name": n} for n in names]})
    adapter = make_adapter()
    item = load_mapping_text(
        (REPO / "mappings/examples/hubspot-deals.yaml").read_bytes(), "hubspot-deals.yaml"
    )
    assert check_api_fields(item, lambda _c, obj: [f.name for f in adapter.describe(obj)]) == []


# --- adapter: auth ------------------------------------------------------------------------


def test_private_app_token_cannot_be_renewed(rsps: responses.RequestsMock) -> None:
    body = error_body("INVALID_AUTHENTICATION", "Authentication credentials not found.")
    rsps.add(responses.POST, UPDATE_URL, json=body, status=401)
    adapter = make_adapter()
    assert adapter.refresh_auth() is False
    with pytest.raises(AuthError, match="cannot renew"):
        adapter.update_records("deals", updates(1))
    assert len(rsps.calls) == 1  # no token endpoint call


def test_oauth_without_an_access_token_fetches_one_first(rsps: responses.RequestsMock) -> None:
    rsps.add(responses.POST, f"{API}/oauth/v1/token", json=oauth_token_response())
    rsps.add(responses.POST, UPDATE_URL, json=batch_response([simple_object("1000", {})]))
    env = {k: v for k, v in OAUTH_ENV.items() if k != "HUBSPOT_ACCESS_TOKEN"}
    assert make_adapter(env).update_records("deals", updates(1))[0].ok
    token_call, update_call = rsps.calls
    assert (
        dict(p.split("=") for p in (token_call.request.body or "").split("&"))["grant_type"]
        == "refresh_token"
    )
    assert token_call.request.req_kwargs["timeout"] == 30.0  # type: ignore[attr-defined]
    assert update_call.request.headers["Authorization"] == f"Bearer {OAUTH_RENEWED_TOKEN}"


def test_oauth_token_is_renewed_before_it_expires(rsps: responses.RequestsMock) -> None:
    rsps.add(responses.POST, f"{API}/oauth/v1/token", json=oauth_token_response())
    rsps.add(responses.POST, UPDATE_URL, json=batch_response([simple_object("1000", {})]))
    adapter = make_adapter(OAUTH_ENV)
    assert adapter.oauth_tokens is not None
    # as if the 30-minute token had run out
    adapter.oauth_tokens.cached = AccessToken(OAUTH_ACCESS_TOKEN, expires_at=time.monotonic() - 1)
    assert adapter.update_records("deals", updates(1))[0].ok
    assert rsps.calls[1].request.headers["Authorization"] == f"Bearer {OAUTH_RENEWED_TOKEN}"


def test_a_refused_refresh_token_is_a_clear_auth_error(rsps: responses.RequestsMock) -> None:
    body = {
        "status": "BAD_REFRESH_TOKEN",
        "message": "missing or unknown refresh token",
        "correlationId": "b7f5b5a1-8f3e-4c63-9d6b-3c1f0e2a9d11",
    }
    rsps.add(responses.POST, f"{API}/oauth/v1/token", json=body, status=400)
    with pytest.raises(AuthError) as excinfo:
        make_adapter(OAUTH_ENV).refresh_auth()
    assert "HUBSPOT_REFRESH_TOKEN" in str(excinfo.value) and "unknown refresh token" in str(excinfo.value)
    assert CLIENT_SECRET not in str(excinfo.value)


@pytest.mark.parametrize(
    ("env", "missing"),
    [
        ({"CRM_CONNECTIONS": "hubspot"}, "HUBSPOT_ACCESS_TOKEN"),
        ({"CRM_CONNECTIONS": "hubspot", "HUBSPOT_REFRESH_TOKEN": "r"}, "HUBSPOT_CLIENT_ID"),
    ],
)
def test_missing_credentials_are_named(env: dict[str, str], missing: str) -> None:
    with pytest.raises(ConfigError, match=missing):
        make_adapter(env)


# --- echo detection -----------------------------------------------------------------------


def event_from(origin: str | None) -> RecordChangeEvent:
    return RecordChangeEvent(
        source="hubspot",
        connection="hubspot",
        object_type="deals",
        record_id="1001",
        event_id="1",
        occurred_at=datetime.now(UTC),
        dedupe_key="k",
        origin=origin,
    )


@pytest.mark.parametrize(
    ("origin", "own"),
    [
        (f"INTEGRATION:{APP_ID}", True),
        ("INTEGRATION:1234", False),  # another app's write
        ("CRM_UI:userId:882761034", False),
        ("AUTOMATION_PLATFORM:12345", False),
        ("MIXED", False),
        (None, None),
    ],
)
def test_is_own_change_reads_change_source_and_app_id(origin: str | None, own: bool | None) -> None:
    assert make_adapter().is_own_change(event_from(origin)) is own


def test_without_app_id_an_integration_write_cannot_be_attributed() -> None:
    env = {k: v for k, v in PRIVATE_APP_ENV.items() if k != "HUBSPOT_APP_ID"}
    assert make_adapter(env).is_own_change(event_from(f"INTEGRATION:{APP_ID}")) is None
    assert make_adapter(env).is_own_change(event_from("CRM_UI:userId:1")) is False


def test_our_own_write_back_is_recognised_end_to_end(client: FlaskClient, hubspot_runtime: Runtime) -> None:
    echo = hubspot_event(
        1001,
        41,
        propertyName="approval_status",
        propertyValue="approved",
        changeSource="INTEGRATION",
        sourceId=APP_ID,
    )
    assert post(client, [echo]).status_code == 202
    [row] = inbox(hubspot_runtime)
    assert make_adapter().is_own_change(RecordChangeEvent.from_row(row)) is True


def test_values_are_sent_as_hubspot_strings() -> None:
    assert to_hubspot_value(False) == "false"
    assert to_hubspot_value(datetime(2026, 11, 23, 10, 0)) == "1795428000000"  # naive = UTC
    assert to_hubspot_value(12) == "12"
