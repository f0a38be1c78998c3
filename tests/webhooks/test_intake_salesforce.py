"""Salesforce intake: Outbound Messages (SOAP, org allow-list, exact ack, SOAP faults) and
relayed Change Data Capture events (JSON, HMAC). Payloads follow Salesforce's documented
formats; see docs/crms/salesforce.md (part 2) for the sources."""

from __future__ import annotations

import json
import time
import xml.etree.ElementTree as StdET
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from connector.config import Settings
from connector.crm.registry import adapter_class
from connector.events import RecordChangeEvent
from connector.runtime import Runtime
from connector.storage.models import InboxEvent
from tests.contract.harness_salesforce import sf18
from tests.contract.harness_salesforce_intake import ORG_ID, OTHER_ORG_ID, Notification, outbound_message
from webhooks.signatures import sign_timestamped_hmac

DATA = Path(__file__).parents[1] / "data" / "salesforce"
EVENTS_SECRET = "sf-events-secret-7f3a9c1e5b"
OUTBOUND_TOKEN = "obm-token-2b8d4f6a0c"
ENV = {
    "CRM_CONNECTIONS": "salesforce",
    "SALESFORCE_ORG_IDS": ORG_ID,
    "SALESFORCE_EVENTS_SECRET": EVENTS_SECRET,
    # Most tests here are about parsing; the URL token (required by default) has its own tests.
    "SALESFORCE_OUTBOUND_ORG_ID_ONLY": "true",
}
OUTBOUND = "/webhooks/salesforce/outbound"
EVENTS = "/webhooks/salesforce/events"
SOAP_ENV = "{http://schemas.xmlsoap.org/soap/envelope/}"
# Verbatim from the brief / Salesforce's Outbound Messaging WSDL (notificationsResponse).
EXPECTED_ACK = (
    '<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/">'
    '<soapenv:Body><notificationsResponse xmlns="http://soap.sforce.com/2005/09/outbound"><Ack>true</Ack>'
    "</notificationsResponse></soapenv:Body></soapenv:Envelope>"
)

AppMaker = Callable[..., tuple[Runtime, FlaskClient]]


@pytest.fixture
def make_app(
    settings_factory: Callable[..., Settings],
    runtime_factory: Callable[[Settings], Runtime],
    app_factory: Callable[[Runtime], Flask],
) -> AppMaker:
    def make(env: dict[str, str] | None = None, **overrides: Any) -> tuple[Runtime, FlaskClient]:
        runtime = runtime_factory(settings_factory(env={**ENV, **(env or {})}, **overrides))
        return runtime, app_factory(runtime).test_client()

    return make


@pytest.fixture
def sf(make_app: AppMaker) -> tuple[Runtime, FlaskClient]:
    return make_app()


def rows(runtime: Runtime) -> list[InboxEvent]:
    with runtime.sessions() as session:
        return list(session.scalars(select(InboxEvent).order_by(InboxEvent.id)))


def sample(name: str) -> bytes:
    return (DATA / name).read_bytes()


def post_xml(
    client: FlaskClient, body: bytes, *, query: str = "", content_type: str = "text/xml; charset=utf-8"
) -> Any:
    return client.post(
        OUTBOUND + query, data=body, headers={"Content-Type": content_type, "SOAPAction": '""'}
    )


def fault_of(response: Any) -> tuple[str, str, str]:
    """(faultcode, faultstring, our error code) of a SOAP 1.1 fault; fails unless well-formed."""
    assert response.mimetype == "text/xml"
    root = StdET.fromstring(response.data)
    assert root.tag == f"{SOAP_ENV}Envelope"
    fault = root.find(f"{SOAP_ENV}Body/{SOAP_ENV}Fault")
    assert fault is not None, response.data
    code = fault.find("detail/{urn:crm-approvals:webhooks}error/{urn:crm-approvals:webhooks}code")
    assert code is not None
    return fault.findtext("faultcode") or "", fault.findtext("faultstring") or "", code.text or ""


def opportunities(count: int, prefix: str = "04l5e00000N") -> list[Notification]:
    return [
        Notification(f"{prefix}{i:07d}", sf18(f"0065e00000R{i:04d}"), {"StageName": "Prospecting"})
        for i in range(count)
    ]


# --- Outbound Messages: the happy path ----------------------------------------------------


def test_three_notifications_are_stored_as_three_events_and_get_the_exact_ack(sf: Any) -> None:
    runtime, client = sf
    response = post_xml(client, sample("outbound_3_opportunities.xml"))
    assert response.status_code == 200
    assert response.mimetype == "text/xml"
    assert response.data.decode() == EXPECTED_ACK
    stored = rows(runtime)
    assert [r.record_id for r in stored] == ["0065e00000AbCdEAAV", "0065e00000AbCdFAAV", "0065e00000AbCdGAAV"]
    first = stored[0]
    assert (first.source, first.connection, first.object_type) == ("salesforce", "salesforce", "Opportunity")
    assert first.event_id == "04l5e00000Gx7QzAAJ"
    assert first.dedupe_key == "salesforce:obm:04l5e00000Gx7QzAAJ"
    assert first.change_type == "updated"
    assert first.values == {
        "Id": "0065e00000AbCdEAAV",
        "Amount": "150000.0",
        "Approval_Status__c": None,
        "CloseDate": "2025-12-31",
        "LastModifiedDate": "2025-11-23T10:00:00.000Z",
        "Name": "Acme & Sons - 500 widgets",
        "StageName": "Negotiation/Review",
    }
    assert first.changed_fields == [
        "Amount",
        "Approval_Status__c",
        "CloseDate",
        "LastModifiedDate",
        "Name",
        "StageName",
    ]
    assert first.origin is None
    assert first.status == "pending"
    assert first.occurred_at.replace(tzinfo=UTC) == datetime(2025, 11, 23, 10, 0, tzinfo=UTC)
    assert stored[1].values["Approval_Status__c"] == "Pending"


def test_occurred_at_is_the_receipt_time_when_last_modified_date_is_not_sent(sf: Any) -> None:
    runtime, client = sf
    before = datetime.now(UTC)
    assert post_xml(client, outbound_message(opportunities(1))).status_code == 200
    [row] = rows(runtime)
    occurred = row.occurred_at.replace(tzinfo=UTC)
    assert before - timedelta(seconds=1) <= occurred <= datetime.now(UTC) + timedelta(seconds=1)


def test_one_hundred_notifications_are_accepted(sf: Any) -> None:
    runtime, client = sf
    response = post_xml(client, outbound_message(opportunities(100)))
    assert response.status_code == 200
    assert response.data.decode() == EXPECTED_ACK
    assert len(rows(runtime)) == 100


def test_one_hundred_and_one_notifications_are_refused(sf: Any) -> None:
    runtime, client = sf
    response = post_xml(client, outbound_message(opportunities(101)))
    assert response.status_code == 400
    faultcode, reason, code = fault_of(response)
    assert (faultcode, code) == ("soapenv:Client", "too_many_notifications")
    assert "101" in reason and "100" in reason
    assert rows(runtime) == []


def test_redelivered_notifications_are_acknowledged_and_dropped(sf: Any) -> None:
    runtime, client = sf
    assert post_xml(client, sample("outbound_3_opportunities.xml")).status_code == 200
    again = post_xml(client, sample("outbound_3_opportunities.xml"))
    assert again.status_code == 200
    assert again.data.decode() == EXPECTED_ACK
    assert len(rows(runtime)) == 3


def test_a_retry_batched_with_new_notifications_stores_only_the_new_ones(sf: Any) -> None:
    runtime, client = sf
    old = Notification("04l5e00000Gx7QzAAJ", "0065e00000AbCdEAAV", {"StageName": "Prospecting"})
    new = Notification("04l5e00000Gx7S9AAJ", "0065e00000AbCdHAAV", {"StageName": "Prospecting"})
    assert post_xml(client, outbound_message([old])).status_code == 200
    assert post_xml(client, outbound_message([old, new])).status_code == 200
    assert [r.event_id for r in rows(runtime)] == ["04l5e00000Gx7QzAAJ", "04l5e00000Gx7S9AAJ"]


# --- Outbound Messages: who may send -------------------------------------------------------


def test_an_org_that_is_not_allowed_gets_a_403_fault(sf: Any) -> None:
    runtime, client = sf
    response = post_xml(client, outbound_message(opportunities(1), org_id=OTHER_ORG_ID))
    assert response.status_code == 403
    faultcode, reason, code = fault_of(response)
    assert (faultcode, code) == ("soapenv:Client", "org_not_allowed")
    assert OTHER_ORG_ID in reason and "SALESFORCE_ORG_IDS" in reason
    assert rows(runtime) == []


@pytest.mark.parametrize(
    ("allowed", "sent", "status"),
    [
        ("00D5e000000AbCdEAK", "00D5e000000AbCd", 200),  # 18 allowed, 15 sent
        ("00D5e000000AbCd", "00D5e000000AbCdEAK", 200),  # 15 allowed, 18 sent
        ("00D5e000000XyZwEAK, 00D5e000000AbCd", "00D5e000000AbCdEAK", 200),  # any entry of the list
        ("00D5e000000AbCdEAK", "00D5e000000ABCDEA4", 403),  # the first 15 are case-sensitive
        ("00D5e000000AbCd", "00D5e000000AbCe", 403),
    ],
)
def test_15_and_18_character_org_ids_are_the_same_org(
    make_app: AppMaker, allowed: str, sent: str, status: int
) -> None:
    runtime, client = make_app({"SALESFORCE_ORG_IDS": allowed})
    response = post_xml(client, outbound_message(opportunities(1), org_id=sent))
    assert response.status_code == status, response.data
    assert len(rows(runtime)) == (1 if status == 200 else 0)


def test_without_an_org_allow_list_nothing_is_trusted(make_app: AppMaker) -> None:
    runtime, client = make_app({"SALESFORCE_ORG_IDS": ""})
    response = post_xml(client, outbound_message(opportunities(1)))
    assert response.status_code == 503  # a configuration error, the same on every intake
    assert fault_of(response)[2] == "not_configured"
    assert rows(runtime) == []


def test_a_malformed_organization_id_is_a_400_fault(sf: Any) -> None:
    runtime, client = sf
    response = post_xml(client, outbound_message(opportunities(1), org_id="00D-not-an-id"))
    assert response.status_code == 400
    assert fault_of(response)[2] == "bad_organization_id"
    assert rows(runtime) == []


@pytest.mark.parametrize(
    ("query", "status", "code"),
    [
        (f"?token={OUTBOUND_TOKEN}", 200, None),
        ("", 401, "missing_token"),
        ("?token=obm-token-0000000000", 401, "bad_token"),
    ],
)
def test_the_optional_url_token_is_required_when_configured(
    make_app: AppMaker, caplog: pytest.LogCaptureFixture, query: str, status: int, code: str | None
) -> None:
    runtime, client = make_app({"SALESFORCE_OUTBOUND_TOKEN": OUTBOUND_TOKEN})
    response = post_xml(client, outbound_message(opportunities(1)), query=query)
    assert response.status_code == status
    if code:
        assert fault_of(response)[2] == code
        assert OUTBOUND_TOKEN.encode() not in response.data
        assert rows(runtime) == []
    assert OUTBOUND_TOKEN not in caplog.text


# --- Outbound Messages: bad input is a SOAP fault, never a 500 ------------------------------


@pytest.mark.parametrize("name", ["xml_bomb.xml", "xxe.xml"])
def test_dtds_and_entities_are_refused_with_a_fault(sf: Any, name: str) -> None:
    runtime, client = sf
    response = post_xml(client, sample(name))
    assert response.status_code == 400
    faultcode, reason, code = fault_of(response)
    assert (faultcode, code) == ("soapenv:Client", "unsafe_xml")
    assert "DOCTYPE" in reason
    assert b"root:" not in response.data  # nothing of /etc/passwd
    assert rows(runtime) == []


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"<soapenv:Envelope><oops>", "malformed_xml"),
        (b"\xff\xfe not xml", "malformed_xml"),
        (b"", "malformed_xml"),
        (b'<?xml version="1.0"?><notifications/>', "not_soap"),
        (
            b'<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"><soapenv:Body/></soapenv:Envelope>',
            "not_soap",
        ),
    ],
)
def test_malformed_xml_is_a_400_fault(sf: Any, body: bytes, code: str) -> None:
    runtime, client = sf
    response = post_xml(client, body)
    assert response.status_code == 400
    faultcode, reason, got = fault_of(response)
    assert (faultcode, got) == ("soapenv:Client", code)
    assert reason
    assert rows(runtime) == []


def test_wrong_content_type_is_a_415_fault(sf: Any) -> None:
    runtime, client = sf
    response = post_xml(client, sample("outbound_3_opportunities.xml"), content_type="application/json")
    assert response.status_code == 415
    faultcode, reason, code = fault_of(response)
    assert code == "unsupported_content_type"
    assert "text/xml" in reason
    assert rows(runtime) == []


def test_oversize_body_is_a_413_soap_fault(make_app: AppMaker) -> None:
    runtime, client = make_app(webhook_max_body_bytes=2000)
    body = outbound_message(
        [Notification("04l5e00000Gx7QzAAJ", "0065e00000AbCdEAAV", {"Description": "x" * 3000})]
    )
    response = post_xml(client, body)
    assert response.status_code == 413
    faultcode, reason, code = fault_of(response)
    assert (faultcode, code) == ("soapenv:Client", "body_too_large")
    assert "WEBHOOK_MAX_BODY_BYTES" in reason
    assert rows(runtime) == []


def test_unknown_connection_is_a_404_fault(sf: Any) -> None:
    runtime, client = sf
    response = post_xml(client, outbound_message(opportunities(1)), query="?connection=emea")
    assert response.status_code == 404
    assert fault_of(response)[2] == "unknown_connection"


def test_an_object_the_connection_does_not_accept_is_a_422_fault(sf: Any) -> None:
    runtime, client = sf
    lead = Notification("04l5e00000Gx7QzAAJ", "00Q5e00000AbCdEEAV", {"Status": "Open"}, object_type="Lead")
    response = post_xml(client, outbound_message([*opportunities(1), lead]))
    assert response.status_code == 422
    faultcode, reason, code = fault_of(response)
    assert code == "unknown_object" and "'Lead'" in reason and "SALESFORCE_OBJECTS" in reason
    assert rows(runtime) == []  # all or nothing: the good notification is not stored either


def test_objects_listed_for_the_connection_are_accepted(make_app: AppMaker) -> None:
    runtime, client = make_app({"SALESFORCE_OBJECTS": "Opportunity,Lead"})
    lead = Notification("04l5e00000Gx7QzAAJ", "00Q5e00000AbCdEEAV", {"Status": "Open"}, object_type="Lead")
    assert post_xml(client, outbound_message([lead])).status_code == 200
    assert rows(runtime)[0].object_type == "Lead"


@pytest.mark.parametrize(
    ("mutate", "code"),
    [
        (lambda xml: xml.replace("<sf:Id>0065e00000R0000AAB</sf:Id>", ""), "missing_id"),
        (lambda xml: xml.replace("<Id>04l5e00000N0000000</Id>", ""), "missing_id"),
        (lambda xml: xml.replace(' xsi:type="sf:Opportunity"', ""), "missing_object_type"),
        (
            lambda xml: xml.replace(
                "<sf:StageName>", "<sf:LastModifiedDate>yesterday</sf:LastModifiedDate><sf:StageName>"
            ),
            "bad_timestamp",
        ),
    ],
)
def test_a_notification_missing_what_we_need_is_a_400_fault(
    sf: Any, mutate: Callable[[str], str], code: str
) -> None:
    runtime, client = sf
    body = mutate(outbound_message(opportunities(1)).decode()).encode()
    response = post_xml(client, body)
    assert response.status_code == 400, response.data
    assert fault_of(response)[2] == code
    assert rows(runtime) == []


def test_a_message_without_notifications_is_a_400_fault(sf: Any) -> None:
    runtime, client = sf
    response = post_xml(client, outbound_message([]))
    assert response.status_code == 400
    assert fault_of(response)[2] == "no_notifications"


def test_a_server_failure_is_a_soap_server_fault_not_an_ack(
    settings_factory: Callable[..., Settings], app_factory: Callable[[Runtime], Flask]
) -> None:
    # A database without the inbox table (migrations never ran): storing fails for real.
    runtime = Runtime.from_settings(settings_factory(env=ENV))
    try:
        response = post_xml(app_factory(runtime).test_client(), outbound_message(opportunities(1)))
    finally:
        runtime.close()
    assert response.status_code == 500
    faultcode, reason, code = fault_of(response)
    assert (faultcode, reason, code) == ("soapenv:Server", "internal error", "internal_error")


def test_session_id_and_message_contents_are_never_logged(sf: Any, caplog: pytest.LogCaptureFixture) -> None:
    _runtime, client = sf
    caplog.set_level("DEBUG")
    post_xml(client, sample("outbound_3_opportunities.xml"))
    post_xml(client, sample("outbound_3_opportunities.xml").replace(ORG_ID.encode(), OTHER_ORG_ID.encode()))
    assert "org_not_allowed" in caplog.text
    assert "SESSION-MUST-NOT-LEAK" not in caplog.text
    assert "Acme" not in caplog.text


# --- Change Data Capture relay --------------------------------------------------------------


def post_events(
    client: FlaskClient,
    body: Any,
    *,
    secret: str = EVENTS_SECRET,
    ts: int | None = None,
    signature: str | None = None,
    content_type: str = "application/json",
    raw: bytes | None = None,
) -> Any:
    data = raw if raw is not None else json.dumps(body).encode()
    headers = {"Content-Type": content_type}
    if signature != "":
        stamp = int(time.time()) if ts is None else ts
        headers["X-CRM-Approvals-Signature"] = signature or sign_timestamped_hmac(secret, stamp, data)
    return client.post(EVENTS, data=data, headers=headers)


def cdc(name: str) -> Any:
    return json.loads(sample(name))


def test_a_cdc_update_becomes_one_canonical_event(sf: Any) -> None:
    runtime, client = sf
    response = post_events(client, cdc("cdc_opportunity_update.json"))
    assert response.status_code == 202, response.get_json()
    assert response.get_json() == {"accepted": 1, "duplicates": 0, "skipped": 0}
    [row] = rows(runtime)
    assert (row.source, row.object_type, row.record_id) == ("salesforce", "Opportunity", "0065e00000AbCdEAAV")
    assert row.change_type == "updated"
    assert row.changed_fields == ["StageName", "Amount", "LastModifiedDate"]
    assert row.values == {
        "StageName": "Negotiation/Review",
        "Amount": 150000.0,
        "LastModifiedDate": "2025-11-23T10:00:00.000Z",
    }
    assert row.event_id == "0001b6f4-9a3c-0611-9018-30a98446c9f2:1"
    assert row.dedupe_key == "salesforce:cdc:0001b6f4-9a3c-0611-9018-30a98446c9f2:1:0065e00000AbCdEAAV"
    assert row.origin == "com/salesforce/api/soap/62.0;client=SfdcInternalAPI/"  # for echo detection
    assert row.modified_by == "0055e000005mc66AAA"  # commitUser: who made the change (votes, locks)
    assert row.occurred_at.replace(tzinfo=UTC) == datetime(2025, 11, 23, 10, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("commit_user", "stored"), [("0055e000005mc66", "0055e000005mc66AAA"), ("nobody", None)]
)
def test_commit_user_is_stored_as_an_18_character_id_or_not_at_all(
    sf: Any, commit_user: str, stored: str | None
) -> None:
    runtime, client = sf
    event = cdc("cdc_opportunity_update.json")
    event["ChangeEventHeader"]["commitUser"] = commit_user
    assert post_events(client, event).status_code == 202
    assert rows(runtime)[0].modified_by == stored


def test_merged_record_ids_become_one_event_each_with_the_same_values(sf: Any) -> None:
    runtime, client = sf
    assert post_events(client, cdc("cdc_account_merged_update.json")).status_code == 202
    stored = rows(runtime)
    assert [r.record_id for r in stored] == ["0015f00002JUXA8AAP", "0015f00002JUXA9AAP", "0015f00002JUXAAAA5"]
    assert len({r.dedupe_key for r in stored}) == 3
    for row in stored:
        assert row.changed_fields == ["BillingAddress.City", "LastModifiedDate"]  # compound names as sent
        assert row.values == {
            "BillingAddress": {"City": "Oakland"},
            "LastModifiedDate": "2025-11-23T10:00:00.000Z",
        }
        assert row.origin == "com/salesforce/api/rest/62.0;client=crm-approvals-dev"


def test_an_array_of_events_is_stored_in_one_go(sf: Any) -> None:
    runtime, client = sf
    response = post_events(
        client, [cdc("cdc_opportunity_update.json"), cdc("cdc_account_merged_update.json")]
    )
    assert response.get_json() == {"accepted": 4, "duplicates": 0, "skipped": 0}
    assert len(rows(runtime)) == 4


def test_the_streaming_api_envelope_is_unwrapped(sf: Any) -> None:
    runtime, client = sf
    assert post_events(client, cdc("cdc_streaming_envelope.json")).status_code == 202
    [row] = rows(runtime)
    assert (row.object_type, row.record_id, row.change_type) == (
        "Opportunity",
        "0065e00000AbCdEAAV",
        "created",
    )
    assert row.values["Name"] == "Acme - 500 widgets"
    assert row.changed_fields == []  # a creation lists no changed fields: the pipeline treats all as new
    assert row.origin == ""  # a UI change: Salesforce sends an empty changeOrigin


def test_a_gap_event_carries_no_values_so_the_worker_fetches(sf: Any) -> None:
    runtime, client = sf
    assert post_events(client, cdc("cdc_gap_create.json")).status_code == 202
    [row] = rows(runtime)
    assert (row.record_id, row.change_type) == ("001ZM000001n4n5YAA", "created")
    assert row.values is None
    assert row.changed_fields == []


def test_an_overflow_event_names_no_record_and_is_acknowledged_without_storing(
    sf: Any, caplog: pytest.LogCaptureFixture
) -> None:
    runtime, client = sf
    response = post_events(client, cdc("cdc_overflow.json"))
    assert response.status_code == 200
    assert response.get_json() == {"accepted": 0, "duplicates": 0, "skipped": 1}
    assert rows(runtime) == []
    assert "GAP_OVERFLOW" in caplog.text and "reconcile Account" in caplog.text


def test_a_wildcard_record_id_is_skipped(sf: Any) -> None:
    runtime, client = sf
    event = cdc("cdc_account_merged_update.json")
    event["ChangeEventHeader"]["recordIds"] = ["001*"]
    assert post_events(client, event).get_json()["skipped"] == 1
    assert rows(runtime) == []


def test_a_pubsub_update_keeps_only_changed_values_and_drops_diffs(sf: Any) -> None:
    runtime, client = sf
    assert post_events(client, cdc("cdc_pubsub_update.json")).status_code == 202
    [row] = rows(runtime)
    # Unchanged fields arrive as null from Pub/Sub API; Description is a unified diff, not a value.
    assert row.values == {"Phone": None, "Rating": "Hot", "LastModifiedDate": 1763892000000}
    assert row.changed_fields == ["Description", "Phone", "Rating", "LastModifiedDate"]


def test_a_streaming_api_diff_value_is_dropped(sf: Any) -> None:
    runtime, client = sf
    event = cdc("cdc_opportunity_update.json")
    event["ChangeEventHeader"]["changedFields"].append("Description")
    event["Description"] = {"diff": "--- \n+++ 3b9c\n@@ -1 +1 @@\n-a\n+b\n"}
    assert post_events(client, event).status_code == 202
    assert "Description" not in rows(runtime)[0].values


def test_redelivery_of_the_same_transaction_change_is_dropped(sf: Any) -> None:
    runtime, client = sf
    event = cdc("cdc_opportunity_update.json")
    assert post_events(client, event).status_code == 202
    again = post_events(client, event)
    assert again.status_code == 200
    assert again.get_json() == {"accepted": 0, "duplicates": 1, "skipped": 0}
    event["ChangeEventHeader"]["sequenceNumber"] = 2  # a second change to the record, same transaction
    assert post_events(client, event).get_json()["accepted"] == 1
    assert len(rows(runtime)) == 2


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"signature": ""}, "missing_signature"),
        ({"secret": "someone-elses-secret"}, "bad_signature"),
        ({"signature": "t=1763892000,v1=00ff"}, "stale_timestamp"),
        ({"ts_offset": -330}, "stale_timestamp"),
        ({"ts_offset": +330}, "stale_timestamp"),
        ({"signature": "t={now},v1=deadbeef"}, "bad_signature"),
        ({"signature": "v1=deadbeef"}, "missing_timestamp"),
    ],
)
def test_missing_forged_or_stale_signatures_are_401(sf: Any, kwargs: dict[str, Any], code: str) -> None:
    runtime, client = sf
    now = int(time.time())  # at run time, not collection time: the window is only 300 s
    if "ts_offset" in kwargs:
        kwargs = {"ts": now + kwargs["ts_offset"]}
    if "signature" in kwargs:
        kwargs = {"signature": kwargs["signature"].replace("{now}", str(now))}
    response = post_events(client, cdc("cdc_opportunity_update.json"), **kwargs)
    assert response.status_code == 401
    assert response.get_json()["error"]["code"] == code
    assert rows(runtime) == []


def test_a_body_changed_after_signing_is_refused(sf: Any) -> None:
    runtime, client = sf
    data = json.dumps(cdc("cdc_opportunity_update.json")).encode()
    signature = sign_timestamped_hmac(EVENTS_SECRET, int(time.time()), data)
    response = post_events(client, None, raw=data.replace(b"150000.0", b"1.0"), signature=signature)
    assert response.status_code == 401
    assert rows(runtime) == []


def test_a_signature_inside_the_window_is_accepted(sf: Any) -> None:
    _runtime, client = sf
    assert (
        post_events(client, cdc("cdc_opportunity_update.json"), ts=int(time.time()) - 280).status_code == 202
    )


def bad_header(**changes: Any) -> dict[str, Any]:
    event = cdc("cdc_opportunity_update.json")
    event["ChangeEventHeader"].update(changes)
    return event


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"raw": b"{not json"}, 400, "malformed_json"),
        ({"content_type": "text/plain"}, 415, "unsupported_content_type"),
        ({"body": []}, 400, "bad_payload"),
        ({"body": {"Name": "no header"}}, 400, "bad_payload"),
        ({"body": bad_header(entityName="Lead")}, 422, "unknown_object"),
        ({"body": bad_header(changeType="EXPLODE")}, 400, "bad_payload"),
        ({"body": bad_header(recordIds=[])}, 400, "bad_payload"),
        ({"body": bad_header(recordIds="0065e00000AbCdEAAV")}, 400, "bad_payload"),
        ({"body": bad_header(transactionKey=None)}, 400, "bad_payload"),
        ({"body": bad_header(sequenceNumber="one")}, 400, "bad_payload"),
        ({"body": bad_header(commitTimestamp=None)}, 400, "bad_payload"),
        ({"body": bad_header(changedFields=["0x650004E0", "4-0x10"])}, 400, "undecoded_bitmap"),
        (
            {"body": [cdc("cdc_opportunity_update.json"), bad_header(entityName="Lead")]},
            422,
            "unknown_object",
        ),
    ],
)
def test_bad_cdc_input_gets_a_clear_json_4xx_and_writes_nothing(
    sf: Any, kwargs: dict[str, Any], status: int, code: str
) -> None:
    runtime, client = sf
    body = kwargs.pop("body", cdc("cdc_opportunity_update.json"))
    response = post_events(client, body, **kwargs)
    assert response.status_code == status, response.get_json()
    error = response.get_json()["error"]
    assert error["code"] == code
    assert error["message"]
    assert rows(runtime) == []


def test_without_an_events_secret_the_cdc_endpoint_refuses(make_app: AppMaker) -> None:
    runtime, client = make_app({"SALESFORCE_EVENTS_SECRET": ""})
    response = post_events(client, cdc("cdc_opportunity_update.json"))
    assert response.status_code == 503  # a configuration error, the same on every intake
    assert response.get_json()["error"]["code"] == "not_configured"
    assert "SALESFORCE_EVENTS_SECRET" in response.get_json()["error"]["message"]
    assert rows(runtime) == []


def test_cdc_unknown_connection_is_a_json_404(sf: Any) -> None:
    _runtime, client = sf
    data = json.dumps(cdc("cdc_opportunity_update.json")).encode()
    response = client.post(
        EVENTS + "?connection=emea",
        data=data,
        headers={
            "Content-Type": "application/json",
            "X-CRM-Approvals-Signature": sign_timestamped_hmac(EVENTS_SECRET, int(time.time()), data),
        },
    )
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "unknown_connection"


def test_cdc_oversize_body_is_a_json_413(make_app: AppMaker) -> None:
    runtime, client = make_app(webhook_max_body_bytes=2000)
    event = cdc("cdc_opportunity_update.json")
    event["Description"] = "x" * 3000
    response = post_events(client, event)
    assert response.status_code == 413
    assert response.get_json()["error"]["code"] == "body_too_large"


def test_cdc_rejections_are_logged_without_the_secret(sf: Any, caplog: pytest.LogCaptureFixture) -> None:
    _runtime, client = sf
    post_events(client, cdc("cdc_opportunity_update.json"), secret="someone-elses-secret")
    post_events(client, bad_header(entityName="Lead"))
    assert "bad_signature" in caplog.text and "unknown_object" in caplog.text
    assert EVENTS_SECRET not in caplog.text and "someone-elses-secret" not in caplog.text


# --- Echo detection: the origin we store is what the adapter reads ---------------------------


@pytest.mark.parametrize(
    ("change_origin", "own"),
    [
        ("com/salesforce/api/rest/62.0;client=crm-approvals", True),  # our own write-back
        ("com/salesforce/api/rest/62.0;client=someone-else", False),
        ("", False),  # a UI change: changeOrigin empty, so not one of our (client-tagged) writes
    ],
)
def test_change_origin_lets_the_adapter_recognise_its_own_writes(
    make_app: AppMaker, change_origin: str, own: bool | None
) -> None:
    credentials = {
        "SALESFORCE_USERNAME": "integration@acme.example",
        "SALESFORCE_PASSWORD": "correct-horse-battery",
        "SALESFORCE_SECURITY_TOKEN": "Xk3r9QpTz8WmB1vN7cJd",
        "SALESFORCE_CLIENT_ID": "crm-approvals",
    }
    runtime, client = make_app(credentials)
    event = cdc("cdc_opportunity_update.json")
    event["ChangeEventHeader"]["changeOrigin"] = change_origin
    assert post_events(client, event).status_code == 202
    [row] = rows(runtime)
    connection = runtime.settings.connection("salesforce")
    adapter = adapter_class("salesforce").from_config(connection, runtime.settings)  # type: ignore[attr-defined]
    assert adapter.is_own_change(RecordChangeEvent.from_row(row)) is own


def test_outbound_messages_leave_echo_detection_to_value_comparison(sf: Any) -> None:
    runtime, client = sf
    assert post_xml(client, outbound_message(opportunities(1))).status_code == 200
    # No origin in an Outbound Message: is_own_change() answers None and the pipeline compares values.
    assert rows(runtime)[0].origin is None
