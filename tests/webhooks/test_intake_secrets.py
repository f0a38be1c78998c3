"""One way for every intake to treat a missing secret setting: a configuration error,
logged at start-up naming the variable to set, and a 503 saying the same at the endpoint."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import func, select

from connector.config import Settings
from connector.crm.registry import KINDS
from connector.runtime import Runtime
from connector.storage.models import InboxEvent
from webhooks.intake import SecretSetting, intake_module

SECRETS = [(kind, secret) for kind in sorted(KINDS) for secret in intake_module(KINDS[kind]).SECRETS]


@pytest.mark.parametrize(("kind", "secret"), SECRETS, ids=[f"{k}-{s.name}" for k, s in SECRETS])
def test_a_missing_secret_setting_is_reported_at_start_up_and_answered_with_503(
    kind: str,
    secret: SecretSetting,
    settings_factory: Callable[..., Settings],
    runtime_factory: Callable[[Settings], Runtime],
    app_factory: Callable[[Runtime], Flask],
    caplog: pytest.LogCaptureFixture,
) -> None:
    variable = f"{kind.upper()}_{secret.name}"
    caplog.set_level(logging.ERROR, logger="webhooks")
    runtime = runtime_factory(settings_factory(env={"CRM_CONNECTIONS": kind, variable: ""}))
    client = app_factory(runtime).test_client()
    started = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(f"{variable} is not set" in line and secret.endpoint in line for line in started), started

    response = client.post(secret.endpoint, data=b"{}", content_type="application/json")
    assert response.status_code == 503
    text = response.get_data(as_text=True)  # JSON, or a SOAP fault on the Outbound Message endpoint
    assert "not_configured" in text
    assert f"{variable} is not set" in text
    with runtime.sessions() as session:
        assert session.scalar(select(func.count()).select_from(InboxEvent)) == 0


def test_a_fully_configured_connection_reports_nothing(
    runtime: Runtime, app_factory: Callable[[Runtime], Flask], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="webhooks")
    app_factory(runtime)  # the default test settings: a sandbox connection with its secret
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_the_start_up_report_never_shows_a_secret(
    settings_factory: Callable[..., Settings],
    runtime_factory: Callable[[Settings], Runtime],
    app_factory: Callable[[Runtime], Flask],
    caplog: pytest.LogCaptureFixture,
) -> None:
    env: dict[str, Any] = {
        "CRM_CONNECTIONS": "salesforce",
        "SALESFORCE_ORG_IDS": "00D5e000000AbCdEAK",
        "SALESFORCE_OUTBOUND_TOKEN": "outbound-token-7f3a",
    }
    app_factory(runtime_factory(settings_factory(env=env)))
    assert "SALESFORCE_EVENTS_SECRET is not set" in caplog.text
    assert "SALESFORCE_ORG_IDS" not in caplog.text  # configured: not reported
    assert "outbound-token-7f3a" not in caplog.text and "00D5e000000AbCdEAK" not in caplog.text
