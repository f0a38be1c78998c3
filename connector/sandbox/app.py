"""The sandbox CRM's web app: a page to see and edit records, the REST API our adapter uses,
and the sender of signed Standard Webhooks (a queue in the store plus a retry thread).

Local only: the page has no login (docs/crms/sandbox.md says so). It answers only to its own
host name (SANDBOX_URL's, or a loopback name), so a DNS-rebinding page cannot reach it; its
forms carry a CSRF token and a form post from another origin is refused. The API requires the
connection's bearer token instead.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import random
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
from flask import Blueprint, Flask, abort, current_app, jsonify, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue
from flask_wtf.csrf import CSRFError, CSRFProtect
from werkzeug.exceptions import HTTPException

from connector.config import MAIL_CATCHER_HOST, ConfigError, ConnectionConfig, Settings
from connector.errors import CrmApprovalsError
from connector.events import parse_timestamp
from connector.sandbox.security_check import security
from connector.sandbox.seed import ensure_seeded
from connector.sandbox.store import (
    NOT_FOUND,
    ORIGIN_API,
    ORIGIN_USER,
    Delivery,
    InvalidFields,
    ObjectSpec,
    RecordError,
    Store,
    spec_of,
)
from webhooks.signatures import constant_time_equals, sign_standard, standard_secret_problem

log = logging.getLogger("sandbox")

TEMPLATES = Path(__file__).resolve().parent / "templates"
DEFAULT_DB_PATH = "var/sandbox.db"
MAX_BATCH = 100  # records per batch-read / batch-update call
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 200
SEND_TIMEOUT_SECONDS = 5.0
LOCK_SECONDS = 60
PAGE_OBJECTS = {"deals": "deal", "companies": "company", "contracts": "contract"}
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


# --- configuration --------------------------------------------------------------------------


@dataclass(frozen=True)
class SandboxConfig:
    connection: str  # the sandbox connection whose variables this reads
    db_path: str
    webhook_url: str  # our receiver: {PUBLIC_BASE_URL}/webhooks/standard
    api_token: str = field(repr=False)
    webhook_secrets: tuple[str, ...] = field(repr=False)
    rate_limit_per_second: float | None = None
    send_timeout: float = SEND_TIMEOUT_SECONDS
    approver_app_url: str | None = None  # {PUBLIC_BASE_URL}/app/: where approvers sign in
    mail_catcher_url: str | None = None  # the caught mail, when `run` starts the mail catcher
    # The host names (with port, as in a Host header) it answers to besides the loopback names.
    hosts: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings, connection_name: str | None = None) -> SandboxConfig:
        """Read the sandbox connection's variables; ConfigError says what is missing."""
        connection = sandbox_connection(settings, connection_name)
        rate = connection.get_float("RATE_LIMIT_PER_SECOND", 0.0)
        return cls(
            connection=connection.name,
            db_path=connection.get("DB_PATH", DEFAULT_DB_PATH) or DEFAULT_DB_PATH,
            webhook_url=receiver_url(settings, connection),
            api_token=connection.require("API_TOKEN"),
            webhook_secrets=_webhook_secrets(connection),
            rate_limit_per_second=rate if rate > 0 else None,
            approver_app_url=f"{settings.public_base_url}/app/",
            mail_catcher_url=(
                f"http://{MAIL_CATCHER_HOST}:{settings.notify.mail_catcher_port}/"
                if settings.notify.uses_mail_catcher
                else None
            ),
            hosts=(urlsplit(settings.sandbox_url).netloc.lower(),),
        )

    def answers_to(self, host: str) -> bool:
        """Whether a request's Host header names this sandbox: SANDBOX_URL's host and port, or a
        loopback name (any port: the sandbox is local, and a rebinding page names its own host)."""
        host = host.strip().lower()
        if host in self.hosts:
            return True
        try:
            return urlsplit(f"//{host}").hostname in LOOPBACK_NAMES  # port and IPv6 brackets dropped
        except ValueError:
            return False

    @property
    def csrf_key(self) -> bytes:
        """The key that signs the page's session (its CSRF token): derived from the API token,
        so it is secret, stable across restarts, and needs no setting of its own."""
        return hmac.new(self.api_token.encode(), b"sandbox page session", hashlib.sha256).digest()


def sandbox_connection(settings: Settings, name: str | None = None) -> ConnectionConfig:
    if name is not None:
        connection = settings.connection(name)
        if connection.kind != "sandbox":
            raise ConfigError(f"connection {name!r} is a {connection.kind} connection, not a sandbox one")
        return connection
    candidates = settings.connections_of_kind("sandbox")
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ConfigError(
            "no sandbox connection is configured; add CRM_CONNECTIONS=sandbox (see .env.example)"
        )
    names = ", ".join(c.name for c in candidates)
    raise ConfigError(f"several sandbox connections are configured ({names}); choose one with --connection")


def receiver_url(settings: Settings, connection: ConnectionConfig) -> str:
    url = f"{settings.public_base_url}/webhooks/standard"
    # Our intake needs the name only when it cannot tell which sandbox connection is meant.
    return url if len(settings.connections_of_kind("sandbox")) == 1 else f"{url}?connection={connection.name}"


def _webhook_secrets(connection: ConnectionConfig) -> tuple[str, ...]:
    secrets = connection.get_list("WEBHOOK_SECRET")
    hint = "generate one with `crm-approvals init` or as whsec_ + base64 of 24+ random bytes"
    if not secrets:
        raise ConfigError(
            f"connection {connection.name!r} needs {connection.env_prefix}WEBHOOK_SECRET; {hint}"
        )
    for secret in secrets:
        problem = standard_secret_problem(secret)
        if problem is not None:
            raise ConfigError(f"{connection.env_prefix}WEBHOOK_SECRET is malformed: {problem}; {hint}")
    return secrets


# --- API errors and rate limit ----------------------------------------------------------------


class ApiError(CrmApprovalsError):
    """A refusal of the sandbox CRM's own API, sent as its error body with `status`."""

    code: str

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        hint: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, code=code, hint=hint)
        self.status = status
        self.headers = dict(headers or {})


def error_body(code: str, message: str, hint: str | None = None) -> dict[str, Any]:
    """The API's error body: {"error": {"code", "message", "hint"?}}."""
    error: dict[str, Any] = {"code": code, "message": message}
    if hint:
        error["hint"] = hint
    return {"error": error}


def result_item(record_id: str, error: RecordError | None = None) -> dict[str, Any]:
    """One batch-update result: {"id", "ok"} plus {"error": {"code", "message", "field"}} on failure."""
    item: dict[str, Any] = {"id": record_id, "ok": error is None}
    if error is not None:
        item["error"] = error.to_json()
    return item


class RateLimiter:
    """At most `per_second` API calls in a sliding window (off when None), so the adapter's
    429/Retry-After path can be watched."""

    def __init__(self, per_second: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_second = per_second
        self.clock = clock
        self.capacity = max(1, math.floor(per_second)) if per_second else 0
        self.window = self.capacity / per_second if per_second else 0.0
        self._calls: deque[float] = deque()
        self._lock = threading.Lock()

    def wait_needed(self) -> float | None:
        """None if this call may go ahead (and counts it), else seconds until it may."""
        if self.per_second is None:
            return None
        now = self.clock()
        with self._lock:
            while self._calls and self._calls[0] <= now - self.window:
                self._calls.popleft()
            if len(self._calls) >= self.capacity:
                return self.window - (now - self._calls[0])
            self._calls.append(now)
            return None


# --- webhooks out -----------------------------------------------------------------------------


def signed_headers(secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """Standard Webhooks headers; one v1 signature per secret, for rotation."""
    return {
        "Content-Type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(sign_standard(s, msg_id, timestamp, body) for s in secrets),
    }


def retry_delay(attempts: int) -> float:
    """5 s, 15 s, 45 s ... up to 10 minutes, with jitter (as Standard Webhooks recommends)."""
    return min(600.0, 5.0 * 3**attempts) * random.uniform(0.9, 1.1)


class WebhookSender:
    def __init__(
        self,
        store: Store,
        url: str,
        secrets: Sequence[str],
        *,
        timeout: float = SEND_TIMEOUT_SECONDS,
        session: requests.Session | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.url = url
        self.secrets = tuple(secrets)
        self.timeout = timeout
        self.session = session or requests.Session()
        self.now = now

    def send_now(self, msg_id: str) -> Delivery | None:
        """Try one webhook right after its change; it stays queued if that fails."""
        claimed = self.store.claim(msg_id)
        if claimed is not None:
            self._attempt(claimed)
        return self.store.delivery(msg_id)

    def deliver_due(self) -> int:
        """Send every queued webhook that is due; returns how many were delivered."""
        return sum(self._attempt(delivery) for delivery in self.store.claim_due())

    def _attempt(self, delivery: Delivery) -> bool:
        # The id stays the same on every attempt (our dedupe key); the timestamp is fresh.
        headers = signed_headers(self.secrets, delivery.msg_id, int(self.now()), delivery.body)
        try:
            # A redirect is a failure, not something to follow (Standard Webhooks, "Delivery success").
            response = self.session.post(
                self.url, data=delivery.body, headers=headers, timeout=self.timeout, allow_redirects=False
            )
        except requests.RequestException as exc:
            return self._failed(delivery, None, f"{type(exc).__name__}: {exc}")
        if 200 <= response.status_code < 300:
            self.store.mark_delivered(delivery.id, response.status_code)
            return True
        return self._failed(delivery, response.status_code, _describe_refusal(response))

    def _failed(self, delivery: Delivery, status: int | None, error: str) -> bool:
        log.warning(
            "webhook %s to %s failed (attempt %d): %s",
            delivery.msg_id,
            self.url,
            delivery.attempts + 1,
            error,
        )
        self.store.mark_failed(delivery.id, status, error, retry_delay(delivery.attempts))
        return False


def _describe_refusal(response: requests.Response) -> str:
    try:
        error = response.json()["error"]
        return f"HTTP {response.status_code} {error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}: {response.text[:200]}"


class DeliveryLoop:
    """A background thread that sends queued webhooks when due, and at once when woken."""

    def __init__(self, sender: WebhookSender, interval: float = 1.0) -> None:
        self.sender = sender
        self.interval = interval
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sandbox-webhooks", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sender.deliver_due()
            except Exception:  # keep the thread alive: the queue is retried on the next round
                log.exception("sending queued webhooks failed; trying again shortly")
            self._wake.wait(self.interval)
            self._wake.clear()


# --- the app ----------------------------------------------------------------------------------


@dataclass
class Sandbox:
    config: SandboxConfig
    store: Store
    sender: WebhookSender
    limiter: RateLimiter
    loop: DeliveryLoop | None = None

    def wake_sender(self) -> None:
        if self.loop is not None:
            self.loop.wake()


def sandbox() -> Sandbox:
    return current_app.extensions["sandbox"]


def create_sandbox_app(
    config: SandboxConfig,
    *,
    store: Store | None = None,
    session: requests.Session | None = None,
    start_delivery: bool = True,
    rate_clock: Callable[[], float] = time.monotonic,
    reset: bool = False,
) -> Flask:
    """The sandbox app; seeds an empty store (or a reset one). With `start_delivery` a thread
    sends queued webhooks; without it the caller runs `sender.deliver_due()`."""
    store = store or Store(config.db_path)
    if ensure_seeded(store, reset=reset):
        log.info("sandbox store %s seeded", config.db_path)
    sender = WebhookSender(
        store, config.webhook_url, config.webhook_secrets, timeout=config.send_timeout, session=session
    )
    state = Sandbox(config, store, sender, RateLimiter(config.rate_limit_per_second, rate_clock))
    app = Flask("crm_approvals_sandbox", template_folder=str(TEMPLATES))
    app.secret_key = config.csrf_key
    app.extensions["sandbox"] = state
    csrf = CSRFProtect(app)
    csrf.exempt(api)  # bearer-token calls from our adapter, not a browser's cookies
    csrf.exempt(security)  # the security-check service: bearer-token calls from our worker
    app.jinja_env.filters["when"] = _when
    app.jinja_env.filters["status_class"] = _status_class
    app.jinja_env.globals.update(
        approver_app_url=config.approver_app_url, mail_catcher_url=config.mail_catcher_url
    )
    app.before_request(_check_host_and_origin)
    app.register_blueprint(pages)
    app.register_blueprint(api, url_prefix="/api/v1")
    app.register_blueprint(security)
    _register_error_handlers(app)
    if start_delivery:
        state.loop = DeliveryLoop(sender)
        state.loop.start()
    return app


def _check_host_and_origin() -> None:
    """Refuse a Host the sandbox is not (DNS rebinding: another site's name pointing here) and,
    on a form post, an Origin other than the page's own (a cross-site form). Both are 4xx
    saying so; the CSRF token then covers browsers that send no Origin."""
    config = sandbox().config
    if not config.answers_to(request.host):
        raise ApiError(
            400,
            "UNKNOWN_HOST",
            f"this sandbox does not answer to Host {request.host[:100]!r}",
            f"open it as {config.hosts[0] if config.hosts else 'http://127.0.0.1:<port>'} (SANDBOX_URL)",
        )
    if request.method not in ("GET", "HEAD", "OPTIONS") and not request.path.startswith("/api/"):
        origin = request.headers.get("Origin")
        if origin is not None and origin.rstrip("/").lower() != request.host_url.rstrip("/").lower():
            raise ApiError(
                403,
                "CROSS_ORIGIN",
                f"a form post from {origin[:100]!r} is refused: only the sandbox's own pages may post here",
                "edit records on the sandbox page itself",
            )


def _register_error_handlers(app: Flask) -> None:
    @app.errorhandler(CSRFError)
    def on_csrf_error(error: CSRFError) -> ResponseReturnValue:
        message = f"{error.description} Reload the page and submit the form again."
        return jsonify(error_body("CSRF_FAILED", message)), 400

    @app.errorhandler(ApiError)
    def on_api_error(error: ApiError) -> ResponseReturnValue:
        return jsonify(error_body(error.code, error.message, error.hint)), error.status, error.headers

    @app.errorhandler(HTTPException)
    def on_http_error(error: HTTPException) -> ResponseReturnValue:
        if not request.path.startswith("/api/"):
            return error
        code = (error.name or "error").upper().replace(" ", "_")
        return jsonify(error_body(code, error.description or "")), error.code or 500

    @app.errorhandler(Exception)
    def on_unexpected(error: Exception) -> ResponseReturnValue:
        if isinstance(error, sqlite3.OperationalError) and "locked" in str(error):
            busy = ApiError(503, "BUSY", "the sandbox store is busy", "try again", {"Retry-After": "1"})
            return on_api_error(busy)
        log.exception("unhandled error on %s %s", request.method, request.path)
        return jsonify(error_body("INTERNAL_ERROR", "internal error")), 500


# --- the page -----------------------------------------------------------------------------------

pages = Blueprint("pages", __name__)


@pages.get("/")
def index() -> ResponseReturnValue:
    state = sandbox()
    write_backs = state.store.last_write_backs("deal")
    return render_template(
        "index.html",
        deals=state.store.records("deal"),
        companies=state.store.records("company"),
        contracts=state.store.records("contract"),
        users={u["id"]: u for u in state.store.records("user")},
        write_backs=write_backs,
        last_write_back=max(write_backs.values(), default=None),
        pending=state.store.pending_deliveries(),
        recent=state.store.recent_deliveries(),
        webhook_url=state.config.webhook_url,
    )


@pages.route("/deals/<record_id>", methods=["GET", "POST"], defaults={"kind": "deals"})
@pages.route("/companies/<record_id>", methods=["GET", "POST"], defaults={"kind": "companies"})
@pages.route("/contracts/<record_id>", methods=["GET", "POST"], defaults={"kind": "contracts"})
def edit(kind: str, record_id: str) -> ResponseReturnValue:
    state = sandbox()
    object_type = PAGE_OBJECTS[kind]
    if state.store.get(object_type, record_id) is None:
        abort(404, f"no {object_type} {record_id!r}")
    if request.method == "GET":
        return _edit_page(kind, record_id)
    values = _form_values(spec_of(object_type))
    editor = request.form.get("edited_by", "").strip() or None  # who the page edits as
    try:
        change = state.store.update(
            object_type, record_id, values, ORIGIN_USER, from_form=True, modified_by=editor
        )
    except InvalidFields as invalid:
        return _edit_page(kind, record_id, values=values, errors=invalid.errors), 422
    if change.msg_id is not None:
        state.sender.send_now(change.msg_id)
    return redirect(url_for("pages.edit", kind=kind, record_id=record_id, saved=change.msg_id or "none"), 303)


@pages.post("/deals/<record_id>/lock")
def lock(record_id: str) -> ResponseReturnValue:
    store = sandbox().store
    if store.get("deal", record_id) is None:
        abort(404, f"no deal {record_id!r}")
    store.lock("deal", record_id, LOCK_SECONDS)
    return redirect(url_for("pages.edit", kind="deals", record_id=record_id), 303)


@pages.post("/deliveries/retry")
def retry_deliveries() -> ResponseReturnValue:
    state = sandbox()
    state.store.retry_all_now()
    state.wake_sender()
    return redirect(url_for("pages.index"), 303)


def _edit_page(
    kind: str,
    record_id: str,
    values: Mapping[str, Any] | None = None,
    errors: list[RecordError] | None = None,
) -> str:
    state = sandbox()
    object_type = PAGE_OBJECTS[kind]
    record = state.store.get(object_type, record_id) or {}
    saved = request.args.get("saved")
    return render_template(
        "edit.html",
        kind=kind,
        spec=spec_of(object_type),
        record=record,
        values={**record, **(values or {})},
        errors={e.field: e.message for e in errors or []},
        saved=saved,
        delivery=state.store.delivery(saved) if saved and saved != "none" else None,
        locked_until=state.store.locked_until(object_type, record_id),
        options=_reference_options(),
        # Edit as the user who edited last (else the owner): as a CRM would know who is signed in.
        edited_by=request.form.get("edited_by") or record.get("modified_by_id") or record.get("owner_id"),
        files=attachments.latest_attachments(state.store, object_type, record_id),
    )


def _form_values(spec: ObjectSpec) -> dict[str, Any]:
    """The editable fields as the form sent them (an unticked checkbox list is sent as nothing)."""
    return {
        f.name: request.form.getlist(f.name) if f.type == "multipicklist" else request.form.get(f.name, "")
        for f in spec.editable
    }


def _reference_options() -> dict[str, list[tuple[str, str]]]:
    store = sandbox().store
    return {name: [(r["id"], r["name"]) for r in store.records(name)] for name in ("user", "company")}


def _when(value: str | None) -> str:
    """2026-11-23T10:00:00.123456Z -> 2026-11-23 10:00:00 UTC"""
    return f"{value[:10]} {value[11:19]} UTC" if value else "-"


def _status_class(status: str | None) -> str:
    text = (status or "").lower()
    checks = (("non-valid", "bad"), ("approv", "ok"), ("reject", "bad"), ("expire", "bad"), ("pend", "wait"))
    for word, css in checks:
        if word in text:
            return css
    return "none"


# --- the REST API ---------------------------------------------------------------------------------

api = Blueprint("api", __name__)


@api.before_request
def guard() -> None:
    _authenticate()
    wait = sandbox().limiter.wait_needed()
    if wait is not None:
        raise ApiError(
            429,
            "RATE_LIMITED",
            f"more than {sandbox().config.rate_limit_per_second:g} API calls per second",
            "wait Retry-After seconds (SANDBOX_RATE_LIMIT_PER_SECOND sets the limit)",
            {"Retry-After": str(max(1, math.ceil(wait)))},
        )


def _authenticate() -> None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    realm = 'Bearer realm="sandbox"'
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(
            401,
            "MISSING_TOKEN",
            "this API needs an Authorization: Bearer <token> header",
            "send the connection's SANDBOX_API_TOKEN",
            {"WWW-Authenticate": realm},
        )
    if not constant_time_equals(token.strip(), sandbox().config.api_token):
        raise ApiError(
            401,
            "INVALID_TOKEN",
            "the bearer token is not this sandbox's API token",
            "use the same SANDBOX_API_TOKEN for the sandbox and the connector",
            {"WWW-Authenticate": f'{realm}, error="invalid_token"'},
        )


@api.get("/objects/<object_type>/describe")
def describe(object_type: str) -> ResponseReturnValue:
    spec = _spec(object_type)
    fields = [
        {
            "name": f.name,
            "label": f.label,
            "type": f.type,
            "updateable": f.updateable,
            "required": f.required,
            "values": list(f.values),
            "reference_to": [f.reference_to] if f.reference_to else [],
            "relationship_name": f.relationship_name,
        }
        for f in spec.fields
    ]
    return jsonify(object=spec.name, label=spec.label, fields=fields)


@api.get("/objects/<object_type>/<record_id>")
def read_one(object_type: str, record_id: str) -> ResponseReturnValue:
    spec = _spec(object_type)
    names = _field_names(spec, _split(request.args.get("fields")))
    record = sandbox().store.get(spec.name, record_id)
    if record is None:
        raise ApiError(404, NOT_FOUND, f"{spec.name} {record_id!r} does not exist")
    return jsonify(_record_json(record, names))


@api.post("/objects/<object_type>/batch-read")
def batch_read(object_type: str) -> ResponseReturnValue:
    spec = _spec(object_type)
    body = _json_object()
    ids = body.get("ids")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ApiError(
            400, "BAD_REQUEST", "ids must be a list of record ids", 'send {"ids": [...], "fields": [...]}'
        )
    _check_batch_size(len(ids))
    fields = body.get("fields")
    if fields is not None and (not isinstance(fields, list) or not all(isinstance(f, str) for f in fields)):
        raise ApiError(400, "BAD_REQUEST", "fields must be a list of field names")
    names = _field_names(spec, fields)
    found = sandbox().store.get_many(spec.name, ids)
    return jsonify(
        records=[_record_json(found[i], names) for i in dict.fromkeys(ids) if i in found],
        not_found=[i for i in dict.fromkeys(ids) if i not in found],
    )


@api.post("/objects/<object_type>/batch-update")
def batch_update(object_type: str) -> ResponseReturnValue:
    spec = _spec(object_type)
    records = _json_object().get("records")
    if not isinstance(records, list):
        raise ApiError(
            400, "BAD_REQUEST", "records must be a list", 'send {"records": [{"id": ..., "fields": {...}}]}'
        )
    _check_batch_size(len(records))
    for index, item in enumerate(records):
        if not (
            isinstance(item, dict)
            and isinstance(item.get("id"), str)
            and isinstance(item.get("fields"), dict)
        ):
            raise ApiError(400, "BAD_REQUEST", f'records[{index}] must be {{"id": string, "fields": object}}')
    results = [_update_one(spec, item["id"], item["fields"]) for item in records]
    sandbox().wake_sender()
    return jsonify(results=results)


@api.get("/objects/<object_type>")
def query(object_type: str) -> ResponseReturnValue:
    spec = _spec(object_type)
    args = request.args
    names = _field_names(spec, _split(args.get("fields")))
    filters = {
        key[7:-1]: value for key, value in args.items() if key.startswith("filter[") and key.endswith("]")
    }
    try:
        since = parse_timestamp(args["modified_since"]) if args.get("modified_since") else None
    except ValueError:
        raise ApiError(
            400, "BAD_REQUEST", "modified_since must be an ISO 8601 time or Unix seconds"
        ) from None
    try:
        page = sandbox().store.query(
            spec.name,
            modified_since=since,
            filters=filters,
            cursor=args.get("cursor"),
            limit=_limit(args.get("limit")),
        )
    except RecordError as error:
        raise ApiError(400, error.code, error.message) from None
    return jsonify(records=[_record_json(r, names) for r in page.records], next_cursor=page.next_cursor)


def _update_one(spec: ObjectSpec, record_id: str, fields: dict[str, Any]) -> dict[str, Any]:
    try:
        sandbox().store.update(spec.name, record_id, fields, ORIGIN_API)
    except RecordError as error:
        return result_item(record_id, error)
    return result_item(record_id)


def _spec(object_type: str) -> ObjectSpec:
    try:
        return spec_of(object_type)
    except RecordError as error:
        raise ApiError(404, error.code, error.message) from None


def _field_names(spec: ObjectSpec, wanted: Sequence[str] | None) -> list[str]:
    if not wanted:
        return [f.name for f in spec.fields]
    unknown = [name for name in wanted if spec.field(name) is None]
    if unknown:
        raise ApiError(400, "UNKNOWN_FIELD", f"{spec.name} has no field {unknown[0]!r}", "see describe")
    return list(dict.fromkeys(wanted))


def _record_json(record: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
    return {"id": record["id"], "fields": {name: record.get(name) for name in names}}


def _json_object() -> dict[str, Any]:
    if request.mimetype != "application/json":
        raise ApiError(
            415, "UNSUPPORTED_MEDIA_TYPE", f"Content-Type {request.mimetype!r}", "send application/json"
        )
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ApiError(400, "MALFORMED_JSON", "the body is not a JSON object")
    return body


def _check_batch_size(count: int) -> None:
    if count > MAX_BATCH:
        raise ApiError(
            400,
            "LIMIT_EXCEEDED",
            f"{count} records in one call; at most {MAX_BATCH}",
            "split it into smaller calls",
        )


def _limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_PAGE_SIZE
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_PAGE_SIZE:
        raise ApiError(400, "BAD_REQUEST", f"limit must be a whole number from 1 to {MAX_PAGE_SIZE}")
    return int(raw)


def _split(raw: str | None) -> list[str] | None:
    return [part.strip() for part in raw.split(",") if part.strip()] if raw else None


# Files on records add their routes to the blueprints above (before any app registers them).
from connector.sandbox import attachments  # noqa: E402
