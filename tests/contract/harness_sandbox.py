"""The sandbox CRM for the contract suite: its REST API (adapter) and its Standard Webhooks (intake).

Answers are built with the sandbox app's own helpers (error_body, result_item, webhook_body,
signed_headers), so these mocks cannot drift from what the sandbox really sends;
tests/sandbox/test_sandbox.py checks the real app answers in exactly these shapes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs, urlparse, urlsplit

import pytest
import responses
from requests import PreparedRequest

from connector.crm.base import CRMQueue
from connector.sandbox.app import error_body, result_item, signed_headers
from connector.sandbox.store import INVALID_VALUE, RECORD_LOCKED, RecordError, webhook_body
from tests.conftest import SANDBOX_SECRET
from tests.contract.harness import (
    AdapterHarness,
    CallLog,
    Delivery,
    FilesOnRecord,
    IntakeHarness,
    multipart_file,
)

SANDBOX_URL = "http://127.0.0.1:8001"
API_TOKEN = "sandbox-test-token-5b0e1c"
ENV = {
    "CRM_CONNECTIONS": "sandbox",
    "SANDBOX_API_TOKEN": API_TOKEN,
    "SANDBOX_WEBHOOK_SECRET": SANDBOX_SECRET,
    "SANDBOX_URL": SANDBOX_URL,
}
UPDATE_URL = f"{SANDBOX_URL}/api/v1/objects/deal/batch-update"
READ_URL = f"{SANDBOX_URL}/api/v1/objects/deal/batch-read"
JSON = {"Content-Type": "application/json"}

Answer = tuple[int, dict[str, str], str]


def fatal_error(field: str = "amount") -> RecordError:
    return RecordError(INVALID_VALUE, f"{field}: 'lots' is not a number", field)


def locked_error(record_id: str) -> RecordError:
    return RecordError(RECORD_LOCKED, f"deal {record_id!r} is locked by a user until 2026-11-23T10:01:00Z")


def update_answer(request: PreparedRequest, fail: Mapping[str, str] | None = None) -> Answer:
    """batch-update's 200: one result per record, in order."""
    results = [result_item(i, record_error(i, (fail or {}).get(i))) for i in ids_in(request)]
    return 200, JSON, json.dumps({"results": results})


def record_error(record_id: str, kind: str | None) -> RecordError | None:
    if kind == "fatal":
        return fatal_error()
    if kind == "retriable":
        return locked_error(record_id)
    return None


def error_answer(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> Answer:
    return status, {**JSON, **(headers or {})}, json.dumps(error_body(code, message))


def ids_in(request: PreparedRequest) -> list[str]:
    return [r["id"] for r in json.loads(request.body or b"{}")["records"]]


class SandboxAdapterHarness(AdapterHarness):
    kind = "sandbox"
    object_type = "deal"
    modified_by_sample = ("u-mgr", "u-mgr")  # modified_by_id: a user id
    batch_limit = 100
    fatal_code = INVALID_VALUE
    env = ENV

    def record_ids(self, count: int) -> list[str]:
        return [f"D-{2000 + i}" for i in range(count)]

    def mock_updates(self, rsps: responses.RequestsMock, fail: Mapping[str, str] | None = None) -> CallLog:
        log = CallLog()

        def answer(request: PreparedRequest) -> Answer:
            assert request.headers["Authorization"] == f"Bearer {API_TOKEN}"
            log.calls.append(ids_in(request))
            return update_answer(request, fail)

        rsps.add_callback(responses.POST, UPDATE_URL, callback=answer)
        return log

    def mock_throttled_then_ok(self, rsps: responses.RequestsMock, retry_after: int) -> CallLog:
        message = "more than 5 API calls per second"
        return self._first_then_ok(
            rsps, error_answer(429, "RATE_LIMITED", message, {"Retry-After": str(retry_after)})
        )

    def mock_server_error_then_ok(self, rsps: responses.RequestsMock) -> CallLog:
        return self._first_then_ok(
            rsps, error_answer(503, "BUSY", "the sandbox store is busy", {"Retry-After": "1"})
        )

    def mock_auth_expired_then_ok(self, rsps: responses.RequestsMock) -> CallLog:
        pytest.skip(
            "the sandbox's API token is static and cannot be refreshed: a 401 means "
            "SANDBOX_API_TOKEN differs from the sandbox's (refresh_auth returns False)"
        )

    def mock_files(self, rsps: responses.RequestsMock, record_id: str) -> FilesOnRecord:
        """The sandbox's files (connector/sandbox/attachments.py): POST .../attachments makes one
        (201 {"id", "version": 1}); POST .../attachments/<id>/versions adds a version."""
        latest: dict[str, bytes] = {}
        base = f"{SANDBOX_URL}/api/v1/objects/deal/{record_id}/attachments"

        def create(request: PreparedRequest) -> Answer:
            attachment_id = f"ATT-{len(latest) + 1:012x}"  # never deleted here: the count is unique
            latest[attachment_id] = multipart_file(request)[1]
            return 201, JSON, json.dumps({"id": attachment_id, "version": 1})

        def version(request: PreparedRequest) -> Answer:
            attachment_id = (request.url or "").split("/attachments/")[1].split("/")[0]
            if attachment_id not in latest:
                return error_answer(
                    404, "NOT_FOUND", f"deal {record_id!r} has no attachment {attachment_id!r}"
                )
            latest[attachment_id] = multipart_file(request)[1]
            return 201, JSON, json.dumps({"id": attachment_id, "version": 2})

        rsps.add_callback(responses.POST, base, callback=create)
        rsps.add_callback(responses.POST, re.compile(re.escape(base) + r"/[^/]+/versions$"), callback=version)
        return FilesOnRecord(lambda: latest)

    def mock_records(self, rsps: responses.RequestsMock, records: Mapping[str, Mapping[str, Any]]) -> None:
        def answer(request: PreparedRequest) -> Answer:
            asked = json.loads(request.body or b"{}")
            found = [
                {"id": i, "fields": {name: records[i].get(name) for name in asked["fields"]}}
                for i in asked["ids"]
                if i in records
            ]
            missing = [i for i in asked["ids"] if i not in records]
            return 200, JSON, json.dumps({"records": found, "not_found": missing})

        rsps.add_callback(responses.POST, READ_URL, callback=answer)

    def sample_queues(self) -> list[CRMQueue]:
        return [
            CRMQueue("q-finance", "Finance desk", ("u-fin-dmitri", "u-gm-carla")),
            CRMQueue("q-empty", "Nobody yet", ()),
        ]

    def mock_queues(self, rsps: responses.RequestsMock, queues: Sequence[CRMQueue]) -> None:
        """The sandbox's object query (GET /api/v1/objects/queue), one record per page to page."""

        def answer(request: PreparedRequest) -> Answer:
            cursor = parse_qs(urlsplit(request.url or "").query).get("cursor", ["0"])[0]
            index = int(cursor)
            q = queues[index]
            record = {"id": q.id, "fields": {"name": q.name, "members": ";".join(q.members) or None}}
            next_cursor = str(index + 1) if index + 1 < len(queues) else None
            return 200, JSON, json.dumps({"records": [record], "next_cursor": next_cursor})

        rsps.add_callback(responses.GET, f"{SANDBOX_URL}/api/v1/objects/queue", callback=answer)

    unique_field = "name"

    def mock_duplicate_query(
        self, rsps: responses.RequestsMock, value: str, rows: Mapping[str, str]
    ) -> list[str]:
        seen: list[str] = []

        def answer(request: PreparedRequest) -> Answer:
            params = parse_qs(urlparse(request.url or "").query)  # GET /api/v1/objects/deal?filter[f]=v
            assert params["filter[name]"] == [value], params
            seen.append(request.url or "")
            records = [{"id": i, "fields": {"name": name}} for i, name in rows.items()]
            return 200, JSON, json.dumps({"records": records, "next_cursor": None})

        rsps.add_callback(responses.GET, f"{SANDBOX_URL}/api/v1/objects/deal", callback=answer)
        return seen

    def sample_records(self) -> dict[str, dict[str, Any]]:
        return {
            "D-1001": {
                "amount": 185000,
                "currency": "EUR",
                "product_lines": ["Software", "Services"],
                "approval_status": "Not submitted",
                "company.credit_score": 742,
            },
            "D-1002": {
                "amount": 42000.5,
                "currency": "GBP",
                "product_lines": ["Hardware"],
                "approval_status": "Approved",
                "company.credit_score": 561,
            },
        }

    def _first_then_ok(self, rsps: responses.RequestsMock, first: Answer) -> CallLog:
        log = CallLog()

        def answer(request: PreparedRequest) -> Answer:
            log.calls.append(ids_in(request))
            return first if len(log.calls) == 1 else update_answer(request)

        rsps.add_callback(responses.POST, UPDATE_URL, callback=answer)
        return log


def sandbox_delivery(record_id: str, event_id: str, timestamp: int, secret: str) -> Delivery:
    """A delivery exactly as the sandbox sends it after a user edits a deal."""
    record = {
        "id": record_id,
        "name": "Northwind ERP roll-out",
        "amount": 150000,
        "company.credit_score": 742,
        "modified_by_id": "u-rep",  # the user the page edited as
    }
    body = webhook_body("deal", record, ["amount"], "user", "2026-11-23T10:00:00.000000Z")
    return Delivery("/webhooks/standard", body, signed_headers([secret], event_id, timestamp, body))


class SandboxIntakeHarness(IntakeHarness):
    kind = "sandbox"
    env = ENV
    object_type = "deal"
    modified_by = "u-rep"  # data.modified_by: the user the sandbox page edited as

    def signed_delivery(self, record_id: str, event_id: str, timestamp: int) -> Delivery:
        return sandbox_delivery(record_id, event_id, timestamp, SANDBOX_SECRET)

    def forged_delivery(self, record_id: str, event_id: str, timestamp: int) -> Delivery:
        return sandbox_delivery(record_id, event_id, timestamp, "whsec_" + "Zm9yZ2VkLWtleS0xMjM0NTY3ODkw")


ADAPTER_HARNESS = SandboxAdapterHarness()
INTAKE_HARNESS = SandboxIntakeHarness()
