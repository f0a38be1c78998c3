"""Bitrix24 for the contract suite, plus the fake portal tests/crm/test_bitrix24.py reuses.

Wire formats (docs/crms/bitrix24.md has the sources): REST calls are form POSTs to
https://<portal>/rest/<method> (OAuth, `auth=<token>` in the body) or to the inbound webhook
URL + <method>; `batch` takes halt=0 and cmd[key]="method?urlencoded query" and answers
{"result": {"result": {key: ...}, "result_error": {key: {error, error_description}}, ...}};
an empty PHP array arrives as []. Events are form posts with PHP-style keys.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode

import responses

from connector.crm.base import CRMQueue
from tests.contract.harness import AdapterHarness, CallLog, Delivery, FilesOnRecord, IntakeHarness

PORTAL = "example.bitrix24.com"
REST = f"https://{PORTAL}/rest/"
WEBHOOK_CODE = "s3cr3tw3bh00kc0de"
WEBHOOK_URL = f"https://{PORTAL}/rest/1/{WEBHOOK_CODE}/"
TOKEN_URL = "https://oauth.bitrix.info/oauth/token/"
APPLICATION_TOKEN = "51856fefc120afa4b628cc82d3935cce"
MEMBER_ID = "a223c6b3710f85df22e9377d6c4f7553"
CLIENT_ID = "local.65f1c2d3e4a5b6.12345678"
CLIENT_SECRET = "LJSl0lNB76B5YY6u0YVQ3AW0DrVADcRTwVr4y99PXU1BWQybWK"
ACCESS_TOKEN = "s6p6eclrvim6da22ft9ch94ekreb52lv"
REFRESH_TOKEN = "4s386p3q0tr8dy89xvmt96234v3dljg8"

OAUTH_ENV = {
    "CRM_CONNECTIONS": "bitrix24",
    "BITRIX24_DOMAIN": PORTAL,
    "BITRIX24_CLIENT_ID": CLIENT_ID,
    "BITRIX24_CLIENT_SECRET": CLIENT_SECRET,
    "BITRIX24_REFRESH_TOKEN": REFRESH_TOKEN,
    "BITRIX24_ACCESS_TOKEN": ACCESS_TOKEN,
    "BITRIX24_APPLICATION_TOKEN": APPLICATION_TOKEN,
    "BITRIX24_FILE_FIELD_APPROVAL_SHEET": "UF_CRM_10_SHEET",
}
FILE_FIELD = "UF_CRM_10_SHEET"
WEBHOOK_ENV = {
    "CRM_CONNECTIONS": "bitrix24",
    "BITRIX24_WEBHOOK_URL": WEBHOOK_URL,
    "BITRIX24_APPLICATION_TOKEN": APPLICATION_TOKEN,
}

# The `time` block every documented answer carries.
TIME = {
    "start": 1724916859.42,
    "finish": 1724916859.47,
    "duration": 0.05,
    "processing": 0.01,
    "date_start": "2024-08-29T10:34:19+02:00",
    "date_finish": "2024-08-29T10:34:19+02:00",
    "operating": 0,
}
NOT_FOUND_CLASSIC = {"error": "", "error_description": "Not found"}  # crm.deal.get / crm.deal.update
NOT_FOUND_ITEM = {"error": "NOT_FOUND", "error_description": "Element not found"}  # crm.item.*
FIELD_NOT_VALID = {
    "error": "CRM_FIELD_ERROR_VALUE_NOT_VALID",
    "error_description": 'Invalid value for field "Approval_Status"',
}
OPERATION_TIME_LIMIT = {
    "error": "OPERATION_TIME_LIMIT",
    "error_description": "Method is blocked due to operation time limit",
}
QUERY_LIMIT = {"error": "QUERY_LIMIT_EXCEEDED", "error_description": "Too many requests"}
EXPIRED = {"error": "expired_token", "error_description": "The access token provided has expired"}
INTERNAL = {"error": "INTERNAL_SERVER_ERROR", "error_description": "Internal server error"}

CLASSIC = {"crm.deal": "deal", "crm.company": "company", "crm.contact": "contact"}


def form_of(body: Any) -> dict[str, str]:
    text = body.decode() if isinstance(body, bytes) else (body or "")
    return dict(parse_qsl(text, keep_blank_values=True))


def nested_fields(params: Mapping[str, str], prefix: str = "fields") -> dict[str, str]:
    """fields[X]=1 -> {"X": "1"} (one level, as our write-back sends them)."""
    pattern = re.compile(rf"^{prefix}\[([^\]]+)\]$")
    return {m[1]: v for k, v in params.items() if (m := pattern.match(k))}


def batch_commands(form: Mapping[str, str]) -> dict[str, tuple[str, dict[str, str]]]:
    """cmd[key]=method?query -> {key: (method, params)}, decoding the inner query once more."""
    commands: dict[str, tuple[str, dict[str, str]]] = {}
    for name, value in form.items():
        if match := re.fullmatch(r"cmd\[([^\]]+)\]", name):
            method, _, query = value.partition("?")
            commands[match[1]] = (method, dict(parse_qsl(query, keep_blank_values=True)))
    return commands


def batch_answer(results: Mapping[str, Any], errors: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "result": {
            "result": dict(results) or [],
            "result_error": dict(errors) or [],
            "result_total": [],
            "result_next": [],
            "result_time": [],
        },
        "time": TIME,
    }


@dataclass
class FakePortal:
    """A Bitrix24 portal answering get/update (single and in `batch`) in the documented formats.

    `records`: object (deal, company, dynamic_1032) -> id -> fields. `update_errors`: record id
    -> the error object its update command gets. `outages`: (status, body) answers for the
    next HTTP calls, before anything else. With `access_token` set (OAuth), a call carrying
    another token gets 401 expired_token.
    """

    records: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    update_errors: dict[str, dict[str, str]] = field(default_factory=dict)
    access_token: str | None = None
    outages: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    base: str = REST
    http_calls: list[str] = field(default_factory=list)  # method per HTTP request
    updates: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)  # (method, id, fields)
    batch_log: CallLog = field(default_factory=CallLog)  # record ids per batch HTTP call, refused ones too
    forms: list[dict[str, str]] = field(default_factory=list)

    def register(self, rsps: responses.RequestsMock) -> None:
        rsps.add_callback(
            responses.POST, re.compile(re.escape(self.base) + r"[\w.]+$"), callback=self.respond
        )

    def respond(self, request: Any) -> tuple[int, dict[str, str], str]:
        method = request.url.removeprefix(self.base)
        form = form_of(request.body)
        self.http_calls.append(method)
        self.forms.append(form)
        if method == "batch":
            self.batch_log.calls.append([p.get("id", "") for _, p in batch_commands(form).values()])
        if self.outages:
            status, body = self.outages.pop(0)
            return status, {}, json.dumps(body)
        if self.access_token is not None and form.get("auth") != self.access_token:
            return 401, {}, json.dumps(EXPIRED)
        if method == "batch":
            return 200, {}, json.dumps(self.run_batch(form))
        status, body = self.run(method, form)
        return status, {}, json.dumps({"result": body, "time": TIME} if status == 200 else body)

    def run_batch(self, form: Mapping[str, str]) -> dict[str, Any]:
        assert form.get("halt") == "0", "write-back must not halt on one record's error"
        commands = batch_commands(form)
        assert len(commands) <= 50, "Bitrix24 refuses more than 50 commands per batch"
        results: dict[str, Any] = {}
        errors: dict[str, Any] = {}
        for key, (method, params) in commands.items():
            status, body = self.run(method, params)
            (results if status == 200 else errors)[key] = body
        return batch_answer(results, errors)

    def run(self, method: str, params: Mapping[str, str]) -> tuple[int, Any]:
        family, _, action = method.rpartition(".")
        object_name = CLASSIC.get(family) or f"dynamic_{params.get('entityTypeId')}"
        record_id = params.get("id", "")
        if action == "update":
            return self.update(method, object_name, record_id, params)
        if action == "get":
            return self.get(object_name, record_id, item=family == "crm.item")
        return 404, {"error": "ERROR_METHOD_NOT_FOUND", "error_description": "Method not found!"}

    def get(self, object_name: str, record_id: str, *, item: bool) -> tuple[int, Any]:
        record = self.records.get(object_name, {}).get(record_id)
        if record is None:
            return 400, NOT_FOUND_ITEM if item else NOT_FOUND_CLASSIC
        if item:
            return 200, {"item": {"id": int(record_id), **record}}
        return 200, {"ID": record_id, **record}

    def update(
        self, method: str, object_name: str, record_id: str, params: Mapping[str, str]
    ) -> tuple[int, Any]:
        if record_id in self.update_errors:
            return 400, self.update_errors[record_id]
        fields = nested_fields(params)
        self.updates.append((method, record_id, fields))
        self.records.setdefault(object_name, {}).setdefault(record_id, {}).update(fields)
        if method == "crm.item.update":
            return 200, {"item": {"id": int(record_id), **self.records[object_name][record_id]}}
        return 200, True


def register_token_endpoint(
    rsps: responses.RequestsMock, refresh_token: str, new_access: str, new_refresh: str
) -> None:
    """oauth.bitrix.info answering a documented refresh_token grant."""
    rsps.add(
        responses.GET,
        TOKEN_URL,
        match=[
            responses.matchers.query_param_matcher(
                {
                    "grant_type": "refresh_token",
                    "client_id": CLIENT_ID,
                    "client_secret": CLIENT_SECRET,
                    "refresh_token": refresh_token,
                }
            )
        ],
        json={
            "access_token": new_access,
            "client_endpoint": REST,
            "domain": "oauth.bitrix.info",
            "expires_in": 3600,
            "member_id": MEMBER_ID,
            "refresh_token": new_refresh,
            "scope": "app",
            "server_endpoint": "https://oauth.bitrix.info/rest/",
            "status": "L",
        },
    )


class Bitrix24AdapterHarness(AdapterHarness):
    sends_retry_after = False
    # A smart process: crm.item.update documents a coded validation error; classic
    # crm.deal.update errors carry an empty code (tests/crm/test_bitrix24.py covers deals).
    kind = "bitrix24"
    object_type = "dynamic_1032"
    modified_by_sample = ("7", "7")  # updatedBy of a smart-process item (MODIFY_BY_ID on deals)
    batch_limit = 50
    read_batch_limit = 50  # commands per `batch` call
    fatal_code = "CRM_FIELD_ERROR_VALUE_NOT_VALID"
    env = OAUTH_ENV

    def mock_updates(self, rsps: responses.RequestsMock, fail: Mapping[str, str] | None = None) -> CallLog:
        errors = {"fatal": FIELD_NOT_VALID, "retriable": OPERATION_TIME_LIMIT}
        portal = FakePortal(access_token=ACCESS_TOKEN)
        portal.update_errors = {rid: errors[kind] for rid, kind in (fail or {}).items()}
        portal.register(rsps)
        return portal.batch_log

    def mock_throttled_then_ok(self, rsps: responses.RequestsMock, retry_after: int) -> CallLog:
        # Bitrix24 documents QUERY_LIMIT_EXCEEDED (503) without a Retry-After: policy backoff applies.
        portal = FakePortal(access_token=ACCESS_TOKEN, outages=[(503, QUERY_LIMIT)])
        portal.register(rsps)
        return portal.batch_log

    def mock_server_error_then_ok(self, rsps: responses.RequestsMock) -> CallLog:
        portal = FakePortal(access_token=ACCESS_TOKEN, outages=[(500, INTERNAL)])
        portal.register(rsps)
        return portal.batch_log

    def mock_auth_expired_then_ok(self, rsps: responses.RequestsMock) -> CallLog:
        portal = FakePortal(access_token="renewed-access-token")  # the configured token has expired
        portal.register(rsps)
        register_token_endpoint(rsps, REFRESH_TOKEN, "renewed-access-token", "renewed-refresh-token")
        return portal.batch_log

    def mock_files(self, rsps: responses.RequestsMock, record_id: str) -> FilesOnRecord:
        """A single-file "File" user field: crm.item.update with fields[UF][fileData] = [name,
        base64] stores the new file and drops the old one (the documented behaviour)."""
        portal = FakePortal(access_token=ACCESS_TOKEN)
        portal.records.setdefault(self.object_type, {})[record_id] = {"title": "Acme renewal"}
        portal.register(rsps)
        key = f"fields[{FILE_FIELD}][fileData][1]"

        def shown() -> dict[str, bytes]:
            stored = [form[key] for form in portal.forms if key in form and form.get("id") == record_id]
            return {FILE_FIELD: base64.b64decode(stored[-1])} if stored else {}

        return FilesOnRecord(shown)

    def mock_records(self, rsps: responses.RequestsMock, records: Mapping[str, Mapping[str, Any]]) -> None:
        portal = FakePortal(access_token=ACCESS_TOKEN)
        for record_id, values in records.items():
            portal.records.setdefault(self.object_type, {})[record_id] = {
                k: v for k, v in values.items() if "." not in k
            }
            for name, value in values.items():
                if name.startswith("companyId."):
                    company = portal.records.setdefault("company", {}).setdefault(
                        str(values["companyId"]), {}
                    )
                    company[name.partition(".")[2]] = value
        portal.register(rsps)

    def sample_queues(self) -> list[CRMQueue]:
        return [
            CRMQueue("1", "Company", ("1",)),
            CRMQueue("5", "Sales", tuple(str(n) for n in range(2, 60))),  # more than one page of users
            CRMQueue("9", "Sales EU", ("7", "12")),
            CRMQueue("11", "Empty", ()),
        ]

    def mock_queues(self, rsps: responses.RequestsMock, queues: Sequence[CRMQueue]) -> None:
        """department.get (ID, NAME, PARENT, UF_HEAD) and user.get (UF_DEPARTMENT: ids), each
        paged 50 at a time with `start` / `next`."""
        departments = [{"ID": q.id, "NAME": q.name, "SORT": 500, "UF_HEAD": "0"} for q in queues]
        user_ids = sorted({m for q in queues for m in q.members}, key=int)
        users = [
            {"ID": u, "ACTIVE": True, "NAME": f"User {u}", "LAST_NAME": "",
             "UF_DEPARTMENT": [int(q.id) for q in queues if u in q.members]}
            for u in user_ids
        ]  # fmt: skip

        def paged(rows: list[dict[str, Any]], start: int) -> dict[str, Any]:
            body: dict[str, Any] = {"result": rows[start : start + 50], "total": len(rows), "time": TIME}
            if start + 50 < len(rows):
                body["next"] = start + 50
            return body

        def answer(request: Any) -> tuple[int, dict[str, str], str]:
            method = request.url.removeprefix(REST)
            form = form_of(request.body)
            start = int(form.get("start") or 0)
            if method == "department.get":
                return 200, {}, json.dumps(paged(departments, start))
            if method == "user.get":
                return 200, {}, json.dumps(paged(users, start))
            return (
                404,
                {},
                json.dumps({"error": "ERROR_METHOD_NOT_FOUND", "error_description": "Method not found!"}),
            )

        rsps.add_callback(responses.POST, re.compile(re.escape(REST) + r"[\w.]+$"), callback=answer)

    unique_field = "ufCrm5_ContractNumber"  # a smart-process field (crm.item.*: camelCase names)

    def mock_duplicate_query(
        self, rsps: responses.RequestsMock, value: str, rows: Mapping[str, str]
    ) -> list[str]:
        seen: list[str] = []

        def listing(request: Any) -> tuple[int, dict[str, str], str]:
            form = form_of(request.body)  # crm.item.list: entityTypeId, filter[field]=value, select[], start
            assert (form["entityTypeId"], form["filter[ufCrm5_ContractNumber]"]) == ("1032", value), form
            seen.append(request.url)
            items = [
                {"id": int(i), "title": name, "ufCrm5_ContractNumber": value} for i, name in rows.items()
            ]
            answer = {"result": {"items": items}, "total": len(items), "time": TIME}
            return 200, {"Content-Type": "application/json"}, json.dumps(answer)

        rsps.add_callback(responses.POST, f"{REST}crm.item.list", callback=listing)
        return seen

    def sample_records(self) -> dict[str, dict[str, Any]]:
        return {
            "1001": {
                "title": "Acme renewal",
                "opportunity": 150000,
                "companyId": 77,
                "companyId.UF_CRM_CREDIT_SCORE": "720",
            },
            "1002": {
                "title": "Globex pilot",
                "opportunity": 9000,
                "companyId": 78,
                "companyId.UF_CRM_CREDIT_SCORE": "610",
            },
        }


def event_form(
    record_id: str,
    timestamp: int,
    *,
    event: str = "ONCRMDEALUPDATE",
    token: str = APPLICATION_TOKEN,
    domain: str = PORTAL,
    extra: Mapping[str, str] | None = None,
) -> bytes:
    """A documented outbound-webhook delivery, form-encoded with PHP-style keys."""
    pairs = [
        ("event", event),
        ("event_handler_id", "201"),
        ("data[FIELDS][ID]", record_id),
        *(extra or {}).items(),
        ("ts", str(timestamp)),
        ("auth[domain]", domain),
        ("auth[client_endpoint]", f"https://{domain}/rest/"),
        ("auth[server_endpoint]", "https://oauth.bitrix.info/rest/"),
        ("auth[member_id]", MEMBER_ID),
        ("auth[application_token]", token),
    ]
    return urlencode(pairs).encode()


FORM_HEADERS = {"Content-Type": "application/x-www-form-urlencoded"}


class Bitrix24IntakeHarness(IntakeHarness):
    kind = "bitrix24"
    env = WEBHOOK_ENV
    object_type = "deal"

    # Bitrix24 has no delivery id (event_id is unused): a redelivery is the same event, id and ts.
    def signed_delivery(self, record_id: str, event_id: str, timestamp: int) -> Delivery:
        return Delivery("/webhooks/bitrix24", event_form(record_id, timestamp), dict(FORM_HEADERS))

    def forged_delivery(self, record_id: str, event_id: str, timestamp: int) -> Delivery:
        body = event_form(record_id, timestamp, token="0" * len(APPLICATION_TOKEN))
        return Delivery("/webhooks/bitrix24", body, dict(FORM_HEADERS))


ADAPTER_HARNESS = Bitrix24AdapterHarness()
INTAKE_HARNESS = Bitrix24IntakeHarness()
