"""Zoho CRM intake: Notification API callbacks and workflow-rule webhooks (docs/crms/zoho.md).

Notification callback (JSON, POST /webhooks/zoho/notify), as documented for `actions/watch`:
    {"server_time": 1718117126473, "query_params": {}, "module": "Deals",
     "resource_uri": "https://www.zohoapis.com/crm/v6/Deals", "ids": ["5725767000003000064"],
     "affected_fields": [{"5725767000003000064": ["Stage"]}], "operation": "update",
     "affected_values": [{"record_id": "5725767000003000064", "values": {"Stage": "Closed Won"}}],
     "channel_id": "1000000068001", "token": "<the channel's token>"}
Authenticated only by the echoed `token` (NOTIFY_TOKEN); server_time is not signed, it only
narrows the replay window. Zoho sends no delivery id, so the dedupe key is
connection + channel_id + server_time + record id.

Workflow webhook (POST /webhooks/zoho/workflow, form-urlencoded, multipart or JSON), the
parameters an admin configures: crm_approvals_secret (WORKFLOW_SECRET), module, id,
modified_time (required: it is the dedupe key), optional modified_by, and any merge fields
named by their API names (Amount=${Deals.Amount}), which become the event's values.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from flask import Blueprint, request
from flask.typing import ResponseReturnValue

from connector.clock import utcnow
from connector.config import ConnectionConfig
from connector.events import RecordChangeEvent, parse_timestamp
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
    whole_number,
)
from webhooks.signatures import check_timestamp, constant_time_equals

blueprint = Blueprint("zoho", __name__)

KIND = "zoho"
NOTIFY_TOKEN = SecretSetting(
    "NOTIFY_TOKEN",
    "/webhooks/zoho/notify",
    "the token your Notification API channel sends (actions/watch `token`)",
    several=True,
)
WORKFLOW_SECRET = SecretSetting(
    "WORKFLOW_SECRET",
    "/webhooks/zoho/workflow",
    "the value your workflow webhooks send as crm_approvals_secret",
    several=True,
)
SECRETS = (NOTIFY_TOKEN, WORKFLOW_SECRET)
OPERATIONS = {"insert": "created", "update": "updated", "delete": "deleted"}
SECRET_PARAM = "crm_approvals_secret"
RESERVED_PARAMS = frozenset({SECRET_PARAM, "module", "id", "modified_time", "modified_by"})
SCALARS = (str, int, float, bool, type(None))
DOCS = "see docs/crms/zoho.md"


@blueprint.post("/webhooks/zoho/notify")
def receive_notification() -> ResponseReturnValue:
    connection = resolve_connection(KIND)
    expected = require_secret(connection, NOTIFY_TOKEN)
    require_content_type("application/json")
    body = json_body()
    if not isinstance(body, dict):
        raise bad_request("bad_payload", "expected a Zoho notification object", DOCS)
    check_token(connection, NOTIFY_TOKEN, expected, body.get("token"), "token")
    server_time = _server_time(body)
    check_timestamp(server_time, intake().settings.webhook_tolerance_seconds, header="server_time")
    return _store(parse_notification(connection, body))


@blueprint.post("/webhooks/zoho/workflow")
def receive_workflow() -> ResponseReturnValue:
    connection = resolve_connection(KIND)
    expected = require_secret(connection, WORKFLOW_SECRET)
    require_content_type("application/x-www-form-urlencoded", "multipart/form-data", "application/json")
    params = _workflow_params()
    check_token(connection, WORKFLOW_SECRET, expected, params.get(SECRET_PARAM), SECRET_PARAM)
    return _store([parse_workflow(connection, params)])


def _store(events: list[RecordChangeEvent]) -> ResponseReturnValue:
    result = intake().store(events)
    return stored_answer(result)


# --- authentication -------------------------------------------------------------------


def check_token(
    connection: ConnectionConfig, setting: SecretSetting, expected: tuple[str, ...], offered: Any, where: str
) -> None:
    """The shared value Zoho echoes back, compared in constant time with every configured one
    (comma-separated, for rotation). Neither value ever appears in the answer or the log."""
    if not isinstance(offered, str) or not offered:
        raise unauthorized(
            "missing_token", f"the delivery has no {where}", f"configure {where} in Zoho; {DOCS}"
        )
    if not any(constant_time_equals(offered, value) for value in expected):
        raise unauthorized(
            "bad_token",
            f"{where} does not match this connection's {setting.name}",
            f"Zoho must send the value of {connection.env_prefix}{setting.name}",
        )


def _server_time(body: dict[str, Any]) -> str:
    value = body.get("server_time")
    if whole_number(value) is None:
        raise bad_request(
            "bad_payload", f"server_time must be milliseconds since the epoch, got {str(value)[:40]!r}", DOCS
        )
    return str(value).strip()


# --- notification callbacks -----------------------------------------------------------


def parse_notification(connection: ConnectionConfig, body: dict[str, Any]) -> list[RecordChangeEvent]:
    object_type = check_object(connection, _text(body, "module"))
    change_type = _change_type(body.get("operation"))
    channel_id = _text(body, "channel_id")
    server_time = str(body["server_time"]).strip()
    occurred = _timestamp(server_time, "server_time")
    ids = _record_ids(body.get("ids"))
    fields = _affected_fields(body.get("affected_fields"), ids)
    values = _affected_values(body.get("affected_values"))
    return [
        record_change(
            connection,
            object_type=object_type,
            record_id=record_id,
            event_id=f"{channel_id}:{server_time}:{record_id}",
            occurred_at=occurred,
            dedupe_id=f"notify:{channel_id}:{server_time}:{record_id}",
            change_type=change_type,
            changed_fields=fields.get(record_id, ()) if change_type != "deleted" else (),
            values=values.get(record_id),
            origin=None,  # notifications do not say who made the change
            values_signed=False,  # Zoho signs nothing: the token is echoed in the body it vouches for
        )
        for record_id in ids
    ]


def _change_type(operation: Any) -> str:
    if not isinstance(operation, str) or operation not in OPERATIONS:
        raise bad_request(
            "bad_payload", f"operation {str(operation)[:40]!r} is not one of {', '.join(OPERATIONS)}", DOCS
        )
    return OPERATIONS[operation]


def _record_ids(raw: Any) -> list[str]:
    if not isinstance(raw, list) or not raw or not all(_is_id(i) for i in raw):
        raise bad_request("bad_payload", "ids must be a non-empty list of record ids", DOCS)
    return list(dict.fromkeys(str(i) for i in raw))


def _affected_fields(raw: Any, ids: list[str]) -> dict[str, tuple[str, ...]]:
    """Record id -> changed API names. Zoho sends one {id: [fields]} object per record; a flat
    list of names (applying to every id) is accepted too."""
    if raw is None:
        return {}
    if isinstance(raw, list) and all(isinstance(name, str) for name in raw):
        return dict.fromkeys(ids, tuple(raw))
    if not isinstance(raw, list) or not all(isinstance(item, dict) for item in raw):
        raise bad_request("bad_payload", "affected_fields must be a list of {record id: [field names]}", DOCS)
    fields: dict[str, tuple[str, ...]] = {}
    for item in raw:
        for record_id, names in item.items():
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise bad_request(
                    "bad_payload", f"affected_fields[{record_id}] must be a list of field names"
                )
            fields[str(record_id)] = tuple(names)
    return fields


def _affected_values(raw: Any) -> dict[str, dict[str, Any]]:
    """Record id -> values, present when the channel has return_affected_field_values."""
    if raw is None:
        return {}
    shaped = isinstance(raw, list) and all(
        isinstance(item, dict) and _is_id(item.get("record_id")) and isinstance(item.get("values"), dict)
        for item in raw
    )
    if not shaped:
        raise bad_request("bad_payload", "affected_values must be a list of {record_id, values}", DOCS)
    return {str(item["record_id"]): dict(item["values"]) for item in raw}


# --- workflow webhooks ----------------------------------------------------------------


def _workflow_params() -> dict[str, Any]:
    if request.mimetype == "application/json":
        body = json_body()
        if not isinstance(body, dict) or not all(isinstance(v, SCALARS) for v in body.values()):
            raise bad_request("bad_payload", "expected a flat JSON object of parameter -> value", DOCS)
        return body
    return request.form.to_dict(flat=True)


def parse_workflow(connection: ConnectionConfig, params: dict[str, Any]) -> RecordChangeEvent:
    object_type = check_object(connection, _text(params, "module"))
    record_id = _text(params, "id")
    modified_time = _text(
        params, "modified_time", hint="add the parameter modified_time = ${<Module>.Modified Time} in Zoho"
    )
    modified_by = params.get("modified_by")
    values = {k: v for k, v in params.items() if k not in RESERVED_PARAMS}
    return record_change(
        connection,
        object_type=object_type,
        record_id=record_id,
        event_id=f"workflow:{object_type}:{record_id}:{modified_time}",
        occurred_at=_modified_at(modified_time),
        dedupe_id=f"workflow:{object_type}:{record_id}:{modified_time}",
        change_type="updated",
        changed_fields=(),  # a workflow says which values it sends, not which ones changed
        values=values,
        origin=str(modified_by).strip() if modified_by not in (None, "") else None,
        values_signed=False,  # a shared value in the body, no signature: the worker re-reads the record
        # A hint only (unsigned): the worker reads Modified_By before trusting anyone's vote.
        modified_by=str(modified_by) if modified_by not in (None, "") else None,
    )


def _modified_at(raw: str) -> datetime:
    # Merge fields render in the org's display format; when that is not ISO 8601 the string
    # still serves as the dedupe key and the receipt time stands in for the change time.
    try:
        return parse_timestamp(raw)
    except ValueError:
        return utcnow()


# --- small readers --------------------------------------------------------------------


def _text(data: dict[str, Any], key: str, *, hint: str = DOCS) -> str:
    value = data.get(key)
    if not _is_id(value):
        raise bad_request("bad_payload", f"{key} is required (a non-empty string)", hint)
    return str(value).strip()


def _is_id(value: Any) -> bool:
    return isinstance(value, str | int) and not isinstance(value, bool) and str(value).strip() != ""


def _timestamp(raw: str, key: str) -> datetime:
    try:
        return parse_timestamp(raw)
    except (ValueError, OverflowError, OSError):
        raise bad_request("bad_payload", f"{key} is not a timestamp: {raw[:40]!r}", DOCS) from None
