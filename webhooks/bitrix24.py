"""Bitrix24 intake: outbound webhooks and app event handlers (docs/crms/bitrix24.md).

Bitrix24 posts application/x-www-form-urlencoded with PHP-style keys:
    event=ONCRMDEALUPDATE&event_handler_id=201&data[FIELDS][ID]=759&ts=1736405807
    &auth[domain]=example.bitrix24.com&auth[member_id]=...&auth[application_token]=...
Smart-process events add data[FIELDS][ENTITY_TYPE_ID]. Only the id arrives, so the event
carries no values and the worker reads the record through the adapter.
"""

from __future__ import annotations

from datetime import UTC, datetime

from flask import Blueprint, request
from flask.typing import ResponseReturnValue
from werkzeug.datastructures import MultiDict

from connector.config import ConnectionConfig
from connector.crm.bitrix24 import DYNAMIC_PREFIX
from connector.events import RecordChangeEvent
from webhooks.errors import WebhookError, bad_request, unauthorized
from webhooks.intake import (
    SecretSetting,
    accepted_objects,
    check_object,
    intake,
    record_change,
    require_content_type,
    require_secret,
    resolve_connection,
    stored_answer,
    whole_number,
)
from webhooks.signatures import check_timestamp, constant_time_equals

blueprint = Blueprint("bitrix24", __name__)

KIND = "bitrix24"
FORM = "application/x-www-form-urlencoded"
SMART_PROCESS = "smart_process"  # in NAME_OBJECTS: accept every smart process (dynamic_<id>)
APPLICATION_TOKEN = SecretSetting(
    "APPLICATION_TOKEN",
    "/webhooks/bitrix24",
    "the outbound webhook's application token (or your app's, from ONAPPINSTALL)",
    several=True,
)
SECRETS = (APPLICATION_TOKEN,)

# event -> (object, change type); None = a smart process named by data[FIELDS][ENTITY_TYPE_ID].
EVENTS: dict[str, tuple[str | None, str]] = {
    "ONCRMDEALADD": ("deal", "created"),
    "ONCRMDEALUPDATE": ("deal", "updated"),
    "ONCRMCOMPANYADD": ("company", "created"),
    "ONCRMCOMPANYUPDATE": ("company", "updated"),
    "ONCRMCONTACTADD": ("contact", "created"),
    "ONCRMCONTACTUPDATE": ("contact", "updated"),
    "ONCRMDYNAMICITEMADD": (None, "created"),
    "ONCRMDYNAMICITEMUPDATE": (None, "updated"),
}


@blueprint.post("/webhooks/bitrix24")
def receive() -> ResponseReturnValue:
    connection = resolve_connection(KIND)
    expected = require_secret(connection, APPLICATION_TOKEN)
    require_content_type(FORM)
    form = request.form
    verify_application_token(connection, expected, form.get("auth[application_token]"))
    verify_portal(connection, form.get("auth[domain]"))
    event = parse_event(connection, form, intake().settings.webhook_tolerance_seconds)
    result = intake().store([event])
    # Always 200: Bitrix24 never redelivers, and a redelivery we drop is still a success.
    return stored_answer(result, 200)


def verify_application_token(
    connection: ConnectionConfig, expected: tuple[str, ...], offered: str | None
) -> None:
    """auth[application_token] against NAME_APPLICATION_TOKEN (comma-separated: several
    outbound webhooks, or a rotation), in constant time."""
    if not offered:
        raise unauthorized(
            "missing_token",
            "the form field auth[application_token] is missing",
            "Bitrix24 sends it with every event; is this URL bound as a Bitrix24 event handler?",
        )
    matches = [constant_time_equals(token, offered) for token in expected]  # no early exit
    if not any(matches):
        raise WebhookError(
            403,
            "bad_token",
            "auth[application_token] does not match this connection's application token",
            f"set {connection.env_prefix}APPLICATION_TOKEN to the token shown for the outbound webhook",
        )


def verify_portal(connection: ConnectionConfig, domain: str | None) -> None:
    """When NAME_DOMAIN is set, the event must come from that portal."""
    expected = connection.get("DOMAIN")
    if expected is None:
        return
    wanted = expected.strip().lower().removeprefix("https://").strip("/")
    if (domain or "").strip().lower() != wanted:
        raise WebhookError(
            403,
            "wrong_portal",
            f"auth[domain] {(domain or '')[:100]!r} is not this connection's portal",
            f"events for {connection.name!r} must come from {wanted} ({connection.env_prefix}DOMAIN)",
        )


def parse_event(connection: ConnectionConfig, form: MultiDict[str, str], tolerance: int) -> RecordChangeEvent:
    # `ts` is not signed: a window on it is defence in depth against replays, not authentication.
    raw_ts = required(form, "ts")
    name = required(form, "event").upper()
    ts = check_timestamp(raw_ts, tolerance, header="ts")
    if name not in EVENTS:
        raise WebhookError(
            422,
            "unsupported_event",
            f"event {name[:80]!r} is not handled here",
            f"supported: {', '.join(EVENTS)}; bind only these events to this URL",
        )
    object_name, change_type = EVENTS[name]
    record_id = positive_int(form, "data[FIELDS][ID]")
    if object_name is None:
        object_name = f"{DYNAMIC_PREFIX}{positive_int(form, 'data[FIELDS][ENTITY_TYPE_ID]')}"
    object_type = accepted_object(connection, object_name)
    # Bitrix24 gives no delivery id: event + object + id + send time identify one delivery.
    event_id = f"{name}:{object_type}:{record_id}:{ts}"
    return record_change(
        connection,
        object_type=object_type,
        record_id=record_id,
        event_id=event_id,
        occurred_at=datetime.fromtimestamp(ts, UTC),
        dedupe_id=event_id,
        change_type=change_type,
        changed_fields=(),  # only the id is sent: the worker fetches the record
        values=None,
        origin=None,  # Bitrix24 events do not say who made the change; see the adapter's is_own_change
        values_signed=False,  # the application token is not a signature (and no values are sent)
    )


def accepted_object(connection: ConnectionConfig, object_name: str) -> str:
    """check_object, where `smart_process` in the accepted list admits every dynamic_<id>."""
    try:
        return check_object(connection, object_name)
    except WebhookError:
        allowed = accepted_objects(connection)
        if object_name.startswith(DYNAMIC_PREFIX) and SMART_PROCESS in (a.lower() for a in allowed):
            return object_name
        raise


def required(form: MultiDict[str, str], key: str) -> str:
    value = (form.get(key) or "").strip()
    if not value:
        raise bad_request(
            "bad_payload",
            f"the form field {key} is missing",
            "Bitrix24 CRM events carry event, ts, data[FIELDS][ID] and auth[...]; see docs/crms/bitrix24.md",
        )
    return value


def positive_int(form: MultiDict[str, str], key: str) -> str:
    value = required(form, key)
    number = whole_number(value)
    if not number:
        raise bad_request("bad_payload", f"{key} must be a positive whole number, got {value[:40]!r}")
    return str(number)
