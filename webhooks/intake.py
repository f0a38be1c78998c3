"""What every intake endpoint shares: find the connection, require its secret settings,
read and check the body, build canonical events, write them durably, nudge the worker,
log rejections without secrets.

An intake module (named by its row in connector/crm/registry.py) exposes `blueprint`, a
Flask blueprint, and `SECRETS`, the SecretSettings its endpoints verify deliveries with.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import ModuleType
from typing import Any, TypeVar

from flask import Response, current_app, request

from connector.config import ConnectionConfig, Settings
from connector.crm.registry import CRMKind, crm_kind
from connector.events import RecordChangeEvent
from connector.metrics import WEBHOOK_EVENTS, WEBHOOKS_REJECTED
from connector.runtime import Runtime
from connector.storage import audit
from connector.storage.db import transaction
from connector.storage.inbox import AcceptResult, GroupCommitInbox
from connector.storage.models import InboxEvent
from connector.worker import Tasks
from webhooks.errors import WebhookError, bad_request

log = logging.getLogger("webhooks")
T = TypeVar("T")

MAX_JSON_DEPTH = 32  # no CRM payload nests deeper; deeper would only exhaust the stack later
MAX_JSON_DIGITS = 100  # int() refuses 4,300+ digits anyway, and nothing we judge needs more
# Lone UTF-16 surrogates (JSON "\ud800") are no Unicode text: no database can store them.
SURROGATE = re.compile("[\ud800-\udfff]")
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
NUL_OR_SURROGATE = re.compile("[\x00\ud800-\udfff]")
ASCII_DIGITS = re.compile("[0-9]+")  # str.isdigit() is also true for "²", which int() refuses
# What the inbox stores of each event, with its column width; the label names it in a refusal.
STORED_TEXT = {
    "record_id": "record id",
    "object_type": "object type",
    "event_id": "event id",
    "dedupe_key": "delivery id (connection name and the CRM's id for this change)",
    "change_type": "change type",
    "origin": "change origin",
    "modified_by": "user who made the change",
}


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

    # What is wrong with one value (never quoting it), or None; e.g. a whsec_ key that is not base64.
    check: Callable[[str], str | None] | None = None

    def values(self, connection: ConnectionConfig) -> tuple[str, ...]:
        if self.several:
            return connection.get_list(self.name)
        value = connection.get(self.name)
        return () if value is None else (value,)

    def problem(self, connection: ConnectionConfig, *, ignore_waiver: bool = False) -> WebhookError | None:
        """The 503 its endpoint answers while the setting is missing or malformed; None if usable
        (a missing one the connection waived is usable, unless `ignore_waiver`)."""
        variable = f"{connection.env_prefix}{self.name}"
        cannot = (
            f"{connection.kind} connection {connection.name!r} cannot verify deliveries to {self.endpoint}"
        )
        fix = f"set {variable} to {self.what}, then restart (docs/crms/{connection.kind}.md)"
        values = self.values(connection)
        if not values:
            if self.waived(connection) and not ignore_waiver:
                return None
            return WebhookError(503, "not_configured", f"{cannot}: {variable} is not set", fix)
        for position, value in enumerate(values, start=1):
            wrong = self.check(value) if self.check is not None else None
            if wrong is not None:
                which = f"value {position} of {variable}" if len(values) > 1 else variable
                return WebhookError(503, "bad_secret_config", f"{cannot}: {which} is malformed: {wrong}", fix)
        return None


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
        """Durable first (one transaction), then the nudge; the caller acknowledges after this.
        An id already stored with another content is audited and refused with 409."""
        result = self.inbox.accept(events)
        count_accepted(events, result)
        if result.accepted and self.tasks is not None:
            self.tasks.nudge()
        if result.conflicts:
            raise self._refuse_reused_ids(result.conflicts)
        return result

    def _refuse_reused_ids(self, conflicts: Sequence[RecordChangeEvent]) -> WebhookError:
        with transaction(self.runtime.sessions) as session:
            for event in conflicts:
                audit.record(
                    session,
                    "webhook_id_reused",
                    connection=event.connection,
                    object_type=event.object_type,
                    record_id=event.record_id,
                    source=event.source,
                    event_id=event.event_id,
                    content_hash=event.content_hash,
                    remote_addr=request.remote_addr,
                )
        first = conflicts[0]
        return WebhookError(
            409,
            "webhook_id_reused",
            f"delivery id {first.event_id[:100]!r} was already received with a different body; "
            "this one is refused, the first is kept",
            "give every new message a new id; a retry must resend the same body",
        )


def stored_answer(result: AcceptResult, status: int | None = None) -> Response:
    """The answer to a stored delivery, `{"accepted":n,"duplicates":m}`: 202 when it stored
    something new, else 200 (or `status`). Written out directly rather than through
    `jsonify` (the same compact JSON, without its encoder) since every delivery gets one."""
    body = f'{{"accepted":{int(result.accepted)},"duplicates":{int(result.duplicates)}}}\n'
    if status is None:
        status = 202 if result.accepted else 200
    return current_app.response_class(body, status=status, mimetype="application/json")


def intake() -> Intake:
    return current_app.extensions["crm_approvals"]


# What each delivery would otherwise work out again from the configuration (the connections of
# a kind, a connection's secret values and accepted objects): the configuration is frozen
# (Settings and ConnectionConfig are frozen dataclasses, built once at start-up), so it is
# worked out once per configuration object. Keyed by the object's id, which cannot be reused
# while the entry holds the object; bounded, for processes (tests) that build many.
_DERIVED: dict[tuple[int, str], tuple[object, Any]] = {}
_DERIVED_MAX = 1024


def derived(owner: object, what: str, compute: Callable[[], T]) -> T:
    """`compute()`, worked out once for the configuration object `owner`."""
    key = (id(owner), what)
    hit = _DERIVED.get(key)
    if hit is not None and hit[0] is owner:
        return hit[1]
    value = compute()
    if len(_DERIVED) >= _DERIVED_MAX:
        _DERIVED.clear()
    _DERIVED[key] = (owner, value)
    return value


def resolve_connection(kind: str, name: str | None = None) -> ConnectionConfig:
    """The named connection, or the only one of this kind; a clear 404 otherwise."""
    settings = intake().settings
    candidates = derived(settings, f"kind:{kind}", lambda: settings.connections_of_kind(kind))
    if name is None and request.query_string:
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
    """The setting's configured values, or a 503 naming the variable to set or fix."""
    return require_secrets(connection, secret)[0]


def require_secrets(connection: ConnectionConfig, *secrets: SecretSetting) -> list[tuple[str, ...]]:
    """Each setting's configured values (() for a waived one), or one 503 naming every missing
    or malformed variable, so that fixing the first does not just reveal the next."""
    problems, values = derived(
        connection,
        "secrets:" + ",".join(s.name for s in secrets),
        lambda: _check_secrets(connection, secrets),
    )
    if problems:
        first = problems[0]
        raise WebhookError(
            first.status,
            first.code,
            "; ".join(p.message for p in problems),
            "; ".join(p.hint or "" for p in problems),
        )
    return values


def _check_secrets(
    connection: ConnectionConfig, secrets: Sequence[SecretSetting]
) -> tuple[list[WebhookError], list[tuple[str, ...]]]:
    problems = [p for p in (s.problem(connection) for s in secrets) if p is not None]
    return problems, [s.values(connection) for s in secrets]


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
    """Every secret setting a configured connection lacks or has malformed, as the error its
    endpoint answers (a waived one is not a problem: `report_unconfigured_secrets` warns)."""
    return [problem for problem, waived in _secret_problems(settings) if not waived]


def _secret_problems(settings: Settings) -> list[tuple[WebhookError, bool]]:
    """(the error, whether the connection waived that secret) for every missing or malformed
    secret setting."""
    found = []
    for connection in settings.connections.values():
        secrets: Sequence[SecretSetting] = intake_module(crm_kind(connection.kind)).SECRETS
        for secret in secrets:
            problem = secret.problem(connection, ignore_waiver=True)
            if problem is not None:
                found.append((problem, problem.code == "not_configured" and secret.waived(connection)))
    return found


def report_unconfigured_secrets(settings: Settings) -> None:
    """At start-up: the endpoints of a connection that lacks a secret setting, or has a
    malformed one, refuse every delivery (503) until it is fixed; say so now, naming the
    variable. A secret the connection opted out of is a warning."""
    for problem, waived in _secret_problems(settings):
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
    by_lower = derived(connection, "objects", lambda: _objects_by_lower(connection))
    name = by_lower.get(object_type.lower())
    if name is not None:
        return name
    allowed = accepted_objects(connection)
    raise WebhookError(
        422,
        "unknown_object",
        f"connection {connection.name!r} does not accept {object_type!r} records",
        f"accepted: {', '.join(allowed) or 'none'}; set {connection.env_prefix}OBJECTS to change that",
    )


def _objects_by_lower(connection: ConnectionConfig) -> dict[str, str]:
    """Each accepted object by its lower-case name; the first configured wins, as before."""
    by_lower: dict[str, str] = {}
    for name in accepted_objects(connection):
        by_lower.setdefault(name.lower(), name)
    return by_lower


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
    content_hash: str | None = None,
    modified_by: str | None = None,
) -> RecordChangeEvent:
    """The canonical event for one record change delivered to `connection`. `dedupe_id` is
    what stays the same when the CRM redelivers this change; the connection name is prefixed,
    so one change seen through two connections is two events. `values_signed` says whether the
    channel authenticates the delivery's content (a signature over the body): when not, the
    values are hints and the pipeline judges rules on values it reads from the CRM. Refused
    (400) unless the inbox can store every part as it is: texts within their column widths,
    no NUL or lone surrogate."""
    event = RecordChangeEvent(
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
        content_hash=content_hash,
        modified_by=(modified_by.strip() or None) if isinstance(modified_by, str) else None,
    )
    check_storable(event)
    return event


def check_storable(event: RecordChangeEvent) -> None:
    """Checked at intake so that a value PostgreSQL would refuse (too long for its column, a NUL)
    is the sender's 400, not our 500, and SQLite, which would take it, stores nothing else."""
    limits = _stored_text_limits()
    texts = [getattr(event, name) for name, _label, _limit in limits]
    # The usual event: every text within its width, and one scan of them all (joined, they hold
    # a NUL or surrogate only where one of them does) finds no bad character. Otherwise each
    # text is looked at in turn below, so the first problem is the one named, as it was.
    if not NUL_OR_SURROGATE.search("".join([t for t in texts if t is not None])) and all(
        text is None or len(text) <= limit for text, (_name, _label, limit) in zip(texts, limits, strict=True)
    ):
        texts = []
    for text, (_name, label, limit) in zip(texts, limits, strict=False):
        if text is None:
            continue
        if len(text) > limit:
            raise bad_request(
                "value_too_long",
                f"the {label} is {len(text)} characters long; at most {limit} are accepted",
                "send the CRM's own value unmodified",
            )
        if NUL_OR_SURROGATE.search(text):
            raise bad_request("invalid_characters", f"the {label} holds a NUL character or a lone surrogate")
    problem = unstorable([list(event.changed_fields), event.values], nul=True)
    if problem is not None:
        raise bad_request("invalid_value", f"the changed fields or values cannot be stored: {problem}")


@functools.cache
def _stored_text_limits() -> tuple[tuple[str, str, int], ...]:
    """(event attribute, label, column width) of each text STORED_TEXT names."""
    columns = InboxEvent.__table__.c
    return tuple(
        (name, label, columns[name].type.length)  # type: ignore[attr-defined]  # every one is a String(n)
        for name, label in STORED_TEXT.items()
    )


def require_content_type(*allowed: str) -> None:
    if request.environ.get("CONTENT_TYPE") in allowed:  # exactly one of them, no parameters: no parsing
        return
    got = (request.mimetype or "").lower()
    if got not in allowed:
        raise WebhookError(
            415,
            "unsupported_content_type",
            f"Content-Type {got or '(none)'!r} is not accepted here",
            f"send {' or '.join(allowed)}",
        )


def json_body() -> Any:
    """The request's JSON, refused with a clear 400 unless every value can be judged and stored:
    no NaN or Infinity, no number past float range or MAX_JSON_DIGITS digits, nesting at most
    MAX_JSON_DEPTH deep, no lone surrogates."""
    raw = request.get_data(cache=True)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise bad_request("malformed_json", "the body is not UTF-8 text") from None
    try:
        body = _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise bad_request(
            "malformed_json", f"the body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise bad_request("malformed_json", f"the JSON nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:  # from the hooks below
        raise bad_request("malformed_json", f"the body is not usable JSON: {exc}") from None
    # The parse hooks refused bad numbers; what is left to look for is nesting and lone
    # surrogates. In text decoded as UTF-8 a surrogate can only come from a \uD8xx..\uDFxx
    # escape, and nesting needs brackets: a body with neither needs no walk (the hot path).
    if text.count("{") + text.count("[") > MAX_JSON_DEPTH or SURROGATE_ESCAPE.search(text):
        problem = unstorable(body)
        if problem is not None:
            raise bad_request("malformed_json", f"the body is not usable JSON: {problem}")
    return body


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"the number {text[:40]} is out of range")
    return number


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_JSON_DIGITS:
        raise ValueError(f"a number has more than {MAX_JSON_DIGITS} digits")
    return int(text)


# What json.loads(text, parse_constant=..., ...) would build on every call, built once.
_DECODER = json.JSONDecoder(
    parse_constant=_refuse_constant, parse_float=_finite_float, parse_int=_bounded_int
)


def unstorable(value: Any, *, nul: bool = False) -> str | None:
    """Why a JSON-like value cannot be stored, or None: nesting deeper than MAX_JSON_DEPTH, a
    non-finite float, an int of more than MAX_JSON_DIGITS digits, a lone surrogate in a string
    or key, and with `nul` a NUL character (PostgreSQL stores none). Iterative: depth is the
    problem being looked for. Every delivery's values pass here: a container's children that
    are plain strings or ints are checked where they are met, without a trip through the
    stack."""
    bad_text = NUL_OR_SURROGATE if nul else SURROGATE
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = [*item.keys(), *item.values()]
        elif isinstance(item, list | tuple):
            children = item
        else:
            problem = _scalar_problem(item, bad_text)
            if problem is not None:
                return problem
            continue
        if depth > MAX_JSON_DEPTH:
            return f"it nests deeper than {MAX_JSON_DEPTH} levels"
        for child in children:
            kind = type(child)
            if kind is str:
                if bad_text.search(child):
                    return _text_problem(child)
            elif kind is int:
                if not -_TOO_BIG < child < _TOO_BIG:
                    return f"a number has more than {MAX_JSON_DIGITS} digits"
            else:
                stack.append((child, depth + 1))
    return None


_TOO_BIG = 10**MAX_JSON_DIGITS


def _scalar_problem(item: Any, bad_text: re.Pattern[str]) -> str | None:
    """`unstorable` for anything but a dict, list or tuple."""
    if isinstance(item, str):
        return _text_problem(item) if bad_text.search(item) else None
    if isinstance(item, float) and not math.isfinite(item):
        return "a number is NaN or infinite"
    if isinstance(item, int) and not isinstance(item, bool) and abs(item) >= _TOO_BIG:
        return f"a number has more than {MAX_JSON_DIGITS} digits"
    return None


def _text_problem(text: str) -> str:
    """For a string `unstorable` found a NUL or lone surrogate in: which (the surrogate first)."""
    if SURROGATE.search(text):
        return "a string holds a lone UTF-16 surrogate (not Unicode text)"
    return "a string holds a NUL character"


def whole_number(value: Any, *, max_digits: int = 18) -> int | None:
    """An int, or a string of ASCII digits (surrounding spaces allowed), as an int; None for
    anything else, including bools, signs and numbers of more than `max_digits` digits."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if 0 <= value < 10**max_digits else None
    if isinstance(value, str) and ASCII_DIGITS.fullmatch(value.strip()) and len(value.strip()) <= max_digits:
        return int(value.strip())
    return None


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
        _event_counter(connection, "stored").inc(result.accepted)
    if result.duplicates:
        _event_counter(connection, "duplicate").inc(result.duplicates)


# WEBHOOK_EVENTS' child per (configured connection, outcome): `labels()` validates and joins
# the label values on every call; the child it returns is the same object each time.
_EVENT_COUNTERS: dict[tuple[str, str], Any] = {}


def _event_counter(connection: str, outcome: str) -> Any:
    child = _EVENT_COUNTERS.get((connection, outcome))
    if child is None:
        child = _EVENT_COUNTERS[(connection, outcome)] = WEBHOOK_EVENTS.labels(connection, outcome)
    return child


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
