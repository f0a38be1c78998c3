"""Bitrix24: the form-encoded intake and the adapter, against the documented wire formats
(the fake portal and constants live in tests/contract/harness_bitrix24.py)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
import requests
import responses
from flask.testing import FlaskClient
from sqlalchemy import select

from connector.config import ConfigError, parse_connections
from connector.crm.base import RecordUpdate
from connector.crm.bitrix24 import Bitrix24Adapter, batch_command, php_pairs
from connector.crm.errors import AuthError, FatalError, RateLimitedError, RetriableError
from connector.crm.retry import RetryPolicy
from connector.events import RecordChangeEvent
from connector.runtime import Runtime
from connector.storage.models import InboxEvent
from tests.contract.harness_bitrix24 import (
    ACCESS_TOKEN,
    APPLICATION_TOKEN,
    CLIENT_SECRET,
    EXPIRED,
    FORM_HEADERS,
    NOT_FOUND_CLASSIC,
    OAUTH_ENV,
    OPERATION_TIME_LIMIT,
    PORTAL,
    QUERY_LIMIT,
    REFRESH_TOKEN,
    REST,
    TIME,
    TOKEN_URL,
    WEBHOOK_CODE,
    WEBHOOK_ENV,
    WEBHOOK_URL,
    FakePortal,
    batch_commands,
    event_form,
    form_of,
    register_token_endpoint,
)

# --- intake ------------------------------------------------------------------------------


@pytest.fixture
def make_client(
    settings_factory: Any, runtime_factory: Any, app_factory: Any
) -> Callable[..., tuple[Runtime, FlaskClient]]:
    def make(**env: str) -> tuple[Runtime, FlaskClient]:
        runtime = runtime_factory(settings_factory(env={**WEBHOOK_ENV, **env}))
        return runtime, app_factory(runtime).test_client()

    return make


@pytest.fixture
def setup(make_client: Callable[..., tuple[Runtime, FlaskClient]]) -> tuple[Runtime, FlaskClient]:
    return make_client()


def post(
    client: FlaskClient, body: bytes, content_type: str = FORM_HEADERS["Content-Type"], path: str = ""
) -> Any:
    return client.post(f"/webhooks/bitrix24{path}", data=body, headers={"Content-Type": content_type})


def rows(runtime: Runtime) -> list[InboxEvent]:
    with runtime.sessions() as session:
        return list(session.scalars(select(InboxEvent).order_by(InboxEvent.id)))


def test_deal_update_becomes_an_id_only_event(setup: tuple[Runtime, FlaskClient]) -> None:
    runtime, client = setup
    ts = int(time.time())
    response = post(client, event_form("759", ts))
    assert response.status_code == 200, response.get_json()
    assert response.get_json() == {"accepted": 1, "duplicates": 0}
    [row] = rows(runtime)
    assert (row.source, row.connection, row.object_type, row.record_id) == (
        "bitrix24",
        "bitrix24",
        "deal",
        "759",
    )
    assert (row.change_type, row.values, row.changed_fields, row.origin) == ("updated", None, [], None)
    assert row.dedupe_key == f"bitrix24:ONCRMDEALUPDATE:deal:759:{ts}"
    assert row.occurred_at.replace(tzinfo=UTC) == datetime.fromtimestamp(ts, UTC)


def test_company_add_is_a_created_company_event(setup: tuple[Runtime, FlaskClient]) -> None:
    runtime, client = setup
    assert post(client, event_form("12", int(time.time()), event="ONCRMCOMPANYADD")).status_code == 200
    [row] = rows(runtime)
    assert (row.object_type, row.record_id, row.change_type) == ("company", "12", "created")


def test_company_update_event_name_is_case_insensitive(setup: tuple[Runtime, FlaskClient]) -> None:
    runtime, client = setup
    assert post(client, event_form("12", int(time.time()), event="onCrmCompanyUpdate")).status_code == 200
    assert [(r.object_type, r.change_type) for r in rows(runtime)] == [("company", "updated")]


def test_smart_process_event_is_named_by_its_entity_type(setup: tuple[Runtime, FlaskClient]) -> None:
    runtime, client = setup
    body = event_form(
        "24", int(time.time()), event="ONCRMDYNAMICITEMUPDATE", extra={"data[FIELDS][ENTITY_TYPE_ID]": "1220"}
    )
    assert post(client, body).status_code == 200
    [row] = rows(runtime)
    assert (row.object_type, row.record_id) == ("dynamic_1220", "24")
    assert row.dedupe_key.startswith("bitrix24:ONCRMDYNAMICITEMUPDATE:dynamic_1220:24:")


def test_smart_process_must_be_accepted_by_objects(make_client: Any) -> None:
    runtime, client = make_client(BITRIX24_OBJECTS="deal,dynamic_1032")
    ts = int(time.time())
    item = {"data[FIELDS][ENTITY_TYPE_ID]": "1220"}
    refused = post(client, event_form("24", ts, event="ONCRMDYNAMICITEMADD", extra=item))
    assert refused.status_code == 422
    assert refused.get_json()["error"]["code"] == "unknown_object"
    listed = post(
        client,
        event_form("24", ts, event="ONCRMDYNAMICITEMADD", extra={"data[FIELDS][ENTITY_TYPE_ID]": "1032"}),
    )
    assert listed.status_code == 200
    assert [r.object_type for r in rows(runtime)] == ["dynamic_1032"]


def test_redelivery_is_acknowledged_and_dropped(setup: tuple[Runtime, FlaskClient]) -> None:
    runtime, client = setup
    ts = int(time.time())
    assert post(client, event_form("759", ts)).get_json() == {"accepted": 1, "duplicates": 0}
    again = post(client, event_form("759", ts))
    assert (again.status_code, again.get_json()) == (200, {"accepted": 0, "duplicates": 1})
    assert post(client, event_form("759", ts + 1)).get_json()["accepted"] == 1  # a later change
    assert len(rows(runtime)) == 2


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"token": "0" * 32}, 403, "bad_token"),
        ({"token": APPLICATION_TOKEN[:-1]}, 403, "bad_token"),
        ({"token": ""}, 401, "missing_token"),
        ({"ts_shift": -301}, 401, "stale_timestamp"),
        ({"ts_shift": 301}, 401, "stale_timestamp"),
    ],
)
def test_forged_or_stale_deliveries_are_refused(
    setup: tuple[Runtime, FlaskClient], kwargs: dict[str, Any], status: int, code: str
) -> None:
    runtime, client = setup
    shift = kwargs.pop("ts_shift", 0)
    response = post(client, event_form("759", int(time.time()) + shift, **kwargs))
    assert response.status_code == status, response.get_json()
    assert response.get_json()["error"]["code"] == code
    assert rows(runtime) == []


def test_any_of_several_application_tokens_is_accepted(make_client: Any) -> None:
    runtime, client = make_client(BITRIX24_APPLICATION_TOKEN=f"othertoken123, {APPLICATION_TOKEN}")
    assert post(client, event_form("759", int(time.time()))).status_code == 200
    assert len(rows(runtime)) == 1


def test_event_from_another_portal_is_refused_when_domain_is_set(make_client: Any) -> None:
    runtime, client = make_client(BITRIX24_DOMAIN=f"https://{PORTAL}/")
    response = post(client, event_form("759", int(time.time()), domain="evil.bitrix24.com"))
    assert response.status_code == 403
    assert response.get_json()["error"]["code"] == "wrong_portal"
    assert post(client, event_form("759", int(time.time()))).status_code == 200
    assert len(rows(runtime)) == 1


def test_unknown_event_is_422_listing_the_supported_ones(setup: tuple[Runtime, FlaskClient]) -> None:
    runtime, client = setup
    response = post(client, event_form("759", int(time.time()), event="ONCRMLEADUPDATE"))
    assert response.status_code == 422
    error = response.get_json()["error"]
    assert error["code"] == "unsupported_event"
    assert "ONCRMDEALUPDATE" in error["hint"] and "ONCRMDYNAMICITEMUPDATE" in error["hint"]
    assert rows(runtime) == []


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        (b'{"event": "ONCRMDEALUPDATE"}', "application/json", 415, "unsupported_content_type"),
        (b"event=ONCRMDEALUPDATE", None, 401, "missing_token"),
        (None, None, 400, "bad_payload"),  # data[FIELDS][ID] missing
        ("abc", None, 400, "bad_payload"),  # data[FIELDS][ID] not a number
        ("0", None, 400, "bad_payload"),
        ("item-no-type", None, 400, "bad_payload"),  # dynamic item without ENTITY_TYPE_ID
        (b"\xff\xfe garbage", None, 401, "missing_token"),
    ],
)
def test_bad_input_gets_a_clear_4xx_and_writes_nothing(
    setup: tuple[Runtime, FlaskClient], body: Any, content_type: str | None, status: int, code: str
) -> None:
    runtime, client = setup
    ts = int(time.time())
    if body is None:
        body = event_form("759", ts).replace(b"data%5BFIELDS%5D%5BID%5D=759&", b"")
    elif body == "item-no-type":
        body = event_form("24", ts, event="ONCRMDYNAMICITEMUPDATE")
    elif isinstance(body, str):
        body = event_form(body, ts)
    response = post(client, body, content_type or FORM_HEADERS["Content-Type"])
    assert response.status_code == status, response.get_json()
    error = response.get_json()["error"]
    assert (error["code"], bool(error["message"])) == (code, True)
    assert rows(runtime) == []


def test_unknown_connection_is_404(setup: tuple[Runtime, FlaskClient]) -> None:
    _runtime, client = setup
    response = post(client, event_form("759", int(time.time())), path="?connection=nope")
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "unknown_connection"


def test_missing_application_token_setting_is_reported_not_accepted(make_client: Any) -> None:
    runtime, client = make_client(BITRIX24_APPLICATION_TOKEN="")
    response = post(client, event_form("759", int(time.time())))
    assert response.status_code == 503
    assert "BITRIX24_APPLICATION_TOKEN" in response.get_json()["error"]["message"]
    assert rows(runtime) == []


def test_rejections_never_echo_or_log_the_token(
    setup: tuple[Runtime, FlaskClient], caplog: pytest.LogCaptureFixture
) -> None:
    _runtime, client = setup
    caplog.set_level(logging.INFO)
    forged = "f0rg3dt0k3nv4lu3"
    response = post(client, event_form("759", int(time.time()), token=forged))
    assert response.status_code == 403
    assert "bad_token" in caplog.text
    for secret in (forged, APPLICATION_TOKEN):
        assert secret not in caplog.text and secret not in response.get_data(as_text=True)


# --- adapter ------------------------------------------------------------------------------


@pytest.fixture
def sleeps() -> list[float]:
    return []


def make_adapter(
    env: dict[str, str], sleeps: list[float] | None = None, attempts: int = 3
) -> Bitrix24Adapter:
    connection = parse_connections(env)["bitrix24"]
    waits = sleeps if sleeps is not None else []
    return Bitrix24Adapter(connection, timeout=5, retry=RetryPolicy(attempts=attempts, sleep=waits.append))


def webhook_portal(rsps: responses.RequestsMock, **kwargs: Any) -> FakePortal:
    portal = FakePortal(base=WEBHOOK_URL, **kwargs)
    portal.register(rsps)
    return portal


def test_updates_go_in_batches_of_50_commands(sleeps: list[float]) -> None:
    ids = [str(2000 + i) for i in range(120)]
    with responses.RequestsMock() as rsps:
        portal = webhook_portal(rsps)
        results = make_adapter(WEBHOOK_ENV, sleeps).update_records(
            "deal", [RecordUpdate(i, {"UF_CRM_STATUS": "Pending"}) for i in ids]
        )
    assert [len(call) for call in portal.batch_log.calls] == [50, 50, 20]
    assert [r.record_id for r in results] == ids and all(r.ok for r in results)
    assert portal.http_calls == ["batch", "batch", "batch"]
    method, record_id, fields = portal.updates[0]
    assert (method, record_id, fields) == ("crm.deal.update", "2000", {"UF_CRM_STATUS": "Pending"})


def test_batch_command_is_the_documented_double_encoded_form() -> None:
    command = batch_command(
        "crm.deal.update",
        {"id": "7", "fields": {"TITLE": "R&D = yes?"}, "params": {"REGISTER_SONET_EVENT": "N"}},
    )
    assert command == (
        "crm.deal.update?id=7&fields%5BTITLE%5D=R%26D+%3D+yes%3F&params%5BREGISTER_SONET_EVENT%5D=N"
    )
    assert php_pairs({"select": ["ID", "TITLE"], "flag": True, "empty": None}) == [
        ("select[0]", "ID"),
        ("select[1]", "TITLE"),
        ("flag", "Y"),
        ("empty", ""),
    ]


def test_awkward_values_reach_the_portal_intact(sleeps: list[float]) -> None:
    with responses.RequestsMock() as rsps:
        portal = webhook_portal(rsps)
        make_adapter(WEBHOOK_ENV, sleeps).update_records(
            "company",
            [RecordUpdate("5", {"UF_CRM_NOTE": "R&D = 100% ?x=1", "UF_CRM_UNTIL": datetime(2027, 5, 1)})],
        )
    [form] = portal.forms
    assert form["halt"] == "0"
    [(method, params)] = batch_commands(form).values()
    assert method == "crm.company.update"
    assert params["params[REGISTER_SONET_EVENT]"] == "N"
    assert portal.updates == [
        ("crm.company.update", "5", {"UF_CRM_NOTE": "R&D = 100% ?x=1", "UF_CRM_UNTIL": "2027-05-01T00:00:00"})
    ]


def test_per_command_results_map_back_to_their_records(sleeps: list[float]) -> None:
    errors = {
        "11": NOT_FOUND_CLASSIC,
        "12": {"error": "", "error_description": "Invalid value for field UF_CRM_STATUS"},
        "14": OPERATION_TIME_LIMIT,
    }
    ids = ["10", "11", "12", "13", "14"]
    with responses.RequestsMock() as rsps:
        webhook_portal(rsps, update_errors=errors)
        results = make_adapter(WEBHOOK_ENV, sleeps).update_records(
            "deal", [RecordUpdate(i, {"UF_CRM_STATUS": "Approved"}) for i in ids]
        )
    by_id = {r.record_id: r for r in results}
    assert [by_id[i].ok for i in ids] == [True, False, False, True, False]
    assert (by_id["11"].error_code, by_id["11"].message, by_id["11"].retriable) == (None, "Not found", False)
    assert by_id["12"].fields == ("UF_CRM_STATUS",)  # the field Bitrix named in its message
    assert (by_id["14"].error_code, by_id["14"].retriable) == ("OPERATION_TIME_LIMIT", True)
    assert by_id["14"].message == "Method is blocked due to operation time limit"


def test_smart_process_updates_use_crm_item_update(sleeps: list[float]) -> None:
    with responses.RequestsMock() as rsps:
        portal = webhook_portal(rsps)
        [result] = make_adapter(WEBHOOK_ENV, sleeps).update_records(
            "dynamic_1032", [RecordUpdate("24", {"ufCrm5_Status": "Approved"})]
        )
    assert result.ok
    [(method, params)] = batch_commands(portal.forms[0]).values()
    assert (method, params["entityTypeId"], params["id"]) == ("crm.item.update", "1032", "24")
    assert "params[REGISTER_SONET_EVENT]" not in params


def test_related_fields_are_not_written(sleeps: list[float]) -> None:
    with responses.RequestsMock() as rsps:
        portal = webhook_portal(rsps)
        results = make_adapter(WEBHOOK_ENV, sleeps).update_records(
            "deal", [RecordUpdate("1", {"COMPANY_ID.UF_CRM_SCORE": 5}), RecordUpdate("2", {"TITLE": "x"})]
        )
    assert (results[0].ok, results[0].error_code, results[0].fields) == (
        False,
        "related_field_not_writable",
        ("COMPANY_ID.UF_CRM_SCORE",),
    )
    assert results[1].ok and portal.batch_log.calls == [["2"]]


def test_query_limit_exceeded_is_retried_with_policy_backoff(sleeps: list[float]) -> None:
    with responses.RequestsMock() as rsps:
        portal = webhook_portal(rsps, outages=[(503, QUERY_LIMIT)])
        [result] = make_adapter(WEBHOOK_ENV, sleeps).update_records(
            "deal", [RecordUpdate("1", {"TITLE": "x"})]
        )
    assert result.ok
    assert portal.http_calls == ["batch", "batch"]
    assert (
        len(sleeps) == 1 and 0 <= sleeps[0] <= RetryPolicy().max_wait
    )  # no Retry-After: exponential backoff


def test_rate_limits_give_up_as_retriable_errors(sleeps: list[float]) -> None:
    with responses.RequestsMock() as rsps:
        webhook_portal(rsps, outages=[(503, QUERY_LIMIT)] * 2)
        with pytest.raises(RateLimitedError) as caught:
            make_adapter(WEBHOOK_ENV, sleeps, attempts=2).update_records(
                "deal", [RecordUpdate("1", {"A": 1})]
            )
    assert (caught.value.code, caught.value.status) == ("QUERY_LIMIT_EXCEEDED", 503)
    assert len(sleeps) == 1


def test_operation_time_limit_429_and_5xx_are_retriable(sleeps: list[float]) -> None:
    outages = [
        (429, OPERATION_TIME_LIMIT),
        (500, {"error": "INTERNAL_SERVER_ERROR", "error_description": "x"}),
    ]
    with responses.RequestsMock() as rsps:
        portal = webhook_portal(rsps, outages=outages)
        [result] = make_adapter(WEBHOOK_ENV, sleeps).update_records("deal", [RecordUpdate("1", {"A": 1})])
    assert result.ok and len(portal.http_calls) == 3 and len(sleeps) == 2


def test_access_denied_is_fatal_and_not_retried(sleeps: list[float]) -> None:
    with responses.RequestsMock() as rsps:
        webhook_portal(
            rsps, outages=[(403, {"error": "ACCESS_DENIED", "error_description": "Access denied!"})]
        )
        with pytest.raises(FatalError) as caught:
            make_adapter(WEBHOOK_ENV, sleeps).update_records("deal", [RecordUpdate("1", {"A": 1})])
    assert (caught.value.code, caught.value.message) == ("ACCESS_DENIED", "Access denied!")
    assert sleeps == []


def test_expired_oauth_token_is_renewed_and_the_new_refresh_token_kept(sleeps: list[float]) -> None:
    with responses.RequestsMock() as rsps:
        portal = FakePortal(access_token="access-2")
        portal.register(rsps)
        register_token_endpoint(rsps, REFRESH_TOKEN, "access-2", "refresh-2")
        register_token_endpoint(rsps, "refresh-2", "access-3", "refresh-3")
        adapter = make_adapter(OAUTH_ENV, sleeps)
        assert adapter.update_records("deal", [RecordUpdate("1", {"A": 1})])[0].ok
        portal.access_token = "access-3"  # expires again: the rotated refresh token must be used
        assert adapter.update_records("deal", [RecordUpdate("1", {"A": 2})])[0].ok
    assert [f.get("auth") for f in portal.forms] == [ACCESS_TOKEN, "access-2", "access-2", "access-3"]
    assert sleeps == []


def test_oauth_without_access_token_renews_before_the_first_call(sleeps: list[float]) -> None:
    env = {k: v for k, v in OAUTH_ENV.items() if k != "BITRIX24_ACCESS_TOKEN"}
    with responses.RequestsMock() as rsps:
        portal = FakePortal(access_token="access-2", records={"deal": {"7": {"TITLE": "Seven"}}})
        portal.register(rsps)
        register_token_endpoint(rsps, REFRESH_TOKEN, "access-2", "refresh-2")
        assert make_adapter(env, sleeps).get_record("deal", "7", ["TITLE"]) == {"TITLE": "Seven"}
    assert [f["auth"] for f in portal.forms] == ["access-2"]


def test_refused_token_renewal_is_fatal_and_hides_the_secrets(sleeps: list[float]) -> None:
    with responses.RequestsMock() as rsps:
        rsps.add(responses.POST, REST + "batch", status=401, json=EXPIRED)
        rsps.add(
            responses.GET,
            TOKEN_URL,
            status=400,
            json={"error": "invalid_grant", "error_description": "Invalid refresh token"},
        )
        with pytest.raises(AuthError) as caught:
            make_adapter(OAUTH_ENV, sleeps).update_records("deal", [RecordUpdate("1", {"A": 1})])
    assert caught.value.code == "invalid_grant"
    assert "Invalid refresh token" in str(caught.value)
    for secret in (CLIENT_SECRET, REFRESH_TOKEN, ACCESS_TOKEN):
        assert secret not in str(caught.value)


def test_webhook_url_cannot_be_renewed(sleeps: list[float]) -> None:
    with responses.RequestsMock() as rsps:
        webhook_portal(rsps, outages=[(401, EXPIRED)])
        adapter = make_adapter(WEBHOOK_ENV, sleeps)
        assert adapter.refresh_auth() is False
        with pytest.raises(AuthError, match="cannot renew"):
            adapter.update_records("deal", [RecordUpdate("1", {"A": 1})])


def test_wrong_webhook_credentials_are_fatal_without_renewal(sleeps: list[float]) -> None:
    body = {"error": "INVALID_CREDENTIALS", "error_description": "Invalid request credentials"}
    with responses.RequestsMock() as rsps:
        webhook_portal(rsps, outages=[(401, body)])
        with pytest.raises(AuthError) as caught:
            make_adapter(WEBHOOK_ENV, sleeps).update_records("deal", [RecordUpdate("1", {"A": 1})])
    assert caught.value.code == "INVALID_CREDENTIALS" and sleeps == []


def test_webhook_secret_is_masked_in_network_errors(sleeps: list[float]) -> None:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.add(
            responses.POST,
            WEBHOOK_URL + "batch",
            body=requests.ConnectionError(f"Max retries exceeded with url: /rest/1/{WEBHOOK_CODE}/batch"),
        )
        with pytest.raises(RetriableError) as caught:
            make_adapter(WEBHOOK_ENV, sleeps, attempts=1).update_records(
                "deal", [RecordUpdate("1", {"A": 1})]
            )
    error = caught.value
    assert WEBHOOK_CODE not in str(error) and WEBHOOK_CODE not in repr(error.args)
    assert WEBHOOK_CODE not in repr(make_adapter(WEBHOOK_ENV).auth)
    assert f"https://{PORTAL}/rest/1/***/batch" in str(error)
    assert error.__cause__ is None and error.__context__ is None and error.__suppress_context__


def test_malformed_webhook_url_is_a_config_error_that_hides_it() -> None:
    env = {**WEBHOOK_ENV, "BITRIX24_WEBHOOK_URL": f"http://{PORTAL}/rest/{WEBHOOK_CODE}/"}
    with pytest.raises(ConfigError) as caught:
        make_adapter(env)
    assert "BITRIX24_WEBHOOK_URL" in str(caught.value) and WEBHOOK_CODE not in str(caught.value)


def test_oauth_mode_names_the_missing_variable() -> None:
    with pytest.raises(ConfigError, match="BITRIX24_CLIENT_SECRET"):
        make_adapter({k: v for k, v in OAUTH_ENV.items() if k != "BITRIX24_CLIENT_SECRET"})


def test_one_record_is_read_with_crm_deal_get(sleeps: list[float]) -> None:
    deal = {"TITLE": "Acme", "OPPORTUNITY": "150000.00", "COMPANY_ID": "0"}
    with responses.RequestsMock() as rsps:
        portal = webhook_portal(rsps, records={"deal": {"7": deal}})
        adapter = make_adapter(WEBHOOK_ENV, sleeps)
        assert adapter.get_record("deal", "7", ["TITLE", "OPPORTUNITY", "COMPANY_ID.UF_CRM_SCORE"]) == {
            "TITLE": "Acme",
            "OPPORTUNITY": "150000.00",
            "COMPANY_ID.UF_CRM_SCORE": None,
        }
        assert (
            adapter.get_record("deal", "8", ["TITLE"]) is None
        )  # 400 {"error": "", "error_description": "Not found"}
    assert portal.http_calls == ["crm.deal.get", "crm.deal.get"]
    assert portal.forms[0] == {"id": "7"}


def test_many_records_and_their_company_fields_are_read_in_batches(sleeps: list[float]) -> None:
    records = {
        "deal": {
            "1": {"TITLE": "A", "COMPANY_ID": "77"},
            "2": {"TITLE": "B", "COMPANY_ID": "78"},
            "3": {"TITLE": "C", "COMPANY_ID": "77"},
        },
        "company": {"77": {"UF_CRM_CREDIT_SCORE": "720"}, "78": {"UF_CRM_CREDIT_SCORE": "610"}},
    }
    with responses.RequestsMock() as rsps:
        portal = webhook_portal(rsps, records=records)
        got = make_adapter(WEBHOOK_ENV, sleeps).get_records(
            "deal", ["1", "2", "3", "404"], ["TITLE", "COMPANY_ID.UF_CRM_CREDIT_SCORE"]
        )
    assert got == {
        "1": {"TITLE": "A", "COMPANY_ID.UF_CRM_CREDIT_SCORE": "720"},
        "2": {"TITLE": "B", "COMPANY_ID.UF_CRM_CREDIT_SCORE": "610"},
        "3": {"TITLE": "C", "COMPANY_ID.UF_CRM_CREDIT_SCORE": "720"},
    }
    assert portal.http_calls == ["batch", "batch"]  # deals, then the two distinct companies
    assert [m for m, _ in batch_commands(portal.forms[1]).values()] == ["crm.company.get"] * 2


def test_unsupported_related_field_is_a_clear_fatal_error(sleeps: list[float]) -> None:
    with pytest.raises(FatalError, match="COMPANY_ID.<field>"):
        make_adapter(WEBHOOK_ENV, sleeps).get_record("deal", "1", ["ASSIGNED_BY_ID.NAME"])


def test_unknown_object_is_a_clear_fatal_error(sleeps: list[float]) -> None:
    with pytest.raises(FatalError, match="dynamic_<entityTypeId>"):
        make_adapter(WEBHOOK_ENV, sleeps).get_record("invoice", "1", [])


def test_smart_process_record_is_read_with_crm_item_get(sleeps: list[float]) -> None:
    with responses.RequestsMock() as rsps:
        portal = webhook_portal(rsps, records={"dynamic_1032": {"24": {"title": "Item", "companyId": 0}}})
        assert make_adapter(WEBHOOK_ENV, sleeps).get_record("dynamic_1032", "24", ["title"]) == {
            "title": "Item"
        }
    assert (portal.http_calls, portal.forms[0]) == (["crm.item.get"], {"entityTypeId": "1032", "id": "24"})


def test_query_pages_through_crm_deal_list_with_modified_since(sleeps: list[float]) -> None:
    page_one = {
        "result": [{"ID": str(i), "TITLE": f"D{i}"} for i in range(1, 51)],
        "next": 50,
        "total": 52,
        "time": TIME,
    }
    page_two = {
        "result": [{"ID": "51", "TITLE": "D51"}, {"ID": "52", "TITLE": "D52"}],
        "total": 52,
        "time": TIME,
    }
    with responses.RequestsMock() as rsps:
        rsps.add(responses.POST, WEBHOOK_URL + "crm.deal.list", json=page_one)
        rsps.add(responses.POST, WEBHOOK_URL + "crm.deal.list", json=page_two)
        found = list(
            make_adapter(WEBHOOK_ENV, sleeps).query(
                "deal",
                ["TITLE"],
                {"STAGE_ID": "NEW"},
                modified_since=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
            )
        )
        forms = [form_of(call.request.body) for call in rsps.calls]
    assert [r["ID"] for r in found] == [str(i) for i in range(1, 53)]
    assert found[0] == {"ID": "1", "TITLE": "D1"}
    assert forms[0]["filter[>=DATE_MODIFY]"] == "2026-01-02T03:04:05+00:00"
    assert forms[0]["filter[STAGE_ID]"] == "NEW"
    assert (forms[0]["select[0]"], forms[0]["select[1]"], forms[0]["start"]) == ("ID", "TITLE", "0")
    assert (forms[0]["order[ID]"], forms[1]["start"]) == ("ASC", "50")


def test_query_of_smart_process_uses_crm_item_list(sleeps: list[float]) -> None:
    body = {"result": {"items": [{"id": 24, "title": "Item"}]}, "total": 1, "time": TIME}
    with responses.RequestsMock() as rsps:
        rsps.add(responses.POST, WEBHOOK_URL + "crm.item.list", json=body)
        found = list(
            make_adapter(WEBHOOK_ENV, sleeps).query(
                "dynamic_1032", ["title"], modified_since=datetime(2026, 1, 1, tzinfo=UTC)
            )
        )
        form = form_of(rsps.calls[0].request.body)
    assert found == [{"id": "24", "title": "Item"}]
    assert (form["entityTypeId"], form["filter[>=updatedTime]"]) == ("1032", "2026-01-01T00:00:00+00:00")


def test_describe_reads_crm_deal_fields(sleeps: list[float]) -> None:
    fields = {
        "ID": {
            "type": "integer",
            "isRequired": False,
            "isReadOnly": True,
            "isMultiple": False,
            "title": "ID",
        },
        "COMPANY_ID": {
            "type": "crm_company",
            "isRequired": False,
            "isReadOnly": False,
            "isMultiple": False,
            "title": "Company",
            "settings": {"parentEntityTypeId": 4},
        },
        "UF_CRM_1725365197310": {
            "type": "enumeration",
            "isRequired": False,
            "isReadOnly": False,
            "isMultiple": False,
            "title": "UF_CRM_1725365197310",
            "listLabel": "Status",
            "formLabel": "Approval status",
            "items": [{"ID": "45", "VALUE": "Pending"}],
        },
    }
    with responses.RequestsMock() as rsps:
        rsps.add(responses.POST, WEBHOOK_URL + "crm.deal.fields", json={"result": fields, "time": TIME})
        info = {f.name: f for f in make_adapter(WEBHOOK_ENV, sleeps).describe("deal")}
    assert not info["ID"].updateable
    assert (info["COMPANY_ID"].reference_to, info["COMPANY_ID"].relationship_name) == (
        ("company",),
        "COMPANY_ID",
    )
    status = info["UF_CRM_1725365197310"]
    assert (status.label, status.type, status.updateable) == ("Approval status", "enumeration", True)
    assert status.extra["items"] == [{"ID": "45", "VALUE": "Pending"}]


def test_describe_of_smart_process_reads_crm_item_fields(sleeps: list[float]) -> None:
    body = {
        "result": {
            "fields": {
                "title": {"type": "string", "isReadOnly": False, "title": "Name", "upperName": "TITLE"}
            }
        },
        "time": TIME,
    }
    with responses.RequestsMock() as rsps:
        rsps.add(responses.POST, WEBHOOK_URL + "crm.item.fields", json=body)
        [title] = make_adapter(WEBHOOK_ENV, sleeps).describe("dynamic_1032")
        assert form_of(rsps.calls[0].request.body) == {"entityTypeId": "1032"}
    assert (title.name, title.label) == ("title", "Name")


# --- echo prevention ------------------------------------------------------------------------


def deal_event(ts: int, object_type: str = "deal", record_id: str = "7") -> RecordChangeEvent:
    return RecordChangeEvent(
        source="bitrix24",
        connection="bitrix24",
        object_type=object_type,
        record_id=record_id,
        event_id="e",
        occurred_at=datetime.fromtimestamp(ts, UTC),
        dedupe_key="k",
    )


@pytest.mark.parametrize(
    ("modified_by", "modified_offset", "verdict"),
    [
        ("1", 0, True),  # the webhook's own user (user id 1 in the URL) made the last change
        ("1", -60, True),
        ("5", 0, False),  # somebody else did
        ("1", 120, None),  # changed again after the event was sent: cannot tell
    ],
)
def test_is_own_change_compares_the_last_modifier_with_our_api_user(
    sleeps: list[float], modified_by: str, modified_offset: int, verdict: bool | None
) -> None:
    ts = 1_767_225_600
    modified = datetime.fromtimestamp(ts + modified_offset, UTC).isoformat()
    deal = {"MODIFY_BY_ID": modified_by, "DATE_MODIFY": modified}
    with responses.RequestsMock() as rsps:
        webhook_portal(rsps, records={"deal": {"7": deal}})
        assert make_adapter(WEBHOOK_ENV, sleeps).is_own_change(deal_event(ts)) is verdict


def test_is_own_change_reads_updated_by_for_smart_processes(sleeps: list[float]) -> None:
    ts = 1_767_225_600
    item = {"updatedBy": 9, "updatedTime": "2026-01-01T01:00:00+01:00"}
    env = {**WEBHOOK_ENV, "BITRIX24_API_USER_ID": "9"}
    with responses.RequestsMock() as rsps:
        webhook_portal(rsps, records={"dynamic_1032": {"24": item}})
        assert make_adapter(env, sleeps).is_own_change(deal_event(ts, "dynamic_1032", "24")) is True


def test_is_own_change_is_unknown_without_an_api_user_or_a_record(sleeps: list[float]) -> None:
    assert make_adapter(OAUTH_ENV, sleeps).is_own_change(deal_event(1_767_225_600)) is None  # no API_USER_ID
    with responses.RequestsMock() as rsps:
        webhook_portal(rsps)
        assert make_adapter(WEBHOOK_ENV, sleeps).is_own_change(deal_event(1_767_225_600)) is None
