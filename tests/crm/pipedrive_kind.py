"""A throwaway fifth CRM kind, written by following docs/crms/adding-a-crm.md, for
tests/crm/test_registry.py. A real one would be two modules, connector/crm/pipedrive.py
(the adapter) and webhooks/pipedrive.py (the intake); here both halves share this file.

Nothing outside this file and one row in connector.crm.registry.KINDS (which the test adds
at run time) knows about it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import requests
from flask import Blueprint, request
from flask.typing import ResponseReturnValue

from connector.config import ConnectionConfig, Settings
from connector.crm.base import CRMAdapter, CRMUser, FieldInfo, RecordUpdate, UpdateResult
from connector.crm.http import json_error_reader, raise_for_status, send
from connector.events import parse_timestamp
from webhooks.errors import bad_request, unauthorized
from webhooks.intake import (
    SecretSetting,
    check_object,
    intake,
    json_body,
    record_change,
    require_content_type,
    require_secret,
    resolve_connection,
    stored_answer,
)
from webhooks.signatures import constant_time_equals

KIND = "pipedrive"

# --- the adapter (connector/crm/pipedrive.py) --------------------------------------------


class PipedriveAdapter(CRMAdapter):
    """Pipedrive API v1 with an API token: one record per read and per write."""

    kind: ClassVar[str] = KIND
    batch_limit: ClassVar[int] = 1

    def __init__(self, connection: ConnectionConfig, base_url: str, api_token: str, timeout: float) -> None:
        super().__init__(connection, timeout=timeout)
        self.base_url = base_url
        self.session = requests.Session()
        self.session.params = {"api_token": api_token}

    @classmethod
    def from_config(cls, connection: ConnectionConfig, settings: Settings) -> PipedriveAdapter:
        domain = connection.require("COMPANY_DOMAIN")
        return cls(
            connection,
            f"https://{domain}.pipedrive.com/api/v1",
            connection.require("API_TOKEN"),
            settings.http_timeout_seconds,
        )

    def _get(self, path: str, **params: Any) -> Any:
        response = send(self.session, "GET", f"{self.base_url}/{path}", self.timeout, params=params)
        raise_for_status(response, json_error_reader)  # our retriable/fatal errors
        return response.json()["data"]

    def _fetch(
        self, object_type: str, ids: Sequence[str], fields: Sequence[str]
    ) -> dict[str, dict[str, Any]]:
        found = {}
        for record_id in ids:
            record = self._get(f"{object_type}/{record_id}")
            if record is not None:
                found[record_id] = {name: record.get(name) for name in fields}
        return found

    def _update_batch(self, object_type: str, updates: Sequence[RecordUpdate]) -> list[UpdateResult]:
        results = []
        for update in updates:
            url = f"{self.base_url}/{object_type}/{update.record_id}"
            response = send(self.session, "PUT", url, self.timeout, json=dict(update.fields))
            ok = response.ok and response.json().get("success") is True
            results.append(
                UpdateResult.success(update.record_id)
                if ok
                else UpdateResult(update.record_id, False, str(response.status_code), response.text[:200])
            )
        return results

    def _query_page(
        self, object_type: str, fields: Sequence[str], filters: Mapping[str, Any], cursor: Any
    ) -> tuple[list[dict[str, Any]], Any]:
        records = self._get(object_type, start=cursor or 0, limit=100) or []
        page = [{name: r.get(name) for name in fields} for r in records]
        return page, (cursor or 0) + len(records) if len(records) == 100 else None

    def _users_page(self, cursor: Any) -> tuple[list[CRMUser], Any]:
        # GET /v1/users answers every user at once: {"data": [{"id", "name", "email", "locale",
        # "active_flag"}, ...]}; Pipedrive has no manager field.
        users = [
            CRMUser(
                str(u["id"]), u["name"], u.get("email"), u.get("locale"), None, bool(u.get("active_flag"))
            )
            for u in self._get("users") or []
        ]
        return users, None

    def describe(self, object_type: str) -> list[FieldInfo]:
        fields = self._get(f"{object_type.rstrip('s')}Fields")
        return [FieldInfo(name=f["key"], label=f["name"], type=f["field_type"]) for f in fields]


# --- the intake (webhooks/pipedrive.py) ----------------------------------------------------

blueprint = Blueprint(KIND, __name__)
WEBHOOK_PASSWORD = SecretSetting(
    "WEBHOOK_PASSWORD", "/webhooks/pipedrive", "the HTTP Basic password set on the Pipedrive webhook"
)
SECRETS = (WEBHOOK_PASSWORD,)
ACTIONS = {"create": "created", "change": "updated", "delete": "deleted"}


@blueprint.post("/webhooks/pipedrive")
def receive() -> ResponseReturnValue:
    """Webhooks v2: {"meta": {"action", "entity", "entity_id", "id", "timestamp"}, "data", "previous"}."""
    connection = resolve_connection(KIND)
    [password] = require_secret(connection, WEBHOOK_PASSWORD)
    require_content_type("application/json")
    offered = request.authorization.password if request.authorization else None
    if not offered or not constant_time_equals(offered, password):
        raise unauthorized("bad_password", "the Basic auth password is missing or wrong")
    body = json_body()
    meta = body.get("meta") if isinstance(body, dict) else None
    if not isinstance(meta, dict) or meta.get("action") not in ACTIONS:
        raise bad_request("bad_payload", "expected {meta: {action: create|change|delete, ...}, data, ...}")
    previous = body.get("previous") or {}
    event = record_change(
        connection,
        object_type=check_object(connection, f"{meta.get('entity')}s"),
        record_id=str(meta.get("entity_id")),
        event_id=str(meta.get("id")),
        occurred_at=parse_timestamp(meta.get("timestamp")),
        dedupe_id=f"pipedrive:{meta.get('id')}",
        change_type=ACTIONS[meta["action"]],
        changed_fields=list(previous),
        values=body.get("data"),
        values_signed=False,  # Basic auth vouches for the sender, not the body's values
    )
    result = intake().store([event])
    return stored_answer(result)
