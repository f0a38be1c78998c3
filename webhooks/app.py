"""The Flask app: receives CRM webhooks and serves the approvals API."""

from __future__ import annotations

import logging

from flask import Flask, Response, jsonify, request
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from connector.config import Settings
from connector.modules import optional_module
from connector.runtime import Runtime
from connector.service.pipeline import Pipeline, build_runtime
from connector.worker import Tasks, make_huey
from webhooks.errors import WebhookError
from webhooks.intake import Intake, log_rejection

log = logging.getLogger("webhooks")

# Each module exposes `blueprint`; a module that is absent is simply not mounted.
BLUEPRINT_MODULES = (
    "webhooks.standard",
    "webhooks.salesforce",
    "webhooks.hubspot",
    "webhooks.zoho",
    "webhooks.bitrix24",
    "webhooks.api",
    "connector.web.app",
)


def create_app(runtime: Runtime | None = None, tasks: Tasks | None = None) -> Flask:
    if runtime is None:
        runtime = build_runtime(Settings.from_env())
    if tasks is None:
        tasks = Tasks(runtime, make_huey(runtime.settings.queue_url))
    app = Flask("crm_approvals")
    app.config["MAX_CONTENT_LENGTH"] = runtime.settings.webhook_max_body_bytes
    app.extensions["crm_approvals"] = Intake(runtime, tasks)
    for module_name in BLUEPRINT_MODULES:
        module = optional_module(module_name)
        if module is not None:
            app.register_blueprint(module.blueprint)
    _register_error_handlers(app)

    @app.before_request
    def refresh_mappings() -> None:
        if request.path.startswith("/api/") and isinstance(runtime.processor, Pipeline):
            runtime.processor.refresh_mappings()

    @app.get("/healthz")
    def healthz() -> ResponseReturnValue:
        """Up, plus any mapping-file errors (the server keeps the last good set meanwhile)."""
        errors = runtime.processor.mappings.errors if isinstance(runtime.processor, Pipeline) else ()
        return jsonify(status="ok", mapping_errors=[str(e) for e in errors])

    return app


def _register_error_handlers(app: Flask) -> None:
    @app.errorhandler(WebhookError)
    def on_webhook_error(error: WebhookError) -> ResponseReturnValue:
        log_rejection(error)
        return jsonify(error.to_json()), error.status

    @app.errorhandler(RequestEntityTooLarge)
    def on_too_large(_error: RequestEntityTooLarge) -> ResponseReturnValue:
        limit = app.config["MAX_CONTENT_LENGTH"]
        error = WebhookError(
            413,
            "body_too_large",
            f"the body is larger than {limit} bytes",
            "raise WEBHOOK_MAX_BODY_BYTES if this is expected",
        )
        return on_webhook_error(error)

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
