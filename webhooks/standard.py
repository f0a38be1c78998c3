"""Standard Webhooks intake (standardwebhooks.com), used by the sandbox CRM and by any
sender that follows the spec: headers webhook-id, webhook-timestamp, webhook-signature.

Body (ours, documented in docs/crms/sandbox.md):
    {"type": "record.updated", "timestamp": "2026-11-23T10:00:00Z",
     "data": {"object": "deal", "id": "D-1001", "changed_fields": ["amount"],
              "values": {"amount": 150000, ...}, "origin": "user"}}
"""

from __future__ import annotations

import hashlib
from typing import Any

from flask import Blueprint, request
from flask.typing import ResponseReturnValue

from connector.config import ConnectionConfig
from connector.events import CHANGE_TYPES, RecordChangeEvent, parse_timestamp
from webhooks.errors import bad_request
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
from webhooks.signatures import standard_secret_problem, verify_standard

blueprint = Blueprint("standard", __name__)
WEBHOOK_SECRET = SecretSetting(
    "WEBHOOK_SECRET",
    "/webhooks/standard",
    "the sender's whsec_ signing secret (`crm-approvals init` writes one for the sandbox)",
    several=True,
    check=standard_secret_problem,
)
SECRETS = (WEBHOOK_SECRET,)


@blueprint.post("/webhooks/standard")
def receive() -> ResponseReturnValue:
    connection = _connection()
    secrets = require_secret(connection, WEBHOOK_SECRET)
    require_content_type("application/json")
    # the headers straight from the WSGI environ, as request.headers.get reads them
    environ, body, receiver = request.environ, request.get_data(cache=True), intake()
    msg_id = environ.get("HTTP_WEBHOOK_ID")
    verify_standard(
        list(secrets),
        msg_id,
        environ.get("HTTP_WEBHOOK_TIMESTAMP"),
        environ.get("HTTP_WEBHOOK_SIGNATURE"),
        body,
        receiver.settings.webhook_tolerance_seconds,
    )
    assert msg_id is not None  # verify_standard refuses a delivery without one
    event = parse_standard(connection, msg_id, json_body(), hashlib.sha256(body).hexdigest())
    result = receiver.store([event])
    return stored_answer(result)


def _connection() -> ConnectionConfig:
    # The sandbox CRM is today's only Standard Webhooks sender.
    return resolve_connection("sandbox")


def parse_standard(
    connection: ConnectionConfig, msg_id: str, body: Any, content_hash: str | None = None
) -> RecordChangeEvent:
    if not isinstance(body, dict) or not isinstance(body.get("data"), dict):
        raise bad_request(
            "bad_payload", "expected an object with a `data` object", "see docs/crms/sandbox.md"
        )
    data = body["data"]
    object_type = _required_text(data, "object")
    record_id = _required_text(data, "id")
    change_type = str(body.get("type", "record.updated")).removeprefix("record.")
    if change_type not in CHANGE_TYPES:
        raise bad_request(
            "bad_payload", f"type {body.get('type')!r} is not record.{'|record.'.join(CHANGE_TYPES)}"
        )
    changed = data.get("changed_fields", [])
    values = data.get("values")
    if not isinstance(changed, list) or not all(isinstance(f, str) for f in changed):
        raise bad_request("bad_payload", "data.changed_fields must be a list of field names")
    if values is not None and not isinstance(values, dict):
        raise bad_request("bad_payload", "data.values must be an object of field -> value")
    try:
        occurred = parse_timestamp(body.get("timestamp"))
    except ValueError:
        raise bad_request("bad_payload", "timestamp must be ISO 8601 or Unix seconds") from None
    return record_change(
        connection,
        object_type=check_object(connection, object_type),
        record_id=record_id,
        event_id=msg_id,
        occurred_at=occurred,
        dedupe_id=f"std:{msg_id}",
        change_type=change_type,
        changed_fields=changed,
        values=values,
        origin=str(data["origin"]) if data.get("origin") is not None else None,
        modified_by=str(data["modified_by"]) if data.get("modified_by") not in (None, "") else None,
        values_signed=True,  # Standard Webhooks sign the id, timestamp and body
        # The spec's id is unique per message: the same id with another body is no redelivery.
        content_hash=content_hash,
    )


def _required_text(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str | int) or isinstance(value, bool) or str(value) == "":
        raise bad_request("bad_payload", f"data.{key} is required (a non-empty string)")
    return str(value)
