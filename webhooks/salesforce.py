"""Salesforce intake: Outbound Messages (SOAP) and relayed Change Data Capture events (JSON).

POST /webhooks/salesforce/outbound[?connection=NAME][&token=...]
    A workflow/flow Outbound Message: SOAP 1.1, 1..100 <Notification>s. Salesforce signs
    nothing, so the OrganizationId must be on the connection's ORG_IDS allow-list and the URL
    must carry OUTBOUND_TOKEN (plus, at the proxy, Salesforce's client certificate); the values
    are hints: the worker re-reads the record before judging rules. Errors are SOAP
    faults; success is the exact acknowledgement Salesforce waits for, or it retries for 24 h.

POST /webhooks/salesforce/events[?connection=NAME]
    A CDC event (or a JSON array of them, or the Streaming API envelope) relayed by an Apex
    trigger or a Pub/Sub client, signed `X-CRM-Approvals-Signature: t=<unix>,v1=<hex>` with
    the connection's EVENTS_SECRET. Errors are JSON.

Formats and set-up: docs/crms/salesforce.md (part 2).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any
from xml.etree.ElementTree import Element

from flask import Blueprint, Response, current_app, jsonify, request
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from connector.clock import utcnow
from connector.config import ConnectionConfig
from connector.crm.salesforce_ids import HINT as ID_HINT
from connector.crm.salesforce_ids import normalize_salesforce_id, salesforce_id_problem
from connector.events import RecordChangeEvent, parse_timestamp
from webhooks.errors import WebhookError, bad_request, unauthorized
from webhooks.intake import (
    SecretSetting,
    check_object,
    intake,
    json_body,
    log_rejection,
    record_change,
    require_content_type,
    require_secret,
    require_secrets,
    resolve_connection,
    whole_number,
)
from webhooks.signatures import constant_time_equals, verify_timestamped_hmac
from webhooks.soap import OUTBOUND_ACK, fault, is_nil, parse_xml, qname, soap_body_child

log = logging.getLogger("webhooks.salesforce")

KIND = "salesforce"
OUTBOUND_NS = "http://soap.sforce.com/2005/09/outbound"
XSI_TYPE = qname("http://www.w3.org/2001/XMLSchema-instance", "type")
MAX_NOTIFICATIONS = 100  # the WSDL's maxOccurs
SIGNATURE_HEADER = "X-CRM-Approvals-Signature"
# Pub/Sub API sends changedFields/nulledFields/diffFields as hex bitmaps until the client decodes them.
UNDECODED_BITMAP = re.compile(r"(?:\d+-)?0x[0-9A-Fa-f]+")
EMPTY_RECORD_ID = "000000000000000AAA"  # what overflow events carry instead of a record id
CHANGE_TYPES = {"CREATE": "created", "UPDATE": "updated", "DELETE": "deleted", "UNDELETE": "undeleted"}
GAP_PREFIX = "GAP_"
OVERFLOW = "GAP_OVERFLOW"
# Outbound Messages are unsigned: only orgs on this allow-list are trusted.
ORG_IDS = SecretSetting(
    "ORG_IDS",
    "/webhooks/salesforce/outbound",
    "your Organization ID (Setup > Company Information; comma-separated for several orgs)",
    several=True,
    check=salesforce_id_problem,
)
EVENTS_SECRET = SecretSetting(
    "EVENTS_SECRET",
    "/webhooks/salesforce/events",
    "a long random value that your change-event relay signs deliveries with",
)
# A shared secret in the endpoint URL: required, since an org id is not secret (it shows in
# every Salesforce URL and support case). OUTBOUND_ORG_ID_ONLY=true opts out, loudly.
OUTBOUND_TOKEN = SecretSetting(
    "OUTBOUND_TOKEN",
    "/webhooks/salesforce/outbound",
    "a long random URL-safe value, also appended as &token=... to the Outbound Message's Endpoint URL",
    several=True,
    waiver="OUTBOUND_ORG_ID_ONLY",
)
SECRETS = (ORG_IDS, OUTBOUND_TOKEN, EVENTS_SECRET)

blueprint = Blueprint("salesforce", __name__)
# Nested so that its error handlers (SOAP faults) apply to the Outbound Message route only.
outbound = Blueprint("outbound", __name__)


# --- Outbound Messages -------------------------------------------------------------------


@outbound.post("/webhooks/salesforce/outbound")
def receive_outbound() -> ResponseReturnValue:
    connection = resolve_connection(KIND)
    # tokens is () only when the connection opted out (OUTBOUND_ORG_ID_ONLY=true)
    trusted, tokens = require_secrets(connection, ORG_IDS, OUTBOUND_TOKEN)
    require_content_type("text/xml")
    check_outbound_token(connection, tokens)
    notifications = soap_body_child(parse_xml(request.get_data(cache=True)), OUTBOUND_NS, "notifications")
    check_organization(connection, trusted, _child_text(notifications, "OrganizationId"))
    events = parse_notifications(connection, notifications)
    result = intake().store(events)
    log.info(
        "salesforce outbound message for %s: %d notifications, %d new, %d redelivered",
        connection.name,
        len(events),
        result.accepted,
        result.duplicates,
    )
    # Acknowledged even when every notification was a redelivery, so Salesforce stops retrying.
    return Response(OUTBOUND_ACK, 200, mimetype="text/xml")


def check_outbound_token(connection: ConnectionConfig, expected: tuple[str, ...]) -> None:
    """The shared secret in the endpoint URL (`&token=`; comma-separated values for rotation).
    No expected value only when the connection set OUTBOUND_ORG_ID_ONLY=true."""
    if not expected:
        return
    offered = request.args.get("token")
    variable = f"{connection.env_prefix}OUTBOUND_TOKEN"
    if not offered:
        raise unauthorized(
            "missing_token",
            f"connection {connection.name!r} requires a token= parameter in the endpoint URL",
            f"append &token=<value of {variable}> to the Outbound Message's Endpoint URL",
        )
    if not any(constant_time_equals(value, offered) for value in expected):
        raise unauthorized(
            "bad_token",
            "the token= parameter in the endpoint URL is wrong",
            f"copy the value of {variable} into the Outbound Message's Endpoint URL",
        )


def check_organization(connection: ConnectionConfig, allowed: tuple[str, ...], org_id: str | None) -> None:
    """Outbound Messages are unsigned: only orgs on the connection's allow-list are trusted."""
    variable = f"{connection.env_prefix}{ORG_IDS.name}"
    problem = salesforce_id_problem(org_id) if org_id else "it is missing"
    if problem is not None:
        raise bad_request(
            "bad_organization_id",
            f"<OrganizationId> is not a Salesforce id: {problem}",
            "send an unmodified Salesforce Outbound Message",
        )
    assert org_id is not None
    if not any(same_salesforce_id(org_id, candidate) for candidate in allowed):
        raise WebhookError(
            403,
            "org_not_allowed",
            f"OrganizationId {org_id!r} is not allowed for connection {connection.name!r}",
            f"add it to {variable} if this org should be trusted",
        )


def same_salesforce_id(a: str, b: str) -> bool:
    """Whether two valid ids, 15- or 18-character, name the same record (compared in their
    18-character forms, so a wrong checksum suffix never matches)."""
    return constant_time_equals(normalize_salesforce_id(a), normalize_salesforce_id(b))


def parse_notifications(connection: ConnectionConfig, notifications: Element) -> list[RecordChangeEvent]:
    items = notifications.findall(qname(OUTBOUND_NS, "Notification"))
    if not items:
        raise bad_request("no_notifications", "the message has no <Notification>", "send 1 to 100 of them")
    if len(items) > MAX_NOTIFICATIONS:
        raise bad_request(
            "too_many_notifications",
            f"the message has {len(items)} <Notification>s; Salesforce sends at most {MAX_NOTIFICATIONS}",
            f"split it into messages of at most {MAX_NOTIFICATIONS}",
        )
    received = utcnow()
    return [parse_notification(connection, item, n, received) for n, item in enumerate(items, start=1)]


def parse_notification(
    connection: ConnectionConfig, item: Element, position: int, received: datetime
) -> RecordChangeEvent:
    where = f"Notification {position}"
    notification_id = _child_text(item, "Id")
    if not notification_id:
        raise bad_request("missing_id", f"{where} has no <Id> (the notification id)", "send it unmodified")
    sobject = item.find(qname(OUTBOUND_NS, "sObject"))
    if sobject is None:
        raise bad_request("missing_sobject", f"{where} has no <sObject>", "send it unmodified")
    object_type = check_object(connection, _sobject_type(sobject, where))
    values = sobject_values(sobject)
    sent_id = values.get("Id")
    if not sent_id:
        raise bad_request(
            "missing_id", f"{where}: <sObject> has no <sf:Id>", "select the Id field in the Outbound Message"
        )
    record_id = values["Id"] = record_id_of(sent_id, f"{where}: <sf:Id>")
    return record_change(
        connection,
        object_type=object_type,
        record_id=record_id,
        event_id=notification_id,
        occurred_at=_last_modified(values, received, where),
        # Salesforce resends the same notification id on every retry.
        dedupe_id=f"obm:{notification_id}",
        # Outbound Messages carry the selected fields, not which of them changed, nor whether the
        # record is new: every sent field counts as changed.
        change_type="updated",
        changed_fields=[name for name in values if name != "Id"],
        values=values,
        origin=None,  # no change origin in the message; the pipeline compares values instead
        values_signed=False,  # Outbound Messages are not signed: the worker re-reads the record
        modified_by=_modifier(values.get("LastModifiedById")),  # when the message selects it
    )


def _modifier(raw: Any) -> str | None:
    """A user id (CDC commitUser, LastModifiedById) in its 18-character form; None if absent or
    not an id (the worker then reads LastModifiedById)."""
    if not isinstance(raw, str) or not raw.strip():
        return None
    try:
        return normalize_salesforce_id(raw.strip())
    except ValueError:
        return None


def record_id_of(raw: str, where: str) -> str:
    """The record id in its 18-character form, or a 400 saying what is wrong with it."""
    try:
        return normalize_salesforce_id(raw)
    except ValueError as exc:
        raise bad_request("bad_record_id", f"{where} is not a Salesforce record id: {exc}", ID_HINT) from None


def sobject_values(sobject: Element) -> dict[str, str | None]:
    """Field API name -> text as sent; xsi:nil="true" -> None. Numbers and dates stay text."""
    return {_local_name(field.tag): None if is_nil(field) else (field.text or "") for field in sobject}


def _sobject_type(sobject: Element, where: str) -> str:
    declared = sobject.get(XSI_TYPE, "")
    object_type = declared.rpartition(":")[2].strip()  # "sf:Opportunity" -> "Opportunity"
    if not object_type:
        raise bad_request(
            "missing_object_type", f'{where}: <sObject> has no xsi:type="sf:<Object>"', "send it unmodified"
        )
    return object_type


def _last_modified(values: Mapping[str, str | None], received: datetime, where: str) -> datetime:
    raw = values.get("LastModifiedDate")
    if not raw:
        return received
    try:
        return parse_timestamp(raw)
    except ValueError:
        raise bad_request(
            "bad_timestamp", f"{where}: LastModifiedDate {raw[:40]!r} is not an ISO 8601 date-time"
        ) from None


def _child_text(parent: Element, local: str) -> str | None:
    child = parent.find(qname(OUTBOUND_NS, local))
    if child is None or is_nil(child):
        return None
    return (child.text or "").strip() or None


def _local_name(tag: str) -> str:
    return tag.rpartition("}")[2]


def _outbound_fault(error: WebhookError) -> ResponseReturnValue:
    log_rejection(error)
    return Response(fault(error), error.status, mimetype="text/xml")


@outbound.errorhandler(WebhookError)
def _outbound_rejected(error: WebhookError) -> ResponseReturnValue:
    return _outbound_fault(error)


@outbound.errorhandler(RequestEntityTooLarge)
def _outbound_too_large(_error: RequestEntityTooLarge) -> ResponseReturnValue:
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    return _outbound_fault(
        WebhookError(
            413,
            "body_too_large",
            f"the body is larger than {limit} bytes",
            "raise WEBHOOK_MAX_BODY_BYTES if this is expected, or select fewer fields to send",
        )
    )


@outbound.errorhandler(HTTPException)
def _outbound_http_error(error: HTTPException) -> ResponseReturnValue:
    code = (error.name or "error").lower().replace(" ", "_")
    return _outbound_fault(WebhookError(error.code or 400, code, error.description or code))


@outbound.errorhandler(Exception)
def _outbound_unexpected(error: Exception) -> ResponseReturnValue:
    # A bug, not bad input: logged with the stack; the fault says nothing internal.
    log.exception("unhandled error on %s %s", request.method, request.path)
    return Response(fault(WebhookError(500, "internal_error", "internal error")), 500, mimetype="text/xml")


blueprint.register_blueprint(outbound)


# --- Change Data Capture relay -------------------------------------------------------------


@blueprint.post("/webhooks/salesforce/events")
def receive_events() -> ResponseReturnValue:
    connection = resolve_connection(KIND)
    [secret] = require_secret(connection, EVENTS_SECRET)
    require_content_type("application/json")
    verify_timestamped_hmac(
        secret,
        request.headers.get(SIGNATURE_HEADER),
        request.get_data(cache=True),
        intake().settings.webhook_tolerance_seconds,
        header=SIGNATURE_HEADER,
    )
    events: list[RecordChangeEvent] = []
    skipped = 0
    for position, payload in enumerate(change_event_payloads(json_body())):
        parsed = parse_change_event(connection, payload, f"event {position}")
        events += parsed
        if not parsed:
            skipped += 1
    result = intake().store(events)
    body = {"accepted": result.accepted, "duplicates": result.duplicates, "skipped": skipped}
    return jsonify(body), 202 if result.accepted else 200


def change_event_payloads(body: Any) -> list[dict[str, Any]]:
    """One CDC event, a JSON array of them, or Streaming API envelopes -> the event payloads."""
    items = body if isinstance(body, list) else [body]
    if not items:
        raise bad_request("bad_payload", "the array of change events is empty", "send at least one event")
    return [_unwrap(item, f"event {position}") for position, item in enumerate(items)]


def _unwrap(item: Any, where: str) -> dict[str, Any]:
    if isinstance(item, dict) and "ChangeEventHeader" not in item:
        data = item.get("data")
        if isinstance(data, dict) and "payload" in data:  # Streaming API: {"data": {"payload": ...}}
            item = data["payload"]
        elif "payload" in item:  # {"schema": ..., "payload": ...}
            item = item["payload"]
    if not isinstance(item, dict) or not isinstance(item.get("ChangeEventHeader"), dict):
        raise bad_request(
            "bad_payload",
            f"{where} has no ChangeEventHeader object",
            "send the change event as Salesforce delivers it: {'ChangeEventHeader': {...}, field: value}",
        )
    return item


def parse_change_event(
    connection: ConnectionConfig, payload: Mapping[str, Any], where: str
) -> list[RecordChangeEvent]:
    """One RecordChangeEvent per record id (Salesforce merges identical changes into one event).
    Empty for an overflow event, which names no record."""
    header: Mapping[str, Any] = payload["ChangeEventHeader"]
    object_type = check_object(connection, _header_text(header, "entityName", where))
    change = _change_type(header, where)
    transaction_key = _header_text(header, "transactionKey", where)
    sequence = _sequence_number(header, where)
    record_ids = _record_ids(header, where, allow_empty=change == OVERFLOW)
    occurred = _commit_time(header, where)
    if change == OVERFLOW or not _fetchable(record_ids):
        log.warning(
            "salesforce %s %s on %s (transaction %s) names no fetchable record id; "
            "reconcile %s records changed around %s",
            where,
            change,
            object_type,
            transaction_key,
            object_type,
            occurred.isoformat(),
        )
        return []
    gap = change.startswith(GAP_PREFIX)  # gap events carry no field values: the worker fetches
    changed = () if gap else _field_list(header, "changedFields", where)
    diffed = _field_list(header, "diffFields", where)
    values = None if gap else change_event_values(payload, change, changed, diffed)
    origin = header.get("changeOrigin")
    commit_user = _modifier(header.get("commitUser"))
    return [
        record_change(
            connection,
            object_type=object_type,
            record_id=record_id,
            event_id=f"{transaction_key}:{sequence}",
            occurred_at=occurred,
            # One transaction can change a record several times: the sequence number tells them apart.
            dedupe_id=f"cdc:{transaction_key}:{sequence}:{record_id}",
            change_type=CHANGE_TYPES[change.removeprefix(GAP_PREFIX)],
            changed_fields=changed,
            values=values,
            origin=origin if isinstance(origin, str) else None,
            values_signed=True,  # the relay signs the body (EVENTS_SECRET)
            modified_by=commit_user,
        )
        for record_id in record_ids
    ]


def change_event_values(
    payload: Mapping[str, Any], change: str, changed: tuple[str, ...], diff_fields: tuple[str, ...]
) -> dict[str, Any]:
    """The record fields the event carries. Large text fields sent as a unified diff are left
    out (the worker fetches them). In an update only the changed fields count: Pub/Sub API
    sends every field, with null for the unchanged ones."""
    values = {
        name: value
        for name, value in payload.items()
        if name != "ChangeEventHeader" and name not in diff_fields and not _is_diff(value)
    }
    if change == "UPDATE" and changed:
        top_level = {name.split(".", 1)[0] for name in changed}  # "BillingAddress.City" -> BillingAddress
        values = {name: value for name, value in values.items() if name in top_level}
    return values


def _is_diff(value: Any) -> bool:
    # Streaming API (CometD) wraps a diffed text field as {"diff": "--- \n+++ <hash>..."}.
    return isinstance(value, dict) and set(value) == {"diff"}


def _change_type(header: Mapping[str, Any], where: str) -> str:
    change = _header_text(header, "changeType", where)
    if change != OVERFLOW and change.removeprefix(GAP_PREFIX) not in CHANGE_TYPES:
        known = ", ".join(CHANGE_TYPES)
        raise bad_request(
            "bad_payload",
            f"{where}: changeType {change[:40]!r} is not one of {known} (or GAP_*, GAP_OVERFLOW)",
        )
    return change


def _header_text(header: Mapping[str, Any], key: str, where: str) -> str:
    value = header.get(key)
    if not isinstance(value, str) or not value.strip():
        raise bad_request(
            "bad_payload",
            f"{where}: ChangeEventHeader.{key} is required (a non-empty string)",
            "relay the header exactly as Salesforce sends it",
        )
    return value


def _sequence_number(header: Mapping[str, Any], where: str) -> int:
    value = whole_number(header.get("sequenceNumber"))
    if value is None:
        raise bad_request(
            "bad_payload",
            f"{where}: ChangeEventHeader.sequenceNumber is required (a whole number)",
            "relay the header exactly as Salesforce sends it",
        )
    return value


def _commit_time(header: Mapping[str, Any], where: str) -> datetime:
    try:
        return parse_timestamp(header.get("commitTimestamp"))
    except ValueError:
        raise bad_request(
            "bad_payload",
            f"{where}: ChangeEventHeader.commitTimestamp is required (milliseconds since the epoch)",
            "relay the header exactly as Salesforce sends it",
        ) from None


def _record_ids(header: Mapping[str, Any], where: str, *, allow_empty: bool) -> list[str]:
    """The record ids in their 18-character form; wildcards ("001*") stay as sent."""
    ids = header.get("recordIds", [])
    if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
        raise bad_request("bad_payload", f"{where}: ChangeEventHeader.recordIds must be a list of record ids")
    if not ids and not allow_empty:
        raise bad_request("bad_payload", f"{where}: ChangeEventHeader.recordIds is empty")
    return [
        i if i.endswith("*") else record_id_of(i, f"{where}: ChangeEventHeader.recordIds[{n}]")
        for n, i in enumerate(ids)
    ]


def _fetchable(record_ids: list[str]) -> bool:
    """Wildcards ("001*", field type conversions) and the empty id (overflow) name no record."""
    return bool(record_ids) and not any(i.endswith("*") or i == EMPTY_RECORD_ID for i in record_ids)


def _field_list(header: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    names = header.get(key) or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise bad_request("bad_payload", f"{where}: ChangeEventHeader.{key} must be a list of field names")
    if any(UNDECODED_BITMAP.fullmatch(n) for n in names):
        raise bad_request(
            "undecoded_bitmap",
            f"{where}: ChangeEventHeader.{key} holds Pub/Sub API bitmaps, not field names",
            "decode the bitmap fields against the event schema before relaying (see the Pub/Sub API docs)",
        )
    return tuple(names)
