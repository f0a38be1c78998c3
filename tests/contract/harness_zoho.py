"""Zoho CRM in the contract suite: its documented wire formats, mocked with `responses`.

Shapes follow the Zoho CRM v6+ docs (update-records, get-records, field-meta, status codes,
notifications/enable, refresh token): see docs/crms/zoho.md for the sources. The helpers here
are reused by tests/crm/test_zoho.py.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

import responses
from requests import PreparedRequest

from connector.crm.base import CRMQueue
from tests.contract.harness import (
    AdapterHarness,
    CallLog,
    Delivery,
    FilesOnRecord,
    IntakeHarness,
    multipart_file,
)

Answer = tuple[int, dict[str, str], str]  # a `responses` callback's status, headers, body
ACCOUNTS_URL = "https://accounts.zoho.eu"
API_DOMAIN = "https://www.zohoapis.eu"
API = f"{API_DOMAIN}/crm/v6"
TOKEN_URL = f"{ACCOUNTS_URL}/oauth/v2/token"
NOTIFY_TOKEN = "TOKEN_FOR_VERIFICATION_OF_1000000068001"
WORKFLOW_SECRET = "wf-secret-7f3a9c"
CHANNEL_ID = "1000000068001"

ADAPTER_ENV = {
    "CRM_CONNECTIONS": "zoho",
    "ZOHO_CLIENT_ID": "1000.CLIENTID",
    "ZOHO_CLIENT_SECRET": "client-secret-value",
    "ZOHO_REFRESH_TOKEN": "1000.refresh.token",
    "ZOHO_DATA_CENTER": "eu",
}
INTAKE_ENV = {
    "CRM_CONNECTIONS": "zoho",
    "ZOHO_NOTIFY_TOKEN": NOTIFY_TOKEN,
    "ZOHO_WORKFLOW_SECRET": WORKFLOW_SECRET,
}

Reply = tuple[int, dict[str, str], str]


# --- documented bodies ------------------------------------------------------------------


def token_body(token: str = "1000.access.1", api_domain: str | None = API_DOMAIN) -> dict[str, Any]:
    body: dict[str, Any] = {"access_token": token, "scope": "ZohoCRM.modules.ALL", "token_type": "Bearer"}
    if api_domain:
        body["api_domain"] = api_domain
    body["expires_in"] = 3600
    return body


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"code": code, "details": {}, "message": message, "status": "error"}


def record_success(record_id: str) -> dict[str, Any]:
    user = {"name": "Patricia Boyle", "id": "554023000000235011"}
    details = {
        "Modified_Time": "2024-05-02T11:17:33+05:30",
        "Modified_By": user,
        "Created_Time": "2024-05-01T09:00:00+05:30",
        "id": record_id,
        "Created_By": user,
    }
    return {"code": "SUCCESS", "details": details, "message": "record updated", "status": "success"}


def record_invalid(api_name: str, index: int) -> dict[str, Any]:
    details = {
        "expected_data_type": "picklist",
        "api_name": api_name,
        "json_path": f"$.data[{index}].{api_name}",
    }
    return {"code": "INVALID_DATA", "details": details, "message": "invalid data", "status": "error"}


def record_locked() -> dict[str, Any]:
    message = "You cannot perform this operation as the record is locked."
    return {"code": "RECORD_LOCKED", "details": {}, "message": message, "status": "error"}


def updates_reply(items: list[dict[str, Any]]) -> Reply:
    """200 when every record succeeded, 207 Multi-Status when some did not."""
    status = 200 if all(i["code"] == "SUCCESS" for i in items) else 207
    return status, {}, json.dumps({"data": items})


def json_reply(status: int, body: Any, headers: dict[str, str] | None = None) -> Reply:
    return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(body)


def sent_ids(request: PreparedRequest) -> list[str]:
    return [str(item["id"]) for item in json.loads(request.body or b"{}")["data"]]


def query(request: PreparedRequest) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(request.url or "").query).items()}


# --- mock registration ------------------------------------------------------------------


def mock_token(
    rsps: responses.RequestsMock, url: str = TOKEN_URL, api_domain: str | None = API_DOMAIN
) -> None:
    """Zoho Accounts: a fresh access token per call (1000.access.1, .2, ...)."""
    counter = itertools.count(1)
    rsps.add_callback(
        responses.POST,
        url,
        callback=lambda _r: json_reply(200, token_body(f"1000.access.{next(counter)}", api_domain)),
    )


def mock_update_endpoint(
    rsps: responses.RequestsMock, reply: Callable[[PreparedRequest, int], Reply], module: str = "Deals"
) -> CallLog:
    """PUT {api}/{module}; `reply(request, call_number)` answers; the log keeps each call's ids."""
    log = CallLog()

    def callback(request: PreparedRequest) -> Reply:
        log.calls.append(sent_ids(request))
        return reply(request, len(log.calls))

    rsps.add_callback(responses.PUT, f"{API}/{module}", callback=callback)
    return log


def per_record_reply(fail: Mapping[str, str]) -> Callable[[PreparedRequest, int], Reply]:
    def reply(request: PreparedRequest, _call: int) -> Reply:
        items = []
        for index, record_id in enumerate(sent_ids(request)):
            outcome = fail.get(record_id)
            if outcome == "fatal":
                items.append(record_invalid("Approval_Status", index))
            elif outcome == "retriable":
                items.append(record_locked())
            else:
                items.append(record_success(record_id))
        return updates_reply(items)

    return reply


def first_then_ok(
    status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> Callable[..., Reply]:
    ok = per_record_reply({})

    def reply(request: PreparedRequest, call: int) -> Reply:
        return json_reply(status, body, headers) if call == 1 else ok(request, call)

    return reply


DEALS_FIELDS = {
    "fields": [
        {
            "api_name": "Deal_Name",
            "field_label": "Deal Name",
            "data_type": "text",
            "read_only": False,
            "field_read_only": False,
            "operation_type": {"api_update": True},
            "lookup": {},
            "json_type": "string",
        },
        {
            "api_name": "Amount",
            "field_label": "Amount",
            "data_type": "currency",
            "read_only": False,
            "field_read_only": False,
            "operation_type": {"api_update": True},
            "lookup": {},
            "json_type": "double",
        },
        {
            "api_name": "Stage",
            "field_label": "Stage",
            "data_type": "picklist",
            "read_only": False,
            "field_read_only": False,
            "operation_type": {"api_update": True},
            "lookup": {},
            "json_type": "string",
        },
        {
            "api_name": "Account_Name",
            "field_label": "Account Name",
            "data_type": "lookup",
            "read_only": False,
            "field_read_only": False,
            "operation_type": {"api_update": True},
            "json_type": "jsonobject",
            "lookup": {
                "display_label": "Account Name",
                "api_name": "Account_Name",
                "module": {"api_name": "Accounts", "id": "554023000000000131"},
                "id": "554023000000000523",
            },
        },
        {
            "api_name": "Owner",
            "field_label": "Deal Owner",
            "data_type": "ownerlookup",
            "read_only": False,
            "field_read_only": False,
            "operation_type": {"api_update": True},
            "lookup": {},
            "json_type": "jsonobject",
        },
        {
            "api_name": "Modified_Time",
            "field_label": "Modified Time",
            "data_type": "datetime",
            "read_only": True,
            "field_read_only": True,
            "operation_type": {"api_update": False},
            "lookup": {},
            "json_type": "string",
        },
    ]
}


def mock_fields(rsps: responses.RequestsMock, body: dict[str, Any] | None = None) -> None:
    rsps.add(responses.GET, f"{API}/settings/fields", json=body or DEALS_FIELDS)


def mock_module_records(
    rsps: responses.RequestsMock, module: str, records: Mapping[str, dict[str, Any]]
) -> None:
    """GET {api}/{module}?ids=..&fields=..: the asked records with the asked fields; 204 when none."""

    def callback(request: PreparedRequest) -> Reply:
        params = query(request)
        wanted = params.get("fields", "").split(",")
        found = [
            {"id": rid, **{f: values.get(f) for f in wanted if f != "id"}}
            for rid in params.get("ids", "").split(",")
            if (values := records.get(rid)) is not None
        ]
        if not found:
            return 204, {}, ""
        info = {"per_page": 200, "count": len(found), "page": 1, "more_records": False}
        return json_reply(200, {"data": found, "info": info})

    rsps.add_callback(responses.GET, f"{API}/{module}", callback=callback)


class ZohoAdapterHarness(AdapterHarness):
    kind = "zoho"
    object_type = "Deals"
    # Modified_By: a lookup object
    modified_by_sample = ({"name": "Patricia Boyle", "id": "554023000000235011"}, "554023000000235011")
    batch_limit = 100
    fatal_code = "INVALID_DATA"
    env = ADAPTER_ENV

    def record_ids(self, count: int) -> list[str]:
        return [str(5725767000000524000 + i) for i in range(count)]

    def mock_updates(self, rsps: responses.RequestsMock, fail: Mapping[str, str] | None = None) -> CallLog:
        mock_token(rsps)
        return mock_update_endpoint(rsps, per_record_reply(fail or {}))

    def mock_throttled_then_ok(self, rsps: responses.RequestsMock, retry_after: int) -> CallLog:
        mock_token(rsps)
        body = error_body("TOO_MANY_REQUESTS", "Too many requests, please try again after some time.")
        return mock_update_endpoint(rsps, first_then_ok(429, body, {"Retry-After": str(retry_after)}))

    def mock_server_error_then_ok(self, rsps: responses.RequestsMock) -> CallLog:
        mock_token(rsps)
        return mock_update_endpoint(
            rsps, first_then_ok(500, error_body("INTERNAL_ERROR", "Internal Server Error"))
        )

    def mock_auth_expired_then_ok(self, rsps: responses.RequestsMock) -> CallLog:
        mock_token(rsps)
        return mock_update_endpoint(
            rsps, first_then_ok(401, error_body("INVALID_TOKEN", "invalid oauth token"))
        )

    def mock_files(self, rsps: responses.RequestsMock, record_id: str) -> FilesOnRecord:
        """Zoho Attachments: POST /{module}/{id}/Attachments (multipart `file`) answers
        {"data": [{"code": "SUCCESS", "details": {"id", ...}, "message", "status"}]};
        DELETE /{module}/{id}/Attachments/{attachment id} removes one."""
        mock_token(rsps)
        attachments: dict[str, bytes] = {}
        numbers = itertools.count(1)
        base = f"{API}/{self.object_type}/{record_id}/Attachments"

        def upload(request: Any) -> Answer:
            _name, content = multipart_file(request)
            attachment_id = f"41508680000{next(numbers):08d}"
            attachments[attachment_id] = content
            details = {
                "Modified_Time": "2026-11-30T10:00:00+01:00",
                "Modified_By": {"name": "Integration", "id": "4150868000000225013"},
                "Created_Time": "2026-11-30T10:00:00+01:00",
                "id": attachment_id,
                "Created_By": {"name": "Integration", "id": "4150868000000225013"},
            }
            item = {
                "code": "SUCCESS",
                "details": details,
                "message": "attachment uploaded successfully",
                "status": "success",
            }
            return 200, {}, json.dumps({"data": [item]})

        def delete(request: Any) -> Answer:
            attachment_id = (request.url or "").rsplit("/", 1)[1]
            if attachments.pop(attachment_id, None) is None:
                return (
                    400,
                    {},
                    json.dumps(
                        {
                            "code": "INVALID_DATA",
                            "details": {},
                            "message": "the related id given seems to be invalid",
                            "status": "error",
                        }
                    ),
                )
            item = {
                "code": "SUCCESS",
                "details": {"id": attachment_id},
                "message": "record deleted",
                "status": "success",
            }
            return 200, {}, json.dumps({"data": [item]})

        rsps.add_callback(responses.POST, base, callback=upload, content_type="application/json")
        rsps.add_callback(
            responses.DELETE,
            re.compile(re.escape(base) + r"/\d+$"),
            callback=delete,
            content_type="application/json",
        )
        return FilesOnRecord(lambda: attachments)

    def mock_records(self, rsps: responses.RequestsMock, records: Mapping[str, Mapping[str, Any]]) -> None:
        mock_token(rsps)
        mock_fields(rsps)
        deals: dict[str, dict[str, Any]] = {}
        accounts: dict[str, dict[str, Any]] = {}
        for record_id, values in records.items():
            account_id = f"4150868000000{record_id[-6:]}"
            deals[record_id] = {k: v for k, v in values.items() if "." not in k}
            deals[record_id]["Account_Name"] = {"name": values.get("Account_Name.name"), "id": account_id}
            accounts[account_id] = {
                k.partition(".")[2]: v for k, v in values.items() if k.startswith("Account_Name.")
            }
        mock_module_records(rsps, "Deals", deals)
        mock_module_records(rsps, "Accounts", accounts)

    def sample_queues(self) -> list[CRMQueue]:
        members = tuple(f"55402300000023{n:04d}" for n in range(201))  # two pages of associated users
        return [
            CRMQueue("5725767000000623001", "Deal desk", members),
            CRMQueue("5725767000000623002", "Nobody yet", ()),
        ]

    def mock_queues(self, rsps: responses.RequestsMock, queues: Sequence[CRMQueue]) -> None:
        """GET settings/user_groups, then settings/user_groups/{id}/sources?type=users (each
        source `{"type": "users", "source": {"name", "id"}}`), both paged with page/per_page and
        info.more_records; a group without users answers 204."""
        mock_token(rsps)
        per_page = 200

        def query_of(request: PreparedRequest) -> dict[str, list[str]]:
            return parse_qs(urlsplit(request.url or "").query)

        def info(page: int, count: int, more: bool) -> dict[str, Any]:
            return {"per_page": per_page, "count": count, "page": page, "more_records": more}

        def groups(request: PreparedRequest) -> tuple[int, dict[str, str], str]:
            rows = [{"id": q.id, "name": q.name, "description": None} for q in queues]
            page = int(query_of(request)["page"][0])
            return 200, {}, json.dumps({"user_groups": rows, "info": info(page, len(rows), False)})

        def sources(request: PreparedRequest) -> tuple[int, dict[str, str], str]:
            query = query_of(request)
            assert query["type"] == ["users"], query
            group_id = (request.url or "").split("/user_groups/")[1].split("/")[0]
            members = next(q.members for q in queues if q.id == group_id)
            page = int(query["page"][0])
            chunk = members[(page - 1) * per_page : page * per_page]
            if not chunk:
                return 204, {}, ""
            rows = [
                {"type": "users", "source": {"name": f"User {m[-4:]}", "id": m}, "subordinates": False}
                for m in chunk
            ]
            more = page * per_page < len(members)
            return 200, {}, json.dumps({"sources": rows, "info": info(page, len(rows), more)})

        rsps.add_callback(responses.GET, f"{API}/settings/user_groups", callback=groups)
        rsps.add_callback(
            responses.GET,
            re.compile(re.escape(f"{API}/settings/user_groups/") + r"\d+/sources"),
            callback=sources,
        )

    unique_field = "Contract_Number"

    def mock_duplicate_query(
        self, rsps: responses.RequestsMock, value: str, rows: Mapping[str, str]
    ) -> list[str]:
        mock_token(rsps)
        seen: list[str] = []

        def search(request: PreparedRequest) -> Reply:
            params = query(request)  # Search API: GET /crm/v{n}/{module}/search?criteria=...
            assert params["criteria"] == f"(Contract_Number:equals:{value})", params
            seen.append(params["criteria"])
            data = [{"id": i, "Contract_Number": value} for i in rows]
            if not data:
                return 204, {}, ""
            return json_reply(
                200,
                {
                    "data": data,
                    "info": {"per_page": 200, "count": len(data), "page": 1, "more_records": False},
                },
            )

        rsps.add_callback(responses.GET, f"{API}/Deals/search", callback=search)
        return seen

    def sample_records(self) -> dict[str, dict[str, Any]]:
        return {
            "5725767000000524157": {
                "Deal_Name": "Zylker renewal",
                "Amount": 150000.0,
                "Stage": "Negotiation",
                "Account_Name.name": "Zylker",
                "Account_Name.Credit_Score": 720,
            },
            "5725767000000524158": {
                "Deal_Name": "Villa expansion",
                "Amount": 8200.5,
                "Stage": "Qualification",
                "Account_Name.name": "Villa Margarita",
                "Account_Name.Credit_Score": None,
            },
        }


def notification(
    record_id: str, server_time_ms: int, *, token: str = NOTIFY_TOKEN, **overrides: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "server_time": server_time_ms,
        "query_params": {},
        "module": "Deals",
        "resource_uri": f"{API}/Deals",
        "ids": [record_id],
        "affected_fields": [{record_id: ["Stage"]}],
        "operation": "update",
        "channel_id": CHANNEL_ID,
        "token": token,
    }
    body.update(overrides)
    return body


class ZohoIntakeHarness(IntakeHarness):
    kind = "zoho"
    env = INTAKE_ENV
    object_type = "Deals"

    def signed_delivery(self, record_id: str, event_id: str, timestamp: int) -> Delivery:
        return self._delivery(notification(record_id, timestamp * 1000))

    def forged_delivery(self, record_id: str, event_id: str, timestamp: int) -> Delivery:
        return self._delivery(notification(record_id, timestamp * 1000, token="TOKEN_GUESSED_BY_SOMEONE"))

    @staticmethod
    def _delivery(body: dict[str, Any]) -> Delivery:
        return Delivery(
            "/webhooks/zoho/notify", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )


ADAPTER_HARNESS = ZohoAdapterHarness()
INTAKE_HARNESS = ZohoIntakeHarness()
