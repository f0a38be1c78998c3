"""Regression tests for each cause of a 500 the fuzzing of issue 8 found, and for the smaller
hardening items: every one is now a clear 4xx (or a 503 for a configuration problem) that
writes nothing, on SQLite and, where the database matters, on PostgreSQL."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as StdET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import create_engine, func, select, text
from werkzeug.serving import make_server

from connector.config import Settings
from connector.crm.salesforce_ids import id_spellings, normalize_salesforce_id, salesforce_id_problem
from connector.events import RecordChangeEvent, parse_timestamp
from connector.rules import MappingSet
from connector.runtime import Runtime
from connector.service.dead_letters import parse_age
from connector.storage.db import Base, transaction
from connector.storage.inbox import GroupCommitInbox
from connector.storage.migrate import upgrade
from connector.storage.models import AuditEntry, InboxEvent
from connector.storage.tokens import create_token
from connector.wiring import attach_pipeline
from tests.cli.test_serve import _wait_until_up as wait_until_up
from tests.cli.test_serve import free_port
from tests.conftest import SANDBOX_SECRET
from tests.webhooks.test_api import World, build_world
from webhooks.hubspot import decode_for_signature, sign_v3
from webhooks.signatures import sign_standard, sign_timestamped_hmac

ORG_ID = "00D5e000000AbCdEAK"
OUTBOUND_TOKEN = "obm-hardening-token"
EVENTS_SECRET = "sf-events-hardening-secret"
HUBSPOT_SECRET = "hubspot-hardening-secret"
ENV = {
    "CRM_CONNECTIONS": "sandbox,salesforce,hubspot,zoho,bitrix24",
    "SANDBOX_WEBHOOK_SECRET": SANDBOX_SECRET,
    "SALESFORCE_ORG_IDS": ORG_ID,
    "SALESFORCE_OUTBOUND_TOKEN": OUTBOUND_TOKEN,
    "SALESFORCE_EVENTS_SECRET": EVENTS_SECRET,
    "HUBSPOT_CLIENT_SECRET": HUBSPOT_SECRET,
    "ZOHO_NOTIFY_TOKEN": "zoho-notify-token",
    "ZOHO_WORKFLOW_SECRET": "zoho-workflow-secret",
    "BITRIX24_APPLICATION_TOKEN": "bitrix-token",
}
ROOT = Path(__file__).resolve().parents[2]
OPPORTUNITY = "0065e00000R1001AAB"  # a valid 18-character id
SOAP_ENV = "{http://schemas.xmlsoap.org/soap/envelope/}"


@pytest.fixture(params=["sqlite", "postgresql"])
def both(
    request: pytest.FixtureRequest,
    settings_factory: Callable[..., Settings],
    runtime_factory: Callable[[Settings], Runtime],
    app_factory: Callable[[Runtime], Flask],
) -> tuple[Runtime, FlaskClient]:
    """Every CRM connection, on SQLite and on PostgreSQL (which refuses what SQLite takes)."""
    overrides = {"database_url": request.getfixturevalue("pg_url")} if request.param == "postgresql" else {}
    runtime = runtime_factory(settings_factory(env=ENV, **overrides))
    return runtime, app_factory(runtime).test_client()


@pytest.fixture
def lite(
    settings_factory: Callable[..., Settings],
    runtime_factory: Callable[[Settings], Runtime],
    app_factory: Callable[[Runtime], Flask],
) -> tuple[Runtime, FlaskClient]:
    runtime = runtime_factory(settings_factory(env=ENV))
    return runtime, app_factory(runtime).test_client()


def all_rows(runtime: Runtime) -> dict[str, int]:
    with runtime.sessions() as session:
        return {
            t.name: session.scalar(select(func.count()).select_from(t)) or 0
            for t in Base.metadata.sorted_tables
        }


def refused(
    runtime: Runtime, response: Any, status: int, code: str, before: dict[str, int] | None = None
) -> str:
    """Asserts the JSON refusal and that it wrote nothing; returns its message."""
    assert response.status_code == status, response.get_data(as_text=True)
    error = response.get_json()["error"]
    assert error["code"] == code, error
    assert all_rows(runtime) == (before if before is not None else empty_rows(runtime)), (
        "a refusal wrote rows"
    )
    return str(error["message"])


def empty_rows(runtime: Runtime) -> dict[str, int]:
    rows = all_rows(runtime)
    return {**rows, "inbox_events": 0}


def soap_fault(response: Any, status: int, code: str) -> str:
    assert response.status_code == status, response.get_data(as_text=True)
    fault = StdET.fromstring(response.data).find(f"{SOAP_ENV}Body/{SOAP_ENV}Fault")
    assert fault is not None
    assert fault.findtext("faultcode") == "soapenv:Client"
    assert fault.findtext("detail/{urn:crm-approvals:webhooks}error/{urn:crm-approvals:webhooks}code") == code
    return fault.findtext("faultstring") or ""


def standard(
    client: FlaskClient, body: Any, *, msg_id: str = "msg_1", raw: bytes | None = None, **headers: str
) -> Any:
    data = raw if raw is not None else json.dumps(body).encode()
    ts = int(time.time())
    sent = {
        "Content-Type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign_standard(SANDBOX_SECRET, msg_id, ts, data),
        **headers,
    }
    return client.post("/webhooks/standard", data=data, headers=sent)


def deal(record_id: str = "D-1001", **data: Any) -> dict[str, Any]:
    return {
        "type": "record.updated",
        "timestamp": "2026-11-23T10:00:00Z",
        "data": {
            "object": "deal",
            "id": record_id,
            "changed_fields": ["amount"],
            "values": {"amount": 1},
            **data,
        },
    }


def outbound(
    record_id: str = OPPORTUNITY,
    fields: str = "",
    org_id: str = ORG_ID,
    declaration: str = "",
    more: tuple[str, ...] = (),
) -> bytes:
    """An Outbound Message about `record_id` (and the records in `more`)."""
    notifications = "".join(
        f"<Notification><Id>04l5e00000Gx7Q{n}AAJ</Id>"
        '<sObject xsi:type="sf:Opportunity" xmlns:sf="urn:sobject.enterprise.soap.sforce.com">'
        f"<sf:Id>{rid}</sf:Id>{fields}</sObject></Notification>"
        for n, rid in enumerate((record_id, *more))
    )
    return (
        f"{declaration}"
        '<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" '
        'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>'
        '<notifications xmlns="http://soap.sforce.com/2005/09/outbound">'
        f"<OrganizationId>{org_id}</OrganizationId>{notifications}"
        "</notifications></soapenv:Body></soapenv:Envelope>"
    ).encode()


def post_outbound(client: FlaskClient, body: bytes) -> Any:
    return client.post(
        f"/webhooks/salesforce/outbound?token={OUTBOUND_TOKEN}",
        data=body,
        headers={"Content-Type": "text/xml; charset=utf-8"},
    )


def change_event(**header: Any) -> dict[str, Any]:
    return {
        "ChangeEventHeader": {
            "entityName": "Opportunity",
            "recordIds": [OPPORTUNITY],
            "changeType": "UPDATE",
            "transactionKey": "0001b6f4-9a3c-0611-9018-30a98446c9f2",
            "sequenceNumber": 1,
            "commitTimestamp": int(time.time() * 1000),
            "changedFields": ["Amount"],
            **header,
        },
        "Amount": 150000,
    }


def post_events(client: FlaskClient, body: Any) -> Any:
    data = json.dumps(body).encode()
    signature = sign_timestamped_hmac(EVENTS_SECRET, int(time.time()), data)
    return client.post(
        "/webhooks/salesforce/events",
        data=data,
        headers={"Content-Type": "application/json", "X-CRM-Approvals-Signature": signature},
    )


def inbox(runtime: Runtime) -> list[InboxEvent]:
    with runtime.sessions() as session:
        return list(session.scalars(select(InboxEvent).order_by(InboxEvent.id)))


# --- timestamps -----------------------------------------------------------------------------

HOSTILE_TIMES = ["inf", "-inf", "1e400", "1e300", "9" * 30, "nan", "²", "１７００", "-5", "0x10"]


@pytest.mark.parametrize("value", HOSTILE_TIMES)
@pytest.mark.parametrize("endpoint", ["standard", "hubspot", "salesforce-events", "bitrix24"])
def test_a_hostile_timestamp_header_is_a_401_not_a_500(lite: Any, endpoint: str, value: str) -> None:
    runtime, client = lite
    if endpoint == "standard":
        headers = {"webhook-id": "m", "webhook-timestamp": value, "webhook-signature": "v1,AAAA"}
        response = client.post(
            "/webhooks/standard", data=b"{}", headers={"Content-Type": "application/json", **headers}
        )
    elif endpoint == "hubspot":
        headers = {"X-HubSpot-Signature-v3": "AAAA", "X-HubSpot-Request-Timestamp": value}
        response = client.post(
            "/webhooks/hubspot", data=b"[]", headers={"Content-Type": "application/json", **headers}
        )
    elif endpoint == "salesforce-events":
        headers = {"X-CRM-Approvals-Signature": f"t={value},v1=00"}
        response = post_events_raw(client, b"[]", headers)
    else:
        form = {
            "auth[application_token]": "bitrix-token",
            "event": "ONCRMDEALUPDATE",
            "ts": value,
            "data[FIELDS][ID]": "1",
        }
        response = client.post("/webhooks/bitrix24", data=form)
    assert response.status_code == 401, response.get_data(as_text=True)
    assert response.get_json()["error"]["code"] in ("bad_timestamp", "stale_timestamp")
    assert inbox(runtime) == []


def post_events_raw(client: FlaskClient, data: bytes, headers: dict[str, str]) -> Any:
    return client.post(
        "/webhooks/salesforce/events", data=data, headers={"Content-Type": "application/json", **headers}
    )


@pytest.mark.parametrize(
    "value",
    [
        float("inf"),
        float("nan"),
        1e300,
        "9" * 30,
        10**30,
        "0001-01-01T00:00:00+05:00",
        "9999-12-31T23:59:59-05:00",
        "3000-01-01T00:00:00Z",
        "1969-12-31T23:59:59Z",
        "²",
        "١٢٣",
        [],
        True,
    ],
)
def test_parse_timestamp_refuses_what_no_change_time_can_be(value: Any) -> None:
    with pytest.raises(ValueError):
        parse_timestamp(value)


def test_parse_timestamp_still_reads_seconds_milliseconds_and_iso() -> None:
    assert parse_timestamp(1700000000).isoformat() == "2023-11-14T22:13:20+00:00"
    assert parse_timestamp("1700000000000") == parse_timestamp(1700000000)
    assert parse_timestamp("2026-11-23T10:00:00Z").isoformat() == "2026-11-23T10:00:00+00:00"
    assert parse_timestamp("2026-11-23T10:00:00+05:30").isoformat() == "2026-11-23T04:30:00+00:00"


def test_huge_dates_in_payloads_are_400s(lite: Any) -> None:
    runtime, client = lite
    fields = f"<sf:LastModifiedDate>{'9' * 30}</sf:LastModifiedDate>"
    assert "LastModifiedDate" in soap_fault(
        post_outbound(client, outbound(fields=fields)), 400, "bad_timestamp"
    )
    refused(runtime, post_events(client, change_event(commitTimestamp=1e300)), 400, "bad_payload")
    refused(
        runtime, standard(client, {**deal(), "timestamp": "0001-01-01T00:00:00+05:00"}), 400, "bad_payload"
    )
    raw = json.dumps(deal()).replace('"2026-11-23T10:00:00Z"', "1e400").encode()
    refused(runtime, standard(client, None, raw=raw), 400, "malformed_json")


# --- bodies ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"[" * 1000, "deeper"),
        (b"1" * 4400, "digits"),
        (b'{"token": "x", "n": ' + b"1" * 4400 + b"}", "digits"),
        (b'{"token": NaN}', "NaN"),
        (b'{"token": "x", "n": Infinity}', "Infinity"),
        (b'{"token": "x", "n": -1e400}', "out of range"),
        (b'{"token": "\\ud800"}', "surrogate"),
        (b'{"a": ' * 40 + b"1" + b"}" * 40, "deeper"),
    ],
)
def test_zoho_bodies_that_cannot_be_judged_are_400_before_the_token_is_looked_at(
    lite: Any, body: bytes, says: str
) -> None:
    runtime, client = lite
    response = client.post("/webhooks/zoho/notify", data=body, headers={"Content-Type": "application/json"})
    assert says in refused(runtime, response, 400, "malformed_json")


@pytest.mark.parametrize("operation", [[], {}, ["update"], 1, None])
def test_a_zoho_operation_that_is_not_a_string_is_a_400(lite: Any, operation: Any) -> None:
    runtime, client = lite
    body = {
        "server_time": int(time.time() * 1000),
        "module": "Deals",
        "ids": ["5725767000003000064"],
        "operation": operation,
        "channel_id": "1000000068001",
        "token": "zoho-notify-token",
    }
    refused(runtime, client.post("/webhooks/zoho/notify", json=body), 400, "bad_payload")


@pytest.mark.parametrize("encoding", ["bogus", "shift_jis", "utf-7", "utf-32", "UTF-16", "latin-1"])
def test_an_xml_declaration_that_is_not_utf8_is_a_client_fault(lite: Any, encoding: str) -> None:
    runtime, client = lite
    body = outbound(declaration=f'<?xml version="1.0" encoding="{encoding}"?>')
    reason = soap_fault(post_outbound(client, body), 400, "unsupported_encoding")
    assert encoding in reason and "UTF-8" in reason
    assert inbox(runtime) == []


def test_a_utf8_declaration_is_still_accepted(lite: Any) -> None:
    runtime, client = lite
    response = post_outbound(client, outbound(declaration='<?xml version="1.0" encoding="utf-8"?>'))
    assert response.status_code == 200, response.data
    assert [r.record_id for r in inbox(runtime)] == [OPPORTUNITY]


# --- unicode digits ----------------------------------------------------------------------------


def test_unicode_digits_in_ids_and_numbers_are_400s(lite: Any) -> None:
    runtime, client = lite
    form = {
        "auth[application_token]": "bitrix-token",
        "event": "ONCRMDEALUPDATE",
        "ts": str(int(time.time())),
        "data[FIELDS][ID]": "²",
    }
    assert "data[FIELDS][ID]" in refused(
        runtime, client.post("/webhooks/bitrix24", data=form), 400, "bad_payload"
    )
    message = refused(runtime, post_events(client, change_event(sequenceNumber="²")), 400, "bad_payload")
    assert "sequenceNumber" in message
    zoho = {"server_time": "１７００", "token": "zoho-notify-token"}
    refused(runtime, client.post("/webhooks/zoho/notify", json=zoho), 400, "bad_payload")


def test_unicode_digits_in_limit_are_400s(
    tmp_path: Path, settings_factory: Callable[..., Settings], runtime_factory: Callable[[Settings], Runtime]
) -> None:
    world = build_world(tmp_path, settings_factory, runtime_factory)
    before = all_rows(world.runtime)
    for path in (
        "/requests?limit=²",
        "/requests?all=true&limit=١٢",
        "/dead-letters?limit=²",
        "/dead-letters?offset=³",
    ):
        response = world.get("u-admin", path)
        assert response.status_code == 400, (path, response.get_data(as_text=True))
        assert response.get_json()["error"]["code"].startswith("invalid_")
    after = all_rows(world.runtime)
    assert {t: n for t, n in after.items() if t != "api_tokens"} == {
        t: n for t, n in before.items() if t != "api_tokens"
    }


# --- what the database would refuse --------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "code", "says"),
    [
        (deal("x" * 129), "value_too_long", "record id is 129 characters"),
        (deal("D-1\x00"), "invalid_characters", "record id"),
        (deal(object="deal\x00"), "unknown_object", "deal"),
        (deal(values={"amount": "1\x00"}), "invalid_value", "NUL"),
        (deal(values={"a\x00": 1}), "invalid_value", "NUL"),
        (deal(changed_fields=["amount\x00"]), "invalid_value", "NUL"),
        (deal(origin="u" * 300), "value_too_long", "change origin"),
    ],
)
def test_values_the_inbox_cannot_store_are_400s(both: Any, body: Any, code: str, says: str) -> None:
    runtime, client = both
    assert says in refused(runtime, standard(client, body), 422 if code == "unknown_object" else 400, code)


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (
            b'{"type": "record.updated", "timestamp": 1, "data": {"object": "deal", "id": "\\ud800"}}',
            "surrogate",
        ),
        (
            b'{"type": "record.updated", "timestamp": 1, "data": {"object": "deal", "id": "x", '
            b'"values": {"a": NaN}}}',
            "NaN",
        ),
    ],
)
def test_lone_surrogates_and_nan_are_400s(both: Any, raw: bytes, says: str) -> None:
    runtime, client = both
    assert says in refused(runtime, standard(client, None, raw=raw), 400, "malformed_json")


def test_a_delivery_id_longer_than_its_column_is_a_400(both: Any) -> None:
    runtime, client = both
    message = refused(runtime, standard(client, deal(), msg_id="m" * 400), 400, "value_too_long")
    assert "id is 400 characters long" in message


def test_a_129_character_salesforce_id_is_a_client_fault(both: Any) -> None:
    runtime, client = both
    reason = soap_fault(post_outbound(client, outbound(record_id="0" * 129)), 400, "bad_record_id")
    assert "<sf:Id>" in reason
    assert inbox(runtime) == []


def test_a_nul_in_a_zoho_workflow_value_is_a_400(both: Any) -> None:
    runtime, client = both
    form = {
        "crm_approvals_secret": "zoho-workflow-secret",
        "module": "Deals",
        "id": "5725767000003000064",
        "modified_time": "2026-11-23T10:00:00+05:30",
        "Amount": "15\x000",
    }
    refused(runtime, client.post("/webhooks/zoho/workflow", data=form), 400, "invalid_value")


# --- configuration ---------------------------------------------------------------------------------


@pytest.mark.parametrize("secret", ["whsec_not base64!", "whsec_", "whsec_abc"])
def test_a_malformed_whsec_secret_is_a_503_naming_the_variable_and_reported_at_start_up(
    secret: str,
    settings_factory: Callable[..., Settings],
    runtime_factory: Callable[[Settings], Runtime],
    app_factory: Callable[[Runtime], Flask],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="webhooks")
    runtime = runtime_factory(settings_factory(env={"SANDBOX_WEBHOOK_SECRET": f"{SANDBOX_SECRET},{secret}"}))
    client = app_factory(runtime).test_client()
    started = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("value 2 of SANDBOX_WEBHOOK_SECRET is malformed" in line for line in started), started
    assert not any(secret in line for line in started if secret != "whsec_")
    response = standard(client, deal())
    message = refused(runtime, response, 503, "bad_secret_config")
    assert "SANDBOX_WEBHOOK_SECRET" in message and "malformed" in message
    assert "SANDBOX_WEBHOOK_SECRET" in response.get_json()["error"]["hint"]


# --- dead-letter API arguments --------------------------------------------------------------------


@pytest.fixture
def admin(runtime: Runtime, client: FlaskClient) -> dict[str, str]:
    with transaction(runtime.sessions) as session:
        _, token = create_token(session, "u-admin", "ops", is_admin=True)
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize(
    ("method", "path", "body", "code"),
    [
        ("post", "/api/v1/dead-letters/retry", {"ids": [2**40]}, "invalid_ids"),
        ("post", "/api/v1/dead-letters/discard", {"ids": [0]}, "invalid_ids"),
        ("post", "/api/v1/dead-letters/retry", {"older_than": "99999999999w"}, "invalid_older_than"),
        ("get", "/api/v1/dead-letters?newer_than=999999999999d", None, "invalid_newer_than"),
        ("get", "/api/v1/dead-letters?older_than=²h", None, "invalid_older_than"),
        ("get", "/api/v1/dead-letters?connection=a%00b", None, "invalid_connection"),
        ("post", "/api/v1/dead-letters/retry", {"code": "x\x00"}, "invalid_code"),
    ],
)
def test_dead_letter_arguments_the_database_would_refuse_are_400s(
    runtime: Runtime, client: FlaskClient, admin: dict[str, str], method: str, path: str, body: Any, code: str
) -> None:
    response = getattr(client, method)(path, headers=admin, **({"json": body} if body is not None else {}))
    assert response.status_code == 400, response.get_data(as_text=True)
    assert response.get_json()["error"]["code"] == code


def test_ages_are_ascii_numbers_of_at_most_a_century() -> None:
    assert parse_age("90s").total_seconds() == 90
    assert parse_age("2w").days == 14
    for bad in ("²h", "99999999999w", "36526d", "1y"):
        with pytest.raises(ValueError):
            parse_age(bad)


# --- chunked bodies ---------------------------------------------------------------------------------


def chunked(client: FlaskClient, path: str, body: bytes, content_type: str, **headers: str) -> Any:
    """A body with no Content-Length, as werkzeug's and gunicorn's servers hand a chunked one on."""
    return client.post(
        path,
        input_stream=io.BytesIO(body),
        headers={"Content-Type": content_type, "Transfer-Encoding": "chunked", **headers},
        environ_overrides={"wsgi.input_terminated": True},
    )


@pytest.fixture
def small(
    settings_factory: Callable[..., Settings],
    runtime_factory: Callable[[Settings], Runtime],
    app_factory: Callable[[Runtime], Flask],
) -> tuple[Runtime, Flask]:
    runtime = runtime_factory(settings_factory(env=ENV, webhook_max_body_bytes=2000))
    return runtime, app_factory(runtime)


def test_a_chunked_body_over_the_limit_is_413_not_malformed_json(small: tuple[Runtime, Flask]) -> None:
    runtime, app = small
    client = app.test_client()
    big = json.dumps(deal(values={"note": "x" * 3000})).encode()
    ts = str(int(time.time()))
    response = chunked(
        client,
        "/webhooks/standard",
        big,
        "application/json",
        **{"webhook-id": "m", "webhook-timestamp": ts, "webhook-signature": "v1,AAAA"},
    )
    assert "2000 bytes" in refused(runtime, response, 413, "body_too_large")
    fault = chunked(
        client,
        f"/webhooks/salesforce/outbound?token={OUTBOUND_TOKEN}",
        b"<a>" + b"x" * 3000 + b"</a>",
        "text/xml",
    )
    soap_fault(fault, 413, "body_too_large")


def test_a_chunked_body_within_the_limit_is_read_whole(small: tuple[Runtime, Flask]) -> None:
    runtime, app = small
    body = json.dumps(deal()).encode()
    ts = int(time.time())
    headers = {
        "webhook-id": "m",
        "webhook-timestamp": str(ts),
        "webhook-signature": sign_standard(SANDBOX_SECRET, "m", ts, body),
    }
    response = chunked(app.test_client(), "/webhooks/standard", body, "application/json", **headers)
    assert response.status_code == 202, response.get_data(as_text=True)
    assert [r.record_id for r in inbox(runtime)] == ["D-1001"]


@pytest.fixture
def served(small: tuple[Runtime, Flask]) -> Iterator[tuple[Runtime, int]]:
    """The app behind werkzeug's real server, which de-chunks bodies and sends no length on."""
    runtime, app = small
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield runtime, server.server_port
    server.shutdown()
    thread.join(5)


def send_chunked(port: int, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + 500]), body[i : i + 500]) for i in range(0, len(body), 500)
    )
    request = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n"
        f"{head}\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request.encode() + chunks + b"0\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status = int(answer.split(b" ", 2)[1])
    return status, answer.partition(b"\r\n\r\n")[2]


def test_over_a_real_server_a_chunked_body_over_the_limit_is_413(served: tuple[Runtime, int]) -> None:
    runtime, port = served
    big = json.dumps(deal(values={"note": "x" * 3000})).encode()
    ts = int(time.time())
    headers = {
        "Content-Type": "application/json",
        "webhook-id": "m",
        "webhook-timestamp": str(ts),
        "webhook-signature": sign_standard(SANDBOX_SECRET, "m", ts, big),
    }
    status, body = send_chunked(port, "/webhooks/standard", big, headers)
    assert status == 413, body
    assert json.loads(body)["error"]["code"] == "body_too_large"
    small_body = json.dumps(deal()).encode()
    headers["webhook-signature"] = sign_standard(SANDBOX_SECRET, "m", ts, small_body)
    status, body = send_chunked(port, "/webhooks/standard", small_body, headers)
    assert status == 202, body
    assert len(inbox(runtime)) == 1


# --- a Standard Webhooks id reused with another body ---------------------------------------------


def test_a_reused_webhook_id_with_another_body_is_409_and_audited(both: Any) -> None:
    runtime, client = both
    assert standard(client, deal(values={"amount": 1})).status_code == 202
    again = standard(client, deal(values={"amount": 1}))
    assert again.status_code == 200 and again.get_json() == {"accepted": 0, "duplicates": 1}
    with runtime.sessions() as session:
        audited_before = session.scalar(select(func.count()).select_from(AuditEntry))
    reused = standard(client, deal(values={"amount": 999999}))
    assert reused.status_code == 409, reused.get_data(as_text=True)
    error = reused.get_json()["error"]
    assert error["code"] == "webhook_id_reused" and "msg_1" in error["message"]
    [row] = inbox(runtime)
    assert row.values == {"amount": 1}  # the first body stands
    with runtime.sessions() as session:
        entries = list(session.scalars(select(AuditEntry).where(AuditEntry.kind == "webhook_id_reused")))
        assert session.scalar(select(func.count()).select_from(AuditEntry)) == (audited_before or 0) + 1
    [entry] = entries
    assert (entry.connection, entry.record_id, entry.detail["event_id"]) == ("sandbox", "D-1001", "msg_1")
    body = json.dumps(deal(values={"amount": 999999})).encode()
    assert entry.detail["content_hash"] == hashlib.sha256(body).hexdigest()


def test_two_bodies_for_one_id_in_one_group_commit_keep_the_first(runtime: Runtime) -> None:
    def event(values: dict[str, Any], content_hash: str) -> RecordChangeEvent:
        return RecordChangeEvent(
            source="sandbox",
            connection="sandbox",
            object_type="deal",
            record_id="D-1",
            event_id="msg_1",
            occurred_at=parse_timestamp(1700000000),
            dedupe_key="sandbox:std:msg_1",
            values=values,
            content_hash=content_hash,
        )

    first, second = event({"amount": 1}, "a" * 64), event({"amount": 2}, "b" * 64)
    results = GroupCommitInbox(runtime.sessions)
    from connector.storage.inbox import _write_batch

    [one, two] = _write_batch(results.sessions, [[first], [second]])
    assert (one.accepted, one.conflicts) == (1, ())
    assert (two.accepted, two.duplicates, two.conflicts) == (0, 0, (second,))
    assert [r.values for r in inbox(runtime)] == [{"amount": 1}]


# --- Salesforce ids --------------------------------------------------------------------------------


def test_salesforce_ids_are_checked_and_normalized_to_18_characters() -> None:
    assert normalize_salesforce_id("001D000000IqhSL") == "001D000000IqhSLIAZ"
    assert normalize_salesforce_id("001D000000IqhSLIAZ") == "001D000000IqhSLIAZ"
    assert normalize_salesforce_id("001D000000IqhSLiaz") == "001D000000IqhSLIAZ"  # the suffix ignores case
    # The same 15 letters in another case are another record, with another suffix.
    assert normalize_salesforce_id("001d000000iqhsl") == "001d000000iqhslAAA"
    for bad in (
        "001D000000IqhSLAAA",
        "001D000000IqhS",
        "001D000000IqhSL-AZ",
        "001D000000IqhSLIA",
        "²" * 15,
        "",
    ):
        assert salesforce_id_problem(bad) is not None, bad
        with pytest.raises(ValueError):
            normalize_salesforce_id(bad)
    assert id_spellings("001D000000IqhSL") == {"001D000000IqhSL", "001D000000IqhSLIAZ"}
    assert id_spellings("D-1001") == {"D-1001"}


def test_outbound_ids_are_stored_in_their_18_character_form(both: Any) -> None:
    runtime, client = both
    assert post_outbound(client, outbound(record_id=OPPORTUNITY[:15])).status_code == 200
    [row] = inbox(runtime)
    assert row.record_id == OPPORTUNITY and row.values["Id"] == OPPORTUNITY


def test_outbound_ids_with_a_wrong_checksum_are_client_faults(lite: Any) -> None:
    runtime, client = lite
    wrong = OPPORTUNITY[:15] + "AAA"
    assert "checksum" in soap_fault(post_outbound(client, outbound(record_id=wrong)), 400, "bad_record_id")
    reason = soap_fault(
        post_outbound(client, outbound(org_id=ORG_ID[:15] + "AAA")), 400, "bad_organization_id"
    )
    assert "checksum" in reason
    assert inbox(runtime) == []


def test_ids_that_share_15_characters_in_another_case_are_two_records(lite: Any) -> None:
    runtime, client = lite
    upper, lower = normalize_salesforce_id("0065e00000ABCDE"), normalize_salesforce_id("0065e00000abcde")
    assert upper[:15].lower() == lower[:15].lower() and upper != lower
    response = post_outbound(client, outbound(record_id=upper, more=(lower,)))
    assert response.status_code == 200, response.data
    assert sorted(r.record_id for r in inbox(runtime)) == sorted([upper, lower])


def test_change_event_record_ids_are_normalized_and_checked(lite: Any) -> None:
    runtime, client = lite
    assert post_events(client, change_event(recordIds=[OPPORTUNITY[:15]])).status_code == 202
    assert [r.record_id for r in inbox(runtime)] == [OPPORTUNITY]
    before = all_rows(runtime)
    bad = post_events(client, change_event(recordIds=[OPPORTUNITY[:15] + "ZZZ"], sequenceNumber=2))
    assert "recordIds[0]" in refused(runtime, bad, 400, "bad_record_id", before)


def test_a_15_character_record_filter_finds_the_request_stored_under_18(
    tmp_path: Path, settings_factory: Callable[..., Settings], runtime_factory: Callable[[Settings], Runtime]
) -> None:
    world: World = build_world(tmp_path, settings_factory, runtime_factory)
    request_id = world.submit(OPPORTUNITY)
    for spelled in (OPPORTUNITY, OPPORTUNITY[:15]):
        found = world.get("u-admin", f"/requests?record=sandbox:deal:{spelled}").get_json()["requests"]
        assert [r["id"] for r in found] == [request_id]
    assert (
        world.get("u-admin", f"/requests?record=sandbox:deal:{OPPORTUNITY[:15]}AAA").get_json()["requests"]
        == []
    )


def test_hubspot_signatures_still_verify_with_the_strict_timestamp(lite: Any) -> None:
    runtime, client = lite
    body = json.dumps(
        [
            {
                "eventId": 1,
                "subscriptionType": "deal.propertyChange",
                "objectId": 1001,
                "propertyName": "amount",
                "propertyValue": "1",
                "occurredAt": int(time.time() * 1000),
            }
        ]
    ).encode()
    timestamp = str(int(time.time() * 1000))
    uri = decode_for_signature(runtime.settings.public_base_url + "/webhooks/hubspot")
    headers = {
        "Content-Type": "application/json",
        "X-HubSpot-Request-Timestamp": timestamp,
        "X-HubSpot-Signature-v3": sign_v3(HUBSPOT_SECRET, "POST", uri, body, timestamp),
    }
    assert client.post("/webhooks/hubspot", data=body, headers=headers).status_code == 202


@pytest.mark.slow
def test_under_gunicorn_a_chunked_body_over_the_limit_is_413(tmp_path: Path) -> None:
    """`crm-approvals serve` as deployed: gunicorn de-chunks and marks the input terminated."""
    db = f"sqlite:///{tmp_path}/served.db"
    upgrade(db)
    env_file = tmp_path / "served.env"
    env_file.write_text(
        f"DATABASE_URL={db}\nQUEUE_URL=sqlite:///{tmp_path}/queue.db\nMAPPINGS_DIR={tmp_path}\n"
        f"CRM_CONNECTIONS=sandbox\nSANDBOX_WEBHOOK_SECRET={SANDBOX_SECRET}\nWEBHOOK_MAX_BODY_BYTES=2000\n"
    )
    port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DATABASE_URL", "SANDBOX_", "CRM_", "WEBHOOK_"))
    }
    command = [sys.executable, "-m", "connector", "--env-file", str(env_file), "serve"]
    server = subprocess.Popen(
        [*command, "--bind", f"127.0.0.1:{port}", "--workers", "1"], cwd=tmp_path, env=env
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_up(base, server)
        ts = int(time.time())
        for body, status in (
            (json.dumps(deal(values={"note": "x" * 3000})).encode(), 413),
            (json.dumps(deal()).encode(), 202),
        ):
            headers = {
                "Content-Type": "application/json",
                "webhook-id": f"msg_{status}",
                "webhook-timestamp": str(ts),
                "webhook-signature": sign_standard(SANDBOX_SECRET, f"msg_{status}", ts, body),
            }
            pieces = iter([body[i : i + 500] for i in range(0, len(body), 500)])  # a generator: sent chunked
            response = requests.post(f"{base}/webhooks/standard", data=pieces, headers=headers, timeout=10)
            assert response.status_code == status, response.text
            if status == 413:
                assert response.json()["error"]["code"] == "body_too_large"
    finally:
        server.terminate()
        server.wait(timeout=20)
    with create_engine(db).connect() as conn:
        assert conn.execute(text("select record_id from inbox_events")).scalars().all() == ["D-1001"]


@pytest.mark.parametrize("callback_id", ["%00", "a%00b", "x" * 65, "%C2%B2"])
def test_a_check_callback_id_that_no_check_can_have_is_a_404_not_a_500(both: Any, callback_id: str) -> None:
    """The fuzz test's cause: a NUL in the id reached PostgreSQL, which refuses it in a query."""
    runtime, client = both
    attach_pipeline(runtime, MappingSet.load(ROOT / "mappings" / "examples"))
    assert runtime.approvals is not None  # the id is looked up, not refused for want of approvals
    before = all_rows(runtime)
    response = client.post(f"/webhooks/checks/{callback_id}", data=b"{}", content_type="application/json")
    assert "callback id" in refused(runtime, response, 404, "no_such_check", before)
