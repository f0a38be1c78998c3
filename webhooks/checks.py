"""POST /webhooks/checks/<callback id>: an external service's asynchronous answer to a
`kind: check` step with `answer: callback` (issue 12, docs/mappings.md#service-steps).

The body is a JSON object; `X-Check-Timestamp` (Unix seconds) and `X-Check-Signature`
(`sha256=` + hex HMAC-SHA256 over `<timestamp>.<body>` with the secret in the step's
`callback_secret_env`) are verified in constant time within the timestamp window, with the
same helpers as every webhook intake. The callback id is unguessable; the first verified answer
decides, and a verified redelivery of an answered check gets 200 and changes nothing.
"""

from __future__ import annotations

import json

from flask import Blueprint, jsonify, request
from flask.typing import ResponseReturnValue

from connector.service import service_steps
from webhooks.errors import WebhookError, bad_request, unauthorized
from webhooks.intake import intake
from webhooks.signatures import check_timestamp, constant_time_equals, hmac_sha256

blueprint = Blueprint("checks", __name__)
TIMESTAMP_HEADER = "X-Check-Timestamp"
SIGNATURE_HEADER = "X-Check-Signature"


def sign_callback(secret: str, timestamp: int, body: bytes) -> str:
    """The X-Check-Signature value (for services and tests)."""
    return "sha256=" + hmac_sha256(secret.encode(), f"{timestamp}.".encode() + body).hex()


@blueprint.post("/webhooks/checks/<callback_id>")
def check_answer(callback_id: str) -> ResponseReturnValue:
    runtime = intake().runtime
    try:
        pending = service_steps.pending_callback(runtime, callback_id[:100])
    except service_steps.CallbackRefused as exc:
        raise WebhookError(
            404, "no_such_check", exc.message, "use the callback URL the request carried"
        ) from exc
    secret = runtime.settings.variables.get(pending.secret_env, "")
    if not secret:
        raise WebhookError(
            503,
            "callback_secret_missing",
            f"the secret variable {pending.secret_env} is not set",
            "set it in the environment or .env of this server",
        )
    body = request.get_data(cache=True)
    timestamp = check_timestamp(
        request.headers.get(TIMESTAMP_HEADER),
        runtime.settings.webhook_tolerance_seconds,
        header=TIMESTAMP_HEADER,
    )
    given = request.headers.get(SIGNATURE_HEADER, "")
    if not constant_time_equals(given, sign_callback(secret, timestamp, body)):
        raise unauthorized(
            "bad_signature",
            f"{SIGNATURE_HEADER} does not match the body",
            "sign `<timestamp>.<body>` with HMAC-SHA256 and the shared secret; send sha256=<hex>",
        )
    if pending.done:  # the service sent it again (it missed our answer): nothing changes
        return jsonify(accepted=False, outcome="this check was answered already; nothing changed"), 200
    try:
        answer = json.loads(body)
    except ValueError as exc:
        raise bad_request("malformed_json", "the body is not JSON", "send a JSON object") from exc
    if not isinstance(answer, dict):
        raise bad_request("malformed_json", "the body is not a JSON object", 'send e.g. {"verdict": "clear"}')
    note = service_steps.accept_callback(runtime, pending, answer)
    return jsonify(accepted=True, outcome=note), 202
