"""What every intake endpoint shares: find the connection, require its secret settings,
read and check the body, build canonical events, write them durably, nudge the worker,
log rejections without secrets.

An intake module (named by its row in connector/crm/registry.py) exposes `blueprint`, a
Flask blueprint, and `SECRETS`, the SecretSettings its endpoints verify deliveries with.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import ModuleType
from typing import Any

from flask import current_app, request

from connector.config import ConnectionConfig, Settings
from connector.crm.registry import CRMKind, crm_kind
from connector.events import RecordChangeEvent
from connector.metrics import WEBHOOK_EVENTS, WEBHOOKS_REJECTED
from connector.runtime import Runtime
from connector.storage.inbox import AcceptResult, GroupCommitInbox
from connector.worker import Tasks
from webhooks.errors import WebhookError, bad_request

log = logging.getLogger("webhooks")


@dataclass(frozen=True)
class SecretSetting:
    """A connection setting an endpoint cannot verify deliveries without. Missing, it is a
    configuration error: logged at start-up, and a 503 at the endpoint (`require_secret`)."""

    name: str  # read as <CONNECTION>_<name>, e.g. CLIENT_SECRET -> HUBSPOT_CLIENT_SECRET
    endpoint: str  # the path it guards
    what: str  # what to set it to, for the hint
    several: bool = False  # comma-separated values are all accepted (rotation)
    # A connection setting that, set to "true", lets the endpoint run without this secret: an
    # explicit, documented opt-in to weaker authentication, warned about at start-up.
    waiver: str | None = None

    def waived(self, connection: ConnectionConfig) -> bool:
        return self.waiver is not None and (connection.get(self.waiver) or "").strip().lower() == "true"

    def values(self, connection: ConnectionConfig) -> tuple[str, ...]:
        if self.several:
            return connection.get_list(self.name)
        value = connection.get(self.name)
        return () if value is None else (value,)

    def problem(self, connection: ConnectionConfig) -> WebhookError:
        variable = f"{connection.env_prefix}{self.name}"
        return WebhookError(
            503,
            "not_configured",
            f"{connection.kind} connection {connection.name!r} cannot verify deliveries to {self.endpoint}: "
            f"{variable} is not set",
            f"set {variable} to {self.what}, then restart (docs/crms/{connection.kind}.md)",
        )


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
    return current_app.extensions["crm_approvals"]


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


def require_secret(connection: ConnectionConfig, secret: SecretSetting) -> tuple[str, ...]:
    """The setting's configured values, or a 503 naming the variable to set."""
    return require_secrets(connection, secret)[0]


def require_secrets(connection: ConnectionConfig, *secrets: SecretSetting) -> list[tuple[str, ...]]:
    """Each setting's configured values (() for a waived one), or one 503 naming every missing
    variable, so that fixing the first does not just reveal the next."""
    missing = [
        s.problem(connection) for s in secrets if not s.values(connection) and not s.waived(connection)
    ]
    if missing:
        first = missing[0]
        raise WebhookError(
            first.status,
            first.code,
            "; ".join(p.message for p in missing),
            "; ".join(p.hint or "" for p in missing),
        )
    return [s.values(connection) for s in secrets]


def intake_module(kind: CRMKind) -> ModuleType:
    module = kind.intake_module()
    missing = [name for name in ("blueprint", "SECRETS") if not hasattr(module, name)]
    if missing:
        raise ImportError(
            f"CRM kind {kind.name!r}: intake module {kind.intake!r} has no {' or '.join(missing)}; "
            "see docs/crms/adding-a-crm.md"
        )
    return module


def unconfigured_secrets(settings: Settings) -> list[WebhookError]:
    """Every secret setting a configured connection lacks, as the error its endpoint answers."""
    return [problem for problem, waived in _missing_secrets(settings) if not waived]


def _missing_secrets(settings: Settings) -> list[tuple[WebhookError, bool]]:
    """(the error, whether the connection waived that secret) for every missing secret setting."""
    missing = []
    for connection in settings.connections.values():
        secrets: Sequence[SecretSetting] = intake_module(crm_kind(connection.kind)).SECRETS
        missing += [
            (s.problem(connection), s.waived(connection)) for s in secrets if not s.values(connection)
        ]
    return missing


def report_unconfigured_secrets(settings: Settings) -> None:
    """At start-up: the endpoints of a connection that lacks a secret setting refuse every
    delivery (503) until it is set; say so now, naming the variable."""
    for problem, waived in _missing_secrets(settings):
        if waived:
            log.warning(
                "%s, and the connection opted out of it: that endpoint accepts deliveries without it, "
                "so anyone who learns the rest can send them. To fix: %s",
                problem.message,
                problem.hint,
            )
        else:
            log.error("%s; that endpoint answers 503 until then. To fix: %s", problem.message, problem.hint)


def accepted_objects(connection: ConnectionConfig) -> tuple[str, ...]:
    """The objects the connection accepts: NAME_OBJECTS, or its kind's defaults."""
    return connection.get_list("OBJECTS", crm_kind(connection.kind).default_objects)


def check_object(connection: ConnectionConfig, object_type: str) -> str:
    """The object type as configured (case-insensitive match), or a 422 naming the allowed ones."""
    allowed = accepted_objects(connection)
    for name in allowed:
        if name.lower() == object_type.lower():
            return name
    raise WebhookError(
        422,
        "unknown_object",
        f"connection {connection.name!r} does not accept {object_type!r} records",
        f"accepted: {', '.join(allowed) or 'none'}; set {connection.env_prefix}OBJECTS to change that",
    )


def record_change(
    connection: ConnectionConfig,
    *,
    object_type: str,
    record_id: str,
    event_id: str,
    occurred_at: datetime,
    dedupe_id: str,
    change_type: str = "updated",
    changed_fields: Sequence[str] = (),
    values: Mapping[str, Any] | None = None,
    origin: str | None = None,
    values_signed: bool,
) -> RecordChangeEvent:
    """The canonical event for one record change delivered to `connection`. `dedupe_id` is
    what stays the same when the CRM redelivers this change; the connection name is prefixed,
    so one change seen through two connections is two events. `values_signed` says whether the
    channel authenticates the delivery's content (a signature over the body): when not, the
    values are hints and the pipeline judges rules on values it reads from the CRM."""
    return RecordChangeEvent(
        source=connection.kind,
        connection=connection.name,
        object_type=object_type,
        record_id=record_id,
        event_id=event_id,
        occurred_at=occurred_at,
        dedupe_key=f"{connection.name}:{dedupe_id}",
        change_type=change_type,
        changed_fields=tuple(changed_fields),
        values=values,
        origin=origin,
        values_signed=values_signed,
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
