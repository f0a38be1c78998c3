"""What every intake endpoint shares: find the connection, read and check the body,
write the events durably, nudge the worker, log rejections without secrets."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from flask import current_app, request

from connector.config import ConnectionConfig, Settings
from connector.events import RecordChangeEvent
from connector.metrics import WEBHOOK_EVENTS, WEBHOOKS_REJECTED
from connector.runtime import Runtime
from connector.storage.inbox import AcceptResult, GroupCommitInbox
from connector.worker import Tasks
from webhooks.errors import WebhookError, bad_request

log = logging.getLogger("webhooks")

# The objects each CRM kind accepts unless the connection lists its own (`NAME_OBJECTS`).
DEFAULT_OBJECTS: dict[str, tuple[str, ...]] = {
    "salesforce": ("Opportunity", "Account", "Contract", "Quote"),
    "hubspot": ("deals", "companies", "contacts"),
    "zoho": ("Deals", "Accounts", "Contacts", "Quotes"),
    "bitrix24": ("deal", "company", "contact", "smart_process"),
    "sandbox": ("deal", "company"),
}


@dataclass
class Intake:
    runtime: Runtime
    tasks: Tasks | None
    inbox: GroupCommitInbox = field(init=False)

    def __post_init__(self) -> None:
        self.inbox = GroupCommitInbox(self.runtime.sessions)

    @property
    def settings(self) -> Settings:
        return self.runtime.settings

    def store(self, events: Sequence[RecordChangeEvent]) -> AcceptResult:
        """Durable first (one transaction), then the nudge; the caller acknowledges after this."""
        result = self.inbox.accept(events)
        count_accepted(events, result)
        if result.accepted and self.tasks is not None:
            self.tasks.nudge()
        return result


def intake() -> Intake:
    return current_app.extensions["crm_approvals"]  # type: ignore[no-any-return]


def resolve_connection(kind: str, name: str | None = None) -> ConnectionConfig:
    """The named connection, or the only one of this kind; a clear 404 otherwise."""
    settings = intake().settings
    candidates = settings.connections_of_kind(kind)
    if name is None:
        name = request.args.get("connection")
    if name is not None:
        match = [c for c in candidates if c.name == name]
        if not match:
            known = ", ".join(c.name for c in candidates) or "none"
            raise WebhookError(
                404,
                "unknown_connection",
                f"no {kind} connection named {name!r} (configured {kind}: {known})",
                "add it to CRM_CONNECTIONS or fix the webhook URL",
            )
        return match[0]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise WebhookError(
            404,
            "unknown_connection",
            f"no {kind} connection is configured",
            f"add e.g. CRM_CONNECTIONS={kind} and its {kind.upper()}_* variables (see .env.example)",
        )
    raise bad_request(
        "ambiguous_connection",
        f"several {kind} connections are configured ({', '.join(c.name for c in candidates)})",
        "name one in the URL: ?connection=NAME",
    )


def check_object(connection: ConnectionConfig, object_type: str) -> str:
    """The object type as configured (case-insensitive match), or a 422 naming the allowed ones."""
    allowed = connection.get_list("OBJECTS", DEFAULT_OBJECTS.get(connection.kind, ()))
    for name in allowed:
        if name.lower() == object_type.lower():
            return name
    raise WebhookError(
        422,
        "unknown_object",
        f"connection {connection.name!r} does not accept {object_type!r} records",
        f"accepted: {', '.join(allowed) or 'none'}; set {connection.env_prefix}OBJECTS to change that",
    )


def require_content_type(*allowed: str) -> None:
    got = (request.mimetype or "").lower()
    if got not in allowed:
        raise WebhookError(
            415,
            "unsupported_content_type",
            f"Content-Type {got or '(none)'!r} is not accepted here",
            f"send {' or '.join(allowed)}",
        )


def json_body() -> Any:
    raw = request.get_data(cache=True)
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        raise bad_request("malformed_json", "the body is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise bad_request(
            "malformed_json", f"the body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None


def log_rejection(error: WebhookError) -> None:
    # Never headers or body: they carry signatures and customer data.
    count_rejected(error)
    log.warning(
        "webhook rejected: %s %s from %s: %s %s: %s",
        request.method,
        request.path,
        request.remote_addr,
        error.status,
        error.code,
        error.message,
    )


def count_accepted(events: Sequence[RecordChangeEvent], result: AcceptResult) -> None:
    if not events:
        return
    connection = events[0].connection  # one delivery comes from one connection
    if result.accepted:
        WEBHOOK_EVENTS.labels(connection, "stored").inc(result.accepted)
    if result.duplicates:
        WEBHOOK_EVENTS.labels(connection, "duplicate").inc(result.duplicates)


def count_rejected(error: WebhookError) -> None:
    """Counted by connection: the configured one named in the URL, else the only one of the
    endpoint's CRM kind, else the endpoint's name. Never a label a sender made up: each
    distinct value would be a new time series."""
    parts = request.path.split("/")
    if len(parts) < 3 or parts[1] != "webhooks":
        return
    endpoint = parts[2]
    kind = "sandbox" if endpoint == "standard" else endpoint  # Standard Webhooks: the sandbox CRM
    of_kind = [c.name for c in intake().settings.connections_of_kind(kind)]
    named = request.args.get("connection")
    if named in of_kind:
        connection = named
    else:
        connection = of_kind[0] if len(of_kind) == 1 and named is None else endpoint
    WEBHOOKS_REJECTED.labels(connection, error.code).inc()
