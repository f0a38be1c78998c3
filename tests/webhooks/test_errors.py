"""The app's error handlers answer every error of the root with the status chosen in
webhooks/errors.py, in the WebhookError JSON shape; one without a status is a bug (bare 500)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from flask import Flask

from connector import errors
from connector.config import ConfigError
from connector.runtime import Runtime
from webhooks.errors import WebhookError


def app_raising(app_factory: Callable[[Runtime], Flask], runtime: Runtime, error: Exception) -> Flask:
    app = app_factory(runtime)

    def fail() -> str:
        raise error

    app.add_url_rule("/test-raise", "test_raise", fail, methods=["POST"])
    return app


def test_a_config_error_at_request_time_is_503_naming_the_setting(
    runtime: Runtime, app_factory: Callable[[Runtime], Flask]
) -> None:
    error = ConfigError("connection 'sandbox' (sandbox) needs SANDBOX_WEBHOOK_SECRET; copy it from the page")
    response = app_raising(app_factory, runtime, error).test_client().post("/test-raise")
    assert response.status_code == 503
    assert response.get_json() == {"error": {"code": "config_error", "message": str(error)}}


def test_a_webhook_error_keeps_its_status_and_json_shape(
    runtime: Runtime, app_factory: Callable[[Runtime], Flask]
) -> None:
    error = WebhookError(422, "unknown_object", "object 'Invoices' is not configured", "add it to OBJECTS")
    response = app_raising(app_factory, runtime, error).test_client().post("/test-raise")
    assert response.status_code == 422
    assert response.get_json() == {
        "error": {
            "code": "unknown_object",
            "message": "object 'Invoices' is not configured",
            "hint": "add it to OBJECTS",
        }
    }


def test_an_error_without_a_chosen_status_is_a_bare_500(
    runtime: Runtime, app_factory: Callable[[Runtime], Flask], caplog: pytest.LogCaptureFixture
) -> None:
    error = errors.FatalError("internal detail that must not reach the caller", code="oops")
    response = app_raising(app_factory, runtime, error).test_client().post("/test-raise")
    assert response.status_code == 500
    assert response.get_json() == {"error": {"code": "internal_error", "message": "internal error"}}
    assert "no HTTP status is chosen for FatalError" in caplog.text
