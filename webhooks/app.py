"""The Flask app: receives CRM webhooks and serves the approvals API."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable
from typing import Any

from flask import Flask, Request, Response, jsonify, request
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.wsgi import get_content_length

from connector.config import Settings
from connector.crm.registry import KINDS
from connector.errors import CrmApprovalsError
from connector.runtime import Runtime
from connector.service.pipeline import refresh_mappings
from connector.web import app as web_app
from connector.wiring import build_runtime
from connector.worker import Tasks, make_huey
from webhooks import api, checks, dead_letters_api, delegations_api, documents_api, ops
from webhooks.errors import WebhookError, refusal
from webhooks.intake import Intake, intake_module, log_rejection, report_unconfigured_secrets

log = logging.getLogger("webhooks")


def create_app(runtime: Runtime | None = None, tasks: Tasks | None = None) -> Flask:
    if runtime is None:
        runtime = build_runtime(Settings.from_env())
    if tasks is None:
        tasks = Tasks(runtime, make_huey(runtime.settings.queue_url))
    app = Flask("crm_approvals")
    app.session_interface = WebhookSessionless()
    app.config["MAX_CONTENT_LENGTH"] = runtime.settings.webhook_max_body_bytes
    app.wsgi_app = BoundedChunkedBody(app.wsgi_app, runtime.settings.webhook_max_body_bytes)  # type: ignore[method-assign]
    app.extensions["crm_approvals"] = Intake(runtime, tasks)
    # One intake blueprint per CRM kind (connector/crm/registry.py); a missing module fails here.
    for module in dict.fromkeys(intake_module(kind) for kind in KINDS.values()):
        app.register_blueprint(module.blueprint)
    # ops: /livez, /healthz, /metrics; the web app for people under /app (connector/web)
    for blueprint in (
        api.blueprint,
        delegations_api.blueprint,
        dead_letters_api.blueprint,
        documents_api.blueprint,
        ops.blueprint,
        web_app.blueprint,
    ):
        app.register_blueprint(blueprint)
    app.register_blueprint(checks.blueprint)  # issue 12: signed answers of external checks
    report_unconfigured_secrets(runtime.settings)
    _register_error_handlers(app)

    @app.before_request
    def refresh_api_mappings() -> None:
        if request.path.startswith("/api/") and runtime.mappings is not None:
            refresh_mappings(runtime.mappings)

    return app


class WebhookSessionless(SecureCookieSessionInterface):
    """Signed-cookie sessions (the web app's sign-in), except on the CRM intakes: a request to
    /webhooks/... gets Flask's null session, so its cookies are not parsed nor its session
    signature checked, and nothing is saved after it. Webhooks authenticate each delivery by
    its signature and never use a session; the answers are the same (no Set-Cookie either way),
    it only saves the CPU (with SECRET_KEY set, building the signing serializer and reading the
    cookies cost about a fifth of an intake request's CPU in Flask; bench/ingest)."""

    def open_session(self, app: Flask, request: Request) -> SecureCookieSession | None:
        if request.path.startswith("/webhooks/"):
            return self.make_null_session(app)
        return super().open_session(app, request)


class BoundedChunkedBody:
    """WSGI middleware: a body sent without Content-Length (chunked) is read here, at most one
    byte past the limit. werkzeug would stop reading at the limit and hand on a body cut short
    (answered `malformed_json`); instead the body is passed on with its real length, or, when
    it is over the limit, with a length that makes werkzeug raise RequestEntityTooLarge, which
    the endpoint answers with 413 in its own format (JSON, or a SOAP fault)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        # wsgi.input_terminated: the server ends the stream itself (gunicorn; werkzeug's
        # server for chunked bodies), so reading to its end cannot hang.
        if get_content_length(environ) is None and environ.get("wsgi.input_terminated"):
            body = _read_at_most(environ["wsgi.input"], self.limit + 1)
            environ["wsgi.input"] = io.BytesIO(body if len(body) <= self.limit else b"")
            environ["CONTENT_LENGTH"] = str(len(body))
            environ.pop("HTTP_TRANSFER_ENCODING", None)  # else werkzeug ignores CONTENT_LENGTH
        return self.app(environ, start_response)


def _read_at_most(stream: Any, size: int) -> bytes:
    chunks: list[bytes] = []
    left = size
    while left > 0:
        chunk = stream.read(min(left, 64 * 1024))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _register_error_handlers(app: Flask) -> None:
    @app.errorhandler(CrmApprovalsError)
    def on_error(error: CrmApprovalsError) -> ResponseReturnValue:
        answer = refusal(error)  # the status from webhooks/errors.py ERROR_STATUS
        log_rejection(answer)
        return jsonify(answer.to_json()), answer.status

    @app.errorhandler(RequestEntityTooLarge)
    def on_too_large(_error: RequestEntityTooLarge) -> ResponseReturnValue:
        limit = app.config["MAX_CONTENT_LENGTH"]
        error = WebhookError(
            413,
            "body_too_large",
            f"the body is larger than {limit} bytes",
            "raise WEBHOOK_MAX_BODY_BYTES if this is expected",
        )
        return on_error(error)

    @app.errorhandler(HTTPException)
    def on_http_error(error: HTTPException) -> ResponseReturnValue:
        body = {
            "error": {"code": (error.name or "error").lower().replace(" ", "_"), "message": error.description}
        }
        return jsonify(body), error.code or 500

    @app.errorhandler(Exception)
    def on_unexpected(error: Exception) -> ResponseReturnValue:
        # A bug, not bad input: log it with the stack, say nothing internal to the caller.
        log.exception("unhandled error on %s %s", request.method, request.path)
        return Response(
            '{"error": {"code": "internal_error", "message": "internal error"}}',
            500,
            mimetype="application/json",
        )
