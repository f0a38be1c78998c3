"""End to end with no mocks of our code, only of Salesforce (with `responses`, in its
documented formats): an Outbound Message -> inbox -> rule matched -> votes through the API
-> ONE composite/sobjects PATCH with Status and the +180-day expiry -> after the simulated
time, the expiry sweep writes the expired status."""

from __future__ import annotations

import json
import re
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import responses
from sqlalchemy import select

from connector.config import parse_connections
from connector.rules import MappingSet
from connector.storage.db import transaction
from connector.storage.inbox import process_pending
from connector.storage.models import InboxEvent
from connector.storage.outbox import flush
from connector.storage.tokens import create_token
from connector.wiring import attach_pipeline
from tests.contract.harness_salesforce import (
    COLLECTIONS_URL,
    QUERY_URL,
    SalesforceAdapterHarness,
    mock_soap_login,
    save_success,
    soql_record,
)
from tests.contract.harness_salesforce_intake import ORG_ID, OUTBOUND_TOKEN, Notification, outbound_message

ROOT = Path(__file__).resolve().parents[2]
OPPORTUNITY = "006Dn000001AbCdIAK"
MANAGER = "005Hs00000Mgr001"
GENERAL_MANAGER = "005Hs00000GenMgr"  # role general_manager in the shipped example


def test_outbound_message_to_approved_write_back_to_expiry(
    tmp_path: Path, settings_factory: Any, runtime_factory: Any, app_factory: Any
) -> None:
    mappings = tmp_path / "mappings"
    mappings.mkdir()
    shutil.copy(ROOT / "mappings/examples/salesforce-opportunity.yaml", mappings)
    env = {
        **SalesforceAdapterHarness.env,
        "SALESFORCE_ORG_IDS": ORG_ID,
        "SALESFORCE_OUTBOUND_TOKEN": OUTBOUND_TOKEN,
    }
    runtime = runtime_factory(settings_factory(env=env, mappings_dir=str(mappings)))
    assert runtime.settings.connections == parse_connections(env)
    pipeline = attach_pipeline(runtime, MappingSet.load(mappings))
    client = app_factory(runtime).test_client()

    with responses.RequestsMock(assert_all_requests_are_fired=True) as crm:
        mock_soap_login(crm)
        # The Outbound Message carries some fields; the rest of the mapping is read by SOQL.
        crm.get(re.compile(re.escape(QUERY_URL) + r".*"), json=_query_answer())
        patches = _record_patches(crm)

        # 1. Salesforce calls us; we acknowledge with the exact envelope.
        message = outbound_message([Notification("04l5e000000NotAAA", OPPORTUNITY, _sent_fields())])
        answer = client.post(
            f"/webhooks/salesforce/outbound?token={OUTBOUND_TOKEN}",
            data=message,
            headers={"Content-Type": "text/xml"},
        )
        assert answer.status_code == 200 and b"<Ack>true</Ack>" in answer.data

        # 2. The worker processes it: the rule matches and a request opens.
        assert process_pending(runtime.sessions, pipeline).done == 1
        with runtime.sessions() as session:
            result = session.scalars(select(InboxEvent.result)).one()
        assert result is not None and "deal-approval: opened" in result

        # 3. The two approvers vote through the API.
        manager, gm = _token(runtime, MANAGER), _token(runtime, GENERAL_MANAGER)
        pending = client.get("/api/v1/requests?pending_for=me", headers=manager).get_json()
        [request] = pending["requests"]
        for headers in (manager, gm):
            vote = client.post(
                f"/api/v1/requests/{request['id']}/approve", json={"comment": "ok"}, headers=headers
            )
            assert vote.status_code == 200, vote.get_json()
        assert vote.get_json()["status"] == "approved"

        # 4. One PATCH carries Status and the expiry (Pending merged into Approved).
        flush(runtime.sessions, runtime.adapter)
        today = datetime.now(UTC).date()
        assert patches == [
            {
                "allOrNone": False,
                "records": [
                    {
                        "attributes": {"type": "Opportunity"},
                        "id": OPPORTUNITY,
                        "Approval_Status__c": "Approved",
                        "Approval_Expires__c": (today + timedelta(days=180)).isoformat(),
                    }
                ],
            }
        ]

        # 5. 181 days later the expiry sweep writes the expired status.
        pipeline.approvals.clock = lambda: datetime.now(UTC) + timedelta(days=181)
        assert pipeline.approvals.expire_due(runtime.sessions) == 1
        flush(runtime.sessions, runtime.adapter)
        assert patches[-1]["records"][0] | {"attributes": None} == {
            "attributes": None,
            "id": OPPORTUNITY,
            "Approval_Status__c": "Expired",
            "Approval_Expires__c": None,
        }
        assert pipeline.approvals.expire_due(runtime.sessions) == 0  # idempotent


def _sent_fields() -> dict[str, str | None]:
    return {
        "Name": "Acme ERP roll-out",
        "Amount": "150000.0",
        "StageName": "Negotiation/Review",
        "OwnerId": "005Hs00000Rep001",
        "CloseDate": "2026-12-31",
    }


def _query_answer() -> dict[str, Any]:
    values = {
        "Name": "Acme ERP roll-out",
        "Amount": 150000.0,
        "StageName": "Negotiation/Review",
        "OwnerId": "005Hs00000Rep001",
        "CloseDate": "2026-12-31",
        "Owner.ManagerId": MANAGER,
        "Account.Credit_Score__c": 82,
        "Term_Months__c": 6,
        "Product_Lines__c": None,
        "Approval_Status__c": None,
        "Approval_Expires__c": None,
        "Approval_Comment__c": None,
    }
    return {"totalSize": 1, "done": True, "records": [soql_record("Opportunity", OPPORTUNITY, values)]}


def _record_patches(crm: responses.RequestsMock) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []

    def answer(request: Any) -> tuple[int, dict[str, str], str]:
        body = json.loads(request.body)
        seen.append(body)
        return (
            200,
            {"Content-Type": "application/json"},
            json.dumps([save_success(r["id"]) for r in body["records"]]),
        )

    crm.add_callback(responses.PATCH, COLLECTIONS_URL, callback=answer)
    return seen


def _token(runtime: Any, user: str) -> dict[str, str]:
    with transaction(runtime.sessions) as session:
        _info, token = create_token(session, user)
    return {"Authorization": f"Bearer {token}"}


def _forgery_setup(
    tmp_path: Path, settings_factory: Any, runtime_factory: Any, app_factory: Any, env: dict[str, str]
) -> tuple[Any, Any, Any]:
    mappings = tmp_path / "mappings"
    mappings.mkdir()
    shutil.copy(ROOT / "mappings/examples/salesforce-opportunity.yaml", mappings)
    runtime = runtime_factory(settings_factory(env=env, mappings_dir=str(mappings)))
    pipeline = attach_pipeline(runtime, MappingSet.load(mappings))
    return runtime, pipeline, app_factory(runtime).test_client()


def test_an_outbound_message_with_the_right_org_id_but_no_token_is_refused(
    tmp_path: Path, settings_factory: Any, runtime_factory: Any, app_factory: Any
) -> None:
    env = {
        **SalesforceAdapterHarness.env,
        "SALESFORCE_ORG_IDS": ORG_ID,
        "SALESFORCE_OUTBOUND_TOKEN": OUTBOUND_TOKEN,
    }
    runtime, _pipeline, client = _forgery_setup(tmp_path, settings_factory, runtime_factory, app_factory, env)
    message = outbound_message([Notification("04l5e000000NotAAA", OPPORTUNITY, _sent_fields())])
    answer = client.post("/webhooks/salesforce/outbound", data=message, headers={"Content-Type": "text/xml"})
    assert answer.status_code == 401 and b"missing_token" in answer.data
    with runtime.sessions() as session:
        assert session.scalars(select(InboxEvent)).all() == []


def test_without_a_token_setting_outbound_messages_are_refused_unless_org_id_only_is_opted_in(
    tmp_path: Path, settings_factory: Any, runtime_factory: Any, app_factory: Any
) -> None:
    env = {**SalesforceAdapterHarness.env, "SALESFORCE_ORG_IDS": ORG_ID}
    runtime, _pipeline, client = _forgery_setup(tmp_path, settings_factory, runtime_factory, app_factory, env)
    message = outbound_message([Notification("04l5e000000NotAAA", OPPORTUNITY, _sent_fields())])
    answer = client.post("/webhooks/salesforce/outbound", data=message, headers={"Content-Type": "text/xml"})
    assert answer.status_code == 503 and b"SALESFORCE_OUTBOUND_TOKEN" in answer.data
    with runtime.sessions() as session:
        assert session.scalars(select(InboxEvent)).all() == []

    opted_in = tmp_path / "opted-in"
    opted_in.mkdir()
    env["SALESFORCE_OUTBOUND_ORG_ID_ONLY"] = "true"
    runtime, _pipeline, client = _forgery_setup(opted_in, settings_factory, runtime_factory, app_factory, env)
    answer = client.post("/webhooks/salesforce/outbound", data=message, headers={"Content-Type": "text/xml"})
    assert answer.status_code == 200


def test_forged_values_with_the_token_open_nothing_because_the_record_is_re_read(
    tmp_path: Path, settings_factory: Any, runtime_factory: Any, app_factory: Any
) -> None:
    """Whoever holds the URL token can still write any values into the message: the worker
    judges the rule on what Salesforce says, so a forged Amount opens no request."""
    env = {
        **SalesforceAdapterHarness.env,
        "SALESFORCE_ORG_IDS": ORG_ID,
        "SALESFORCE_OUTBOUND_TOKEN": OUTBOUND_TOKEN,
    }
    runtime, pipeline, client = _forgery_setup(tmp_path, settings_factory, runtime_factory, app_factory, env)
    forged = {**_sent_fields(), "Amount": "9999999.0"}  # Salesforce says 150,000 -> 500 below
    truth = _query_answer()
    truth["records"][0]["Amount"] = 500.0
    with responses.RequestsMock(assert_all_requests_are_fired=True) as crm:
        mock_soap_login(crm)
        reads = crm.get(re.compile(re.escape(QUERY_URL) + r".*"), json=truth)
        message = outbound_message([Notification("04l5e000000NotAAA", OPPORTUNITY, forged)])
        answer = client.post(
            f"/webhooks/salesforce/outbound?token={OUTBOUND_TOKEN}",
            data=message,
            headers={"Content-Type": "text/xml"},
        )
        assert answer.status_code == 200
        assert process_pending(runtime.sessions, pipeline).done == 1
        assert reads.call_count == 1  # every mapped field read, though the message carried Amount
    with runtime.sessions() as session:
        assert session.scalars(select(InboxEvent.result)).one() == "no rule matched"
    manager = _token(runtime, MANAGER)
    assert client.get("/api/v1/requests?pending_for=me", headers=manager).get_json()["requests"] == []
