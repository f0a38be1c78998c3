"""Adapter for the built-in sandbox CRM (connector/sandbox, API in docs/crms/sandbox.md).

A bearer token that never expires; batch calls of at most 100 records, answered with one
result per record. Webhooks of API writes carry origin "api", which is how we recognise
our own write-backs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import date, datetime
from decimal import Decimal
from typing import Any, ClassVar
from urllib.parse import quote

import requests

from connector.config import ConnectionConfig, Settings
from connector.crm.base import (
    CRMAdapter,
    CRMQueue,
    CRMUser,
    FieldInfo,
    FileUpload,
    RecordUpdate,
    UpdateResult,
)
from connector.crm.errors import FatalError, NotFoundError
from connector.crm.http import json_error_reader, raise_for_status, send
from connector.crm.retry import RetryPolicy
from connector.events import RecordChangeEvent

# Per-record codes worth another try later; every other per-record code is final.
RETRIABLE_RECORD_CODES = frozenset({"RECORD_LOCKED"})


def read_sandbox_error(response: requests.Response) -> tuple[str | None, str]:
    """The sandbox answers errors as {"error": {"code", "message", "hint"?}}."""
    try:
        error = response.json()["error"]
        return str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        return json_error_reader(response)


class SandboxAdapter(CRMAdapter):
    kind = "sandbox"
    batch_limit = 100
    last_modified_by_field: ClassVar[str | None] = "modified_by_id"
    page_size = 200  # records per query page: the API's maximum

    def __init__(
        self,
        connection: ConnectionConfig,
        *,
        base_url: str,
        api_token: str,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        session: requests.Session | None = None,
    ) -> None:
        super().__init__(connection, timeout=timeout, retry=retry)
        self.base_url = base_url.rstrip("/")
        self.session = session or requests.Session()
        self.session.headers["Authorization"] = f"Bearer {api_token}"

    @classmethod
    def from_config(cls, connection: ConnectionConfig, settings: Settings) -> SandboxAdapter:
        return cls(
            connection,
            base_url=connection.get("URL") or settings.sandbox_url,
            api_token=connection.require("API_TOKEN"),
            timeout=settings.http_timeout_seconds,
        )

    def is_own_change(self, event: RecordChangeEvent) -> bool | None:
        """The sandbox marks API writes (ours: it has no other API client) origin "api"."""
        return {"api": True, "user": False}.get(event.origin or "")

    def refresh_auth(self) -> bool:
        return False  # a static token: a 401 means SANDBOX_API_TOKEN differs from the sandbox's

    def _fetch(
        self, object_type: str, ids: Sequence[str], fields: Sequence[str]
    ) -> dict[str, dict[str, Any]]:
        body = self._request(
            "POST",
            f"{self._objects(object_type)}/batch-read",
            json={"ids": list(ids), "fields": list(fields)},
        )
        return {item["id"]: item["fields"] for item in body["records"]}

    def _update_batch(self, object_type: str, updates: Sequence[RecordUpdate]) -> list[UpdateResult]:
        records = [
            {"id": u.record_id, "fields": {k: _jsonable(v) for k, v in u.fields.items()}} for u in updates
        ]
        body = self._request("POST", f"{self._objects(object_type)}/batch-update", json={"records": records})
        results = body.get("results")
        if not isinstance(results, list) or [r.get("id") for r in results] != [u.record_id for u in updates]:
            raise FatalError(
                f"the sandbox answered results that do not match the {len(updates)} records sent"
            )
        return [_result(item) for item in results]

    def _query_page(
        self, object_type: str, fields: Sequence[str], filters: Mapping[str, Any], cursor: Any
    ) -> tuple[list[dict[str, Any]], Any]:
        params: dict[str, str] = {"limit": str(self.page_size)}
        if fields:
            params["fields"] = ",".join(fields)
        for name, value in filters.items():
            if name == "modified_since":
                params["modified_since"] = value.isoformat()
            else:
                params[f"filter[{name}]"] = "" if value is None else str(_jsonable(value))
        if cursor:
            params["cursor"] = cursor
        body = self._request("GET", self._objects(object_type), params=params)
        return [{"id": r["id"], **r["fields"]} for r in body["records"]], body.get("next_cursor")

    def _users_page(self, cursor: Any) -> tuple[list[CRMUser], Any]:
        """The sandbox's `user` object, read with the same paged query as any object."""
        fields = ["name", "email", "locale", "manager_id", "active"]
        rows, next_cursor = self._query_page("user", fields, {}, cursor)
        users = [
            CRMUser(
                id=str(row["id"]),
                name=row.get("name") or str(row["id"]),
                email=row.get("email") or None,
                locale=row.get("locale") or None,
                manager_id=row.get("manager_id") or None,
                active=row.get("active") is not False,
            )
            for row in rows
        ]
        return users, next_cursor

    def _queues(self) -> list[CRMQueue]:
        """The sandbox's `queue` object (members: ;-separated user ids), every page."""
        queues: list[CRMQueue] = []
        cursor: Any = None
        while True:
            rows, cursor = self._query_page("queue", ["name", "members"], {}, cursor)
            queues.extend(
                CRMQueue(
                    id=str(row["id"]),
                    name=str(row.get("name") or row["id"]),
                    members=tuple(m.strip() for m in str(row.get("members") or "").split(";") if m.strip()),
                )
                for row in rows
            )
            if cursor is None:
                return queues

    def describe(self, object_type: str) -> list[FieldInfo]:
        body = self._call(lambda: self._request("GET", f"{self._objects(object_type)}/describe"))
        return [
            FieldInfo(
                name=f["name"],
                label=f["label"],
                type=f["type"],
                updateable=bool(f["updateable"]),
                reference_to=tuple(f.get("reference_to") or ()),
                relationship_name=f.get("relationship_name"),
                extra={"required": f.get("required", False), "values": f.get("values", [])},
            )
            for f in body["fields"]
        ]

    def attach_file(self, object_type: str, record_id: str, file: FileUpload, replaces: str | None) -> str:
        """A new version of the same attachment when there is one (a version history, as
        Salesforce Files); a new attachment the first time or when someone deleted it."""
        base = f"{self._objects(object_type)}/{quote(record_id, safe='')}/attachments"
        upload = {"file": (file.filename, file.content, file.content_type)}
        if replaces is not None:
            try:
                body = self._call(
                    lambda: self._request(
                        "POST",
                        f"{base}/{quote(replaces, safe='')}/versions",
                        files=upload,
                        data={"title": file.title},
                    ),
                    idempotent=False,
                )
                return str(body["id"])
            except NotFoundError:
                pass  # deleted in the CRM: start a new one
        body = self._call(
            lambda: self._request("POST", base, files=upload, data={"title": file.title}), idempotent=False
        )
        return str(body["id"])

    def _objects(self, object_type: str) -> str:
        return f"{self.base_url}/api/v1/objects/{quote(object_type, safe='')}"

    def _request(self, method: str, url: str, **kwargs: Any) -> Any:
        response = send(self.session, method, url, self.timeout, **kwargs)
        raise_for_status(response, read_sandbox_error)
        return response.json()


def _result(item: Mapping[str, Any]) -> UpdateResult:
    if item.get("ok"):
        return UpdateResult.success(item["id"])
    error = item.get("error") or {}
    code = error.get("code")
    return UpdateResult(
        record_id=item["id"],
        ok=False,
        error_code=code,
        message=error.get("message"),
        fields=(error["field"],) if error.get("field") else (),
        retriable=code in RETRIABLE_RECORD_CODES,
    )


def _jsonable(value: Any) -> Any:
    """Values the approval engine may hand us, as the sandbox's JSON takes them."""
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    return value
