"""HubSpot webhooks intake: POST /webhooks/hubspot[?connection=NAME].

HubSpot POSTs a JSON array of up to 100 events, signed with X-HubSpot-Signature-v3 =
base64(HMAC-SHA256(client secret, method + URI + raw body + X-HubSpot-Request-Timestamp)).
Events about the same record in one delivery are coalesced into one canonical event.
Formats, dedupe key and set-up: docs/crms/hubspot.md.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, request
from flask.typing import ResponseReturnValue

from connector.config import ConnectionConfig
from connector.crm.hubspot import MIXED_ORIGIN
from connector.events import RecordChangeEvent
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
from webhooks.signatures import check_timestamp, constant_time_equals, hmac_sha256

KIND = "hubspot"
SIGNATURE_HEADER = "X-HubSpot-Signature-v3"
TIMESTAMP_HEADER = "X-HubSpot-Request-Timestamp"
# HubSpot computes the v3 signature over the URI with exactly these characters decoded.
DECODED_IN_URI = {
    "%3A": ":", "%2F": "/", "%3F": "?", "%40": "@", "%21": "!", "%24": "$",
    "%27": "'", "%28": "(", "%29": ")", "%2A": "*", "%2C": ",", "%3B": ";",
}  # fmt: skip
ENCODED_IN_URI = re.compile("|".join(DECODED_IN_URI), re.IGNORECASE)
# subscriptionType prefix (legacy `deal.propertyChange`) -> CRM v3 object name.
OBJECT_NAMES = {"deal": "deals", "company": "companies", "contact": "contacts", "ticket": "tickets"}
# objectTypeId of generic `object.*` subscriptions -> CRM v3 object name.
OBJECT_TYPE_IDS = {"0-1": "contacts", "0-2": "companies", "0-3": "deals", "0-5": "tickets"}
CHANGE_TYPES = {
    "creation": "created",
    "propertyChange": "updated",
    "associationChange": "updated",
    "merge": "updated",
    "deletion": "deleted",
    "privacyDeletion": "deleted",
    "restore": "undeleted",
}
MAX_ORIGIN = 64  # inbox column width
MAX_EVENT_ID = 300

blueprint = Blueprint(KIND, __name__)
CLIENT_SECRET = SecretSetting(
    "CLIENT_SECRET", "/webhooks/hubspot", "the HubSpot app's client secret (it signs every webhook)"
)
SECRETS = (CLIENT_SECRET,)


@dataclass(frozen=True)
class HubSpotEvent:
    """One item of a delivery, checked."""

    object_type: str  # CRM v3 name
    record_id: str
    event_id: str
    occurred_at_ms: int
    change_type: str
    subscription_type: str
    property_name: str | None
    property_value: Any
    sensitive: bool
    origin: str | None
    modified_by: str | None = None  # the HubSpot user id of sourceId `userId:123`

    @property
    def fingerprint(self) -> str:
        # attemptNumber is left out on purpose: it is what changes when HubSpot retries.
        return f"{self.subscription_type}|{self.event_id}|{self.occurred_at_ms}|{self.property_name or ''}"


@blueprint.post("/webhooks/hubspot")
def receive() -> ResponseReturnValue:
    connection = resolve_connection(KIND)
    [secret] = require_secret(connection, CLIENT_SECRET)
    require_content_type("application/json")
    verify_signature(connection, secret, request.get_data(cache=True))
    events = parse_delivery(connection, json_body())
    result = intake().store(events)
    return stored_answer(result)


# --- signature --------------------------------------------------------------------------


def verify_signature(connection: ConnectionConfig, secret: str, body: bytes) -> None:
    offered = request.headers.get(SIGNATURE_HEADER)
    if not offered:
        raise unauthorized(
            "missing_signature",
            f"the {SIGNATURE_HEADER} header is missing",
            "only signature v3 is accepted; HubSpot sends it with every webhook request",
        )
    timestamp = request.headers.get(TIMESTAMP_HEADER, "")
    check_timestamp(timestamp, intake().settings.webhook_tolerance_seconds, header=TIMESTAMP_HEADER)
    expected = sign_v3(secret, request.method, signed_uri(intake().settings.public_base_url), body, timestamp)
    if not constant_time_equals(expected, offered.strip()):
        raise unauthorized(
            "bad_signature",
            f"{SIGNATURE_HEADER} does not match this request",
            f"check {connection.env_prefix}CLIENT_SECRET and that PUBLIC_BASE_URL + /webhooks/hubspot "
            "is exactly the target URL configured in HubSpot (scheme, host, path and query)",
        )


def sign_v3(secret: str, method: str, uri: str, body: bytes, timestamp: str) -> str:
    """base64(HMAC-SHA256(secret, method + uri + body + timestamp)), as HubSpot signs (also used by tests)."""
    message = method.encode() + uri.encode() + body + timestamp.encode()
    return base64.b64encode(hmac_sha256(secret.encode(), message)).decode()


def signed_uri(public_base_url: str) -> str:
    """The URI as HubSpot called it: our public base URL (we may sit behind a proxy) + path and query."""
    path = request.full_path if request.query_string else request.path
    return decode_for_signature(public_base_url + path)


def decode_for_signature(uri: str) -> str:
    return ENCODED_IN_URI.sub(lambda m: DECODED_IN_URI[m.group(0).upper()], uri)


# --- payload ----------------------------------------------------------------------------


def parse_delivery(connection: ConnectionConfig, body: Any) -> list[RecordChangeEvent]:
    """HubSpot's event array -> one canonical event per record (changes to one record coalesced)."""
    if not isinstance(body, list):
        raise bad_request(
            "bad_payload",
            f"expected a JSON array of HubSpot events, got a JSON {type(body).__name__}",
            "see docs/crms/hubspot.md for the webhook format",
        )
    if not body:
        raise bad_request("bad_payload", "the event array is empty")
    groups: dict[tuple[str, str], list[HubSpotEvent]] = {}
    for index, item in enumerate(body):
        event = parse_event(connection, index, item)
        groups.setdefault((event.object_type, event.record_id), []).append(event)
    return [coalesce(connection, events) for events in groups.values()]


def parse_event(connection: ConnectionConfig, index: int, item: Any) -> HubSpotEvent:
    where = f"body[{index}]"
    if not isinstance(item, dict):
        raise bad_request("bad_payload", f"{where} must be an event object, got {type(item).__name__}")
    subscription_type = _text(item, "subscriptionType", where)
    prefix, _, action = subscription_type.partition(".")
    if action not in CHANGE_TYPES:
        raise bad_request(
            "unsupported_event",
            f"{where}.subscriptionType {subscription_type!r} is not a record change this endpoint handles",
            f"subscribe to <object>.{{{','.join(CHANGE_TYPES)}}} events only",
        )
    property_name = item.get("propertyName")
    if action == "propertyChange" and (not isinstance(property_name, str) or not property_name):
        raise bad_request("bad_payload", f"{where}.propertyName is required on a propertyChange event")
    return HubSpotEvent(
        object_type=check_object(connection, _object_name(item, prefix, where)),
        record_id=_identifier(item, "objectId", where),
        event_id=_identifier(item, "eventId", where),
        occurred_at_ms=_milliseconds(item, where),
        change_type=CHANGE_TYPES[action],
        subscription_type=subscription_type,
        property_name=property_name if action == "propertyChange" else None,
        property_value=item.get("propertyValue"),
        sensitive=item.get("isSensitive") is True,
        origin=_origin(item),
        modified_by=_user_id(item),
    )


def coalesce(connection: ConnectionConfig, events: Sequence[HubSpotEvent]) -> RecordChangeEvent:
    """Several changes to one record -> one event: fields merged (later values win), latest time,
    and a dedupe key over every item so that HubSpot redelivering the batch is dropped."""
    ordered = sorted(events, key=lambda e: (e.occurred_at_ms, e.event_id))
    first, latest = ordered[0], ordered[-1]
    whole_record = any(e.property_name is None for e in ordered)  # creation, merge, ...: fetch everything
    values = {e.property_name: e.property_value for e in ordered if e.property_name and not e.sensitive}
    origins = {e.origin for e in ordered}
    digest = hashlib.sha256("\n".join(sorted(e.fingerprint for e in ordered)).encode()).hexdigest()[:32]
    return record_change(
        connection,
        object_type=first.object_type,
        record_id=first.record_id,
        event_id=_joined_event_ids(ordered),
        occurred_at=from_milliseconds(latest.occurred_at_ms),
        dedupe_id=f"hubspot:{first.object_type}:{first.record_id}:{digest}",
        change_type=next((e.change_type for e in reversed(ordered) if e.change_type != "updated"), "updated"),
        changed_fields=() if whole_record else tuple(dict.fromkeys(e.property_name or "" for e in ordered)),
        values=values or None,
        origin=origins.pop() if len(origins) == 1 else MIXED_ORIGIN,
        values_signed=True,  # the v3 signature covers the body
        # The latest item's user; None when it does not name one (the worker reads hs_updated_by_user_id).
        modified_by=latest.modified_by,
    )


def _object_name(item: dict[str, Any], prefix: str, where: str) -> str:
    if prefix != "object":
        return OBJECT_NAMES.get(prefix, prefix)
    type_id = _text(item, "objectTypeId", where)
    return OBJECT_TYPE_IDS.get(type_id, type_id)


def _user_id(item: dict[str, Any]) -> str | None:
    """The user of a change made in HubSpot's app: sourceId `userId:123` -> "123"."""
    source_id = item.get("sourceId")
    if isinstance(source_id, str) and source_id.startswith("userId:"):
        user = source_id.removeprefix("userId:").strip()
        return user if user.isdigit() else None
    return None


def _origin(item: dict[str, Any]) -> str | None:
    """`changeSource:sourceId`, e.g. CRM_UI:userId:123 or INTEGRATION:4567 (see is_own_change)."""
    source = item.get("changeSource")
    if not isinstance(source, str) or not source:
        return None
    source_id = item.get("sourceId")
    origin = f"{source}:{source_id}" if source_id not in (None, "") else source
    return origin[:MAX_ORIGIN]


def _joined_event_ids(events: Sequence[HubSpotEvent]) -> str:
    joined = ",".join(e.event_id for e in events)
    if len(joined) <= MAX_EVENT_ID:
        return joined
    return f"{events[0].event_id}..{events[-1].event_id} ({len(events)} events)"


def _text(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value:
        raise bad_request("bad_payload", f"{where}.{key} is required (a non-empty string)")
    return value


def _identifier(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).strip():
        raise bad_request("bad_payload", f"{where}.{key} is required (a number)")
    return str(value).strip()


def _milliseconds(item: dict[str, Any], where: str) -> int:
    value = item.get("occurredAt")
    try:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(value)
        from_milliseconds(value)
    except (ValueError, OverflowError, OSError):
        raise bad_request("bad_payload", f"{where}.occurredAt is required (epoch milliseconds)") from None
    return value


def from_milliseconds(value: int) -> datetime:
    return datetime.fromtimestamp(value / 1000, UTC)
