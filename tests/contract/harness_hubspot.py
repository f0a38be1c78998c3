"""HubSpot for the contract suite: the CRM v3 objects API (adapter) and signed webhooks (intake).

Every mocked answer follows HubSpot's documented shapes (docs/crms/hubspot.md lists the
sources); the builders here are shared with tests/crm/test_hubspot.py.
"""

from __future__ import annotations

import itertools
import json
import re
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import responses
from requests import PreparedRequest

from connector.config import Settings
from connector.crm.base import CRMQueue
from tests.contract.harness import (
    AdapterHarness,
    CallLog,
    Delivery,
    FilesOnRecord,
    IntakeHarness,
    multipart_file,
    multipart_value,
)
from webhooks.hubspot import sign_v3

Answer = tuple[int, dict, str]  # what a `responses` callback returns: status, headers, body
Outcome = Callable[[int, list[str], PreparedRequest], Answer | None]

API = "https://api.hubapi.com"
CLIENT_SECRET = "9f3c2b1e-5d4a-4c7b-8e6f-1a2b3c4d5e6f"
APP_ID = "4567890"
PORTAL_ID = 62515
PRIVATE_APP_TOKEN = "pat-na1-11111111-2222-3333-4444-555555555555"
OAUTH_ACCESS_TOKEN = "CJSP5qf1KhICAQEYs-gDIIGOBii1hQIyGQAf3xBKmlwHjX7OIpuIFEavB2-qYAGQsF4"
OAUTH_RENEWED_TOKEN = "CN2zlYnmLBICAQIYs-gDIIGOBii1hQIyGQAf3xBKmlwHjX7OIpuIFEavB2-renewed"
REFRESH_TOKEN = "6f18f21e-a743-4509-b7ff-4ad2ae14f1b2"

PRIVATE_APP_ENV = {
    "CRM_CONNECTIONS": "hubspot",
    "HUBSPOT_ACCESS_TOKEN": PRIVATE_APP_TOKEN,
    "HUBSPOT_APP_ID": APP_ID,
    "HUBSPOT_CLIENT_SECRET": CLIENT_SECRET,
}
OAUTH_ENV = {
    "CRM_CONNECTIONS": "hubspot",
    "HUBSPOT_ACCESS_TOKEN": OAUTH_ACCESS_TOKEN,
    "HUBSPOT_REFRESH_TOKEN": REFRESH_TOKEN,
    "HUBSPOT_CLIENT_ID": "5fd3b1c4-2d86-4b1e-9d0a-7c2e4f6a8b10",
    "HUBSPOT_CLIENT_SECRET": CLIENT_SECRET,
    "HUBSPOT_APP_ID": APP_ID,
}

RATE_LIMIT_HEADERS = {
    "X-HubSpot-RateLimit-Daily": "500000",
    "X-HubSpot-RateLimit-Daily-Remaining": "499000",
    "X-HubSpot-RateLimit-Interval-Milliseconds": "10000",
    "X-HubSpot-RateLimit-Max": "100",
    "X-HubSpot-RateLimit-Remaining": "0",
}


# --- HubSpot API answers ------------------------------------------------------------------


def simple_object(record_id: str, properties: Mapping[str, Any]) -> dict[str, Any]:
    """A SimplePublicObject: every property value is a string (or null)."""
    return {
        "id": record_id,
        "properties": {"hs_object_id": record_id, **properties},
        "createdAt": "2026-10-01T09:00:00.000Z",
        "updatedAt": "2026-11-23T10:00:00.000Z",
        "archived": False,
    }


def batch_response(results: Sequence[Mapping[str, Any]], errors: Sequence[Mapping[str, Any]] = ()) -> dict:
    body: dict[str, Any] = {
        "status": "COMPLETE",
        "results": list(results),
        "startedAt": "2026-11-23T10:00:00.100Z",
        "completedAt": "2026-11-23T10:00:00.300Z",
    }
    if errors:
        body["errors"] = list(errors)
        body["numErrors"] = len(errors)
    return body


def standard_error(
    category: str, message: str, ids: Sequence[str] = (), *, key: str = "id", **extra: Any
) -> dict:
    """A StandardError inside a 207 body; `context.<key>` names the records it is about."""
    error: dict[str, Any] = {"status": "error", "category": category, "message": message, **extra}
    error["context"] = {key: list(ids)} if ids else {}
    return error


def error_body(category: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"status": "error", "message": message, "correlationId": "aeb5f871-7f07-4993-9211-075dc63e7cbf",
            "category": category, **extra}  # fmt: skip


def rate_limit_body(policy: str = "TEN_SECONDLY_ROLLING") -> dict[str, Any]:
    return {
        "status": "error",
        "message": f"You have reached your {policy.lower()} limit.",
        "errorType": "RATE_LIMIT",
        "correlationId": "c033cdaa-2c40-4a64-ae48-b4cec88dad24",
        "policyName": policy,
        "requestId": "3d3e35b7-0dae-4b9f-a6e3-9c230cbcf8dd",
    }


def invalid_option_error(ids: Sequence[str]) -> dict[str, Any]:
    detail = [{"isValid": False, "message": "Shipped was not one of the allowed options",
               "error": "INVALID_OPTION", "name": "approval_status"}]  # fmt: skip
    return standard_error("VALIDATION_ERROR", f"Property values were not valid: {json.dumps(detail)}", ids)


def association_result(from_id: str, to_ids: Sequence[str], primary: str | None = None) -> dict[str, Any]:
    def types(to_id: str) -> list[dict[str, Any]]:
        unlabeled = {"category": "HUBSPOT_DEFINED", "typeId": 341, "label": None}
        if to_id == primary:
            return [{"category": "HUBSPOT_DEFINED", "typeId": 5, "label": "Primary"}, unlabeled]
        return [unlabeled]

    return {
        "from": {"id": from_id},
        "to": [{"toObjectId": int(t), "associationTypes": types(t)} for t in to_ids],
    }


def json_of(request: PreparedRequest) -> Any:
    return json.loads(request.body or b"{}")


def reply(status: int, body: Any, headers: Mapping[str, str] | None = None) -> Answer:
    return status, {"Content-Type": "application/json;charset=utf-8", **(headers or {})}, json.dumps(body)


def update_responder(log: CallLog, outcome: Outcome | None = None) -> Callable[[PreparedRequest], Answer]:
    """The batch/update endpoint: logs each call's ids; `outcome(call_no, ids, request)` may answer."""

    def respond(request: PreparedRequest) -> Answer:
        inputs = json_of(request)["inputs"]
        ids = [item["id"] for item in inputs]
        log.calls.append(ids)
        special = outcome(len(log.calls), ids, request) if outcome else None
        if special is not None:
            return special
        return reply(200, batch_response([simple_object(i["id"], i["properties"]) for i in inputs]))

    return respond


# --- webhooks -----------------------------------------------------------------------------


def hubspot_event(object_id: int | str, event_id: int, **fields: Any) -> dict[str, Any]:
    """One webhook event as HubSpot sends it (Webhooks API, legacy subscription types)."""
    event = {
        "eventId": event_id,
        "subscriptionId": 2538662,
        "portalId": PORTAL_ID,
        "appId": int(APP_ID),
        "occurredAt": 1795600000000,
        "subscriptionType": "deal.propertyChange",
        "attemptNumber": 0,
        "objectId": int(object_id) if object_id is not None else None,
        "propertyName": "amount",
        "propertyValue": "150000",
        "changeSource": "CRM_UI",
        "sourceId": "userId:882761034",
    }
    event.update(fields)
    return {k: v for k, v in event.items() if v is not None}


def signed_headers(
    body: bytes,
    uri: str,
    *,
    timestamp_ms: int | None = None,
    secret: str = CLIENT_SECRET,
    method: str = "POST",
) -> dict[str, str]:
    timestamp = str(int(time.time() * 1000) if timestamp_ms is None else timestamp_ms)
    return {
        "Content-Type": "application/json",
        "X-HubSpot-Signature-v3": sign_v3(secret, method, uri, body, timestamp),
        "X-HubSpot-Request-Timestamp": timestamp,
        "X-HubSpot-Signature-Version": "v3",
    }


class HubSpotAdapterHarness(AdapterHarness):
    kind = "hubspot"
    object_type = "deals"
    modified_by_sample = ("882761034", "882761034")  # hs_updated_by_user_id: a HubSpot user id, as text
    batch_limit = 100
    fatal_code = "VALIDATION_ERROR"
    # OAuth mode, so that an expired access token can be renewed (a private-app token never expires).
    env = OAUTH_ENV

    def mock_updates(self, rsps: responses.RequestsMock, fail: Mapping[str, str] | None = None) -> CallLog:
        log = CallLog()
        fail = dict(fail or {})

        def outcome(_call: int, ids: list[str], _request: PreparedRequest) -> Answer | None:
            failing = [i for i in ids if i in fail]
            if not failing:
                return None
            errors = [
                invalid_option_error([i])
                if fail[i] == "fatal"
                else standard_error("RATE_LIMITS", "You have reached your secondly limit.", [i])
                for i in failing
            ]
            ok = [simple_object(i, {"approval_status": "Approved"}) for i in ids if i not in fail]
            return reply(207, batch_response(ok, errors))

        rsps.add_callback(
            responses.POST, f"{API}/crm/v3/objects/deals/batch/update", update_responder(log, outcome)
        )
        return log

    def mock_throttled_then_ok(self, rsps: responses.RequestsMock, retry_after: int) -> CallLog:
        log = CallLog()
        headers = {**RATE_LIMIT_HEADERS, "Retry-After": str(retry_after)}

        def outcome(call: int, _ids: list[str], _request: PreparedRequest) -> Answer | None:
            return reply(429, rate_limit_body(), headers) if call == 1 else None

        rsps.add_callback(
            responses.POST, f"{API}/crm/v3/objects/deals/batch/update", update_responder(log, outcome)
        )
        return log

    def mock_server_error_then_ok(self, rsps: responses.RequestsMock) -> CallLog:
        log = CallLog()

        def outcome(call: int, _ids: list[str], _request: PreparedRequest) -> Answer | None:
            return reply(502, error_body("INTERNAL_ERROR", "internal error")) if call == 1 else None

        rsps.add_callback(
            responses.POST, f"{API}/crm/v3/objects/deals/batch/update", update_responder(log, outcome)
        )
        return log

    def mock_auth_expired_then_ok(self, rsps: responses.RequestsMock) -> CallLog:
        log = CallLog()

        def outcome(_call: int, _ids: list[str], request: PreparedRequest) -> Answer | None:
            if request.headers.get("Authorization") == f"Bearer {OAUTH_RENEWED_TOKEN}":
                return None
            message = "The OAuth token used to make this call expired 2 minute(s) ago."
            return reply(401, error_body("EXPIRED_AUTHENTICATION", message))

        rsps.add_callback(
            responses.POST, f"{API}/crm/v3/objects/deals/batch/update", update_responder(log, outcome)
        )
        rsps.add(responses.POST, f"{API}/oauth/v1/token", json=oauth_token_response())
        return log

    def mock_files(self, rsps: responses.RequestsMock, record_id: str) -> FilesOnRecord:
        """Files v3 (multipart upload with `options` access PRIVATE, 201 with the file's id;
        DELETE) and notes v3 (hs_attachment_ids, created with a HUBSPOT_DEFINED note->deal
        association 214; PATCH properties). The record shows the files its notes carry."""
        uploaded: dict[str, bytes] = {}
        notes: dict[str, dict[str, Any]] = {}  # note id -> properties, for notes on the record
        numbers = itertools.count(1)

        def upload(request: PreparedRequest) -> Answer:
            options = json.loads(multipart_value(request, "options") or "{}")
            assert options.get("access") == "PRIVATE", "an approval document must not be public"
            name, content = multipart_file(request)
            file_id = str(180000000000 + next(numbers))
            uploaded[file_id] = content
            return (
                201,
                {},
                json.dumps(
                    {
                        "id": file_id,
                        "name": name,
                        "access": "PRIVATE",
                        "archived": False,
                        "createdAt": "2026-11-30T10:00:00Z",
                        "updatedAt": "2026-11-30T10:00:00Z",
                        "parentFolderId": "1778",
                        "path": f"/crm-approvals/{name}",
                        "size": len(content),
                        "type": "DOCUMENT",
                        "extension": "pdf",
                    }
                ),
            )

        def delete_file(request: PreparedRequest) -> Answer:
            file_id = (request.url or "").rsplit("/", 1)[1]
            if uploaded.pop(file_id, None) is None:
                return 404, {}, json.dumps(standard_error("OBJECT_NOT_FOUND", "File not found", []))
            return 204, {}, ""

        def create_note(request: PreparedRequest) -> Answer:
            body = json_of(request)
            (association,) = body["associations"]
            assert association["to"]["id"] == record_id
            assert association["types"] == [
                {"associationCategory": "HUBSPOT_DEFINED", "associationTypeId": 214}
            ]
            note_id = str(71000000000 + next(numbers))
            notes[note_id] = dict(body["properties"])
            return 201, {}, json.dumps(simple_object(note_id, notes[note_id]))

        def update_note(request: PreparedRequest) -> Answer:
            note_id = (request.url or "").rsplit("/", 1)[1]
            if note_id not in notes:
                return 404, {}, json.dumps(standard_error("OBJECT_NOT_FOUND", "Object not found.", []))
            notes[note_id].update(json_of(request)["properties"])
            return 200, {}, json.dumps(simple_object(note_id, notes[note_id]))

        rsps.add_callback(responses.POST, f"{API}/files/v3/files", callback=upload)
        rsps.add_callback(
            responses.DELETE, re.compile(re.escape(f"{API}/files/v3/files/") + r"\d+$"), callback=delete_file
        )
        rsps.add_callback(responses.POST, f"{API}/crm/v3/objects/notes", callback=create_note)
        rsps.add_callback(
            responses.PATCH,
            re.compile(re.escape(f"{API}/crm/v3/objects/notes/") + r"\d+$"),
            callback=update_note,
        )

        def shown() -> dict[str, bytes]:
            ids = [
                i for note in notes.values() for i in str(note.get("hs_attachment_ids", "")).split(";") if i
            ]
            return {i: uploaded[i] for i in ids if i in uploaded}

        return FilesOnRecord(shown)

    def mock_records(self, rsps: responses.RequestsMock, records: Mapping[str, Mapping[str, Any]]) -> None:
        mock_deals_with_companies(rsps, records)

    unique_field = "contract_number"

    def mock_duplicate_query(
        self, rsps: responses.RequestsMock, value: str, rows: Mapping[str, str]
    ) -> list[str]:
        seen: list[str] = []

        def search(request: PreparedRequest) -> Answer:
            body = json_of(request)  # CRM search API: POST /crm/v3/objects/{object}/search
            assert body["filterGroups"] == [
                {"filters": [{"propertyName": "contract_number", "operator": "EQ", "value": value}]}
            ], body
            seen.append(json.dumps(body))
            results = [
                {
                    "id": i,
                    "properties": {"contract_number": value, "hs_object_id": i},
                    "archived": False,
                    "createdAt": "2026-01-05T10:00:00Z",
                    "updatedAt": "2026-01-06T10:00:00Z",
                }
                for i in rows
            ]
            return reply(200, {"total": len(results), "results": results})

        rsps.add_callback(responses.POST, f"{API}/crm/v3/objects/deals/search", search)
        return seen

    def sample_records(self) -> dict[str, dict[str, Any]]:
        return {
            "1001": {"dealname": "Acme renewal", "amount": "150000", "companies.credit_score": "712"},
            "1002": {"dealname": "Globex expansion", "amount": "98000", "companies.credit_score": "640"},
            "1003": {"dealname": "Initech pilot", "amount": "12000", "companies.credit_score": None},
        }

    def sample_queues(self) -> list[CRMQueue]:
        return [
            CRMQueue("368389", "Sales Team", ("9586504", "9586505", "9586506")),
            CRMQueue("368390", "Empty Team", ()),
        ]

    def mock_queues(self, rsps: responses.RequestsMock, queues: Sequence[CRMQueue]) -> None:
        """GET /settings/v3/users/teams: primary members in userIds, others in secondaryUserIds."""
        rsps.get(
            f"{API}/settings/v3/users/teams",
            json={
                "results": [
                    {
                        "id": q.id,
                        "name": q.name,
                        "userIds": list(q.members[:2]),
                        "secondaryUserIds": list(q.members[2:]),
                    }
                    for q in queues
                ]
            },
        )


def oauth_token_response() -> dict[str, Any]:
    return {"token_type": "bearer", "refresh_token": REFRESH_TOKEN, "access_token": OAUTH_RENEWED_TOKEN,
            "expires_in": 1800}  # fmt: skip


def mock_deals_with_companies(rsps: responses.RequestsMock, records: Mapping[str, Mapping[str, Any]]) -> None:
    """deals batch read, deal->company associations (v4 batch read) and companies batch read.
    Each deal with a company value is associated with company 9<deal id> as its primary company
    (plus an unlabeled second company 8<deal id> listed first); a None value = no company."""

    def read_deals(request: PreparedRequest) -> Answer:
        body = json_of(request)
        found = [
            simple_object(i["id"], {p: v for p, v in records[i["id"]].items() if "." not in p})
            for i in body["inputs"]
            if i["id"] in records
        ]
        missing = [i["id"] for i in body["inputs"] if i["id"] not in records]
        if missing:
            error = standard_error("OBJECT_NOT_FOUND", "Could not get some DEAL objects", missing, key="ids")
            return reply(207, batch_response(found, [error]))
        return reply(200, batch_response(found))

    def read_associations(request: PreparedRequest) -> Answer:
        results, errors = [], []
        for item in json_of(request)["inputs"]:
            if records.get(item["id"], {}).get("companies.credit_score") is None:
                errors.append(standard_error("NOT_FOUND", f"No company is associated with deal {item['id']}"))
                continue
            results.append(
                association_result(item["id"], [f"8{item['id']}", f"9{item['id']}"], f"9{item['id']}")
            )
        return reply(207 if errors else 200, batch_response(results, errors))

    def read_companies(request: PreparedRequest) -> Answer:
        found = []
        for item in json_of(request)["inputs"]:
            deal = records.get(item["id"][1:], {})
            if item["id"].startswith("9") and deal.get("companies.credit_score") is not None:
                found.append(simple_object(item["id"], {"credit_score": deal["companies.credit_score"]}))
        return reply(200, batch_response(found))

    rsps.add_callback(responses.POST, f"{API}/crm/v3/objects/deals/batch/read", read_deals)
    rsps.add_callback(
        responses.POST, f"{API}/crm/v4/associations/deals/companies/batch/read", read_associations
    )
    rsps.add_callback(responses.POST, f"{API}/crm/v3/objects/companies/batch/read", read_companies)


class HubSpotIntakeHarness(IntakeHarness):
    kind = "hubspot"
    env = PRIVATE_APP_ENV
    object_type = "deals"
    modified_by = "882761034"  # sourceId userId:882761034 of a change made in HubSpot
    path = "/webhooks/hubspot"

    def signed_delivery(self, record_id: str, event_id: str, timestamp: int) -> Delivery:
        return self._delivery(record_id, event_id, timestamp, CLIENT_SECRET)

    def forged_delivery(self, record_id: str, event_id: str, timestamp: int) -> Delivery:
        return self._delivery(record_id, event_id, timestamp, "0" * 36)

    def _delivery(self, record_id: str, event_id: str, timestamp: int, secret: str) -> Delivery:
        # HubSpot's eventId is a number: derive a stable one from the suite's event id.
        body = json.dumps([hubspot_event(record_id, zlib.crc32(event_id.encode()))]).encode()
        uri = Settings().public_base_url + self.path
        return Delivery(
            self.path, body, signed_headers(body, uri, timestamp_ms=timestamp * 1000, secret=secret)
        )


ADAPTER_HARNESS = HubSpotAdapterHarness()
INTAKE_HARNESS = HubSpotIntakeHarness()
