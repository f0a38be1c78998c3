"""The one table of CRM kinds (connector/crm/registry.py): every row loads, a misspelt one
fails at start-up, and a fifth CRM needs nothing but its own modules and one row."""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
import responses
from flask import Flask
from sqlalchemy import select

from connector.config import ConfigError, Settings
from connector.crm.base import CRMAdapter
from connector.crm.registry import KINDS, CRMKind, adapter_class
from connector.runtime import Runtime
from connector.storage.models import InboxEvent
from tests.crm.pipedrive_kind import PipedriveAdapter
from webhooks.app import create_app

PIPEDRIVE = CRMKind(
    name="pipedrive",
    adapter="tests.crm.pipedrive_kind:PipedriveAdapter",
    intake="tests.crm.pipedrive_kind",
    default_objects=("deals", "organizations"),
)
PIPEDRIVE_ENV = {
    "CRM_CONNECTIONS": "pipedrive",
    "PIPEDRIVE_COMPANY_DOMAIN": "acme",
    "PIPEDRIVE_API_TOKEN": "pd-api-token-1234",
    "PIPEDRIVE_WEBHOOK_PASSWORD": "pd-hook-password-5678",
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_row_names_an_adapter_and_an_intake_that_load(kind: str) -> None:
    row = KINDS[kind]
    cls = row.adapter_class()
    assert issubclass(cls, CRMAdapter) and cls.kind == kind
    module = row.intake_module()
    assert module.blueprint.deferred_functions, f"{row.intake} mounts no route"
    assert module.SECRETS, f"{row.intake} checks no secret setting"
    assert row.default_objects


def test_an_unknown_kind_in_crm_connections_is_a_start_up_error(
    settings_factory: Callable[..., Settings],
) -> None:
    settings = settings_factory(env={"CRM_CONNECTIONS": "crm=hubspto"})
    with pytest.raises(
        ConfigError, match=r"unknown CRM kind 'hubspto' in CRM_CONNECTIONS; supported: bitrix24"
    ):
        Runtime.from_settings(settings)


def test_a_misspelt_intake_module_stops_the_app_at_start_up(
    monkeypatch: pytest.MonkeyPatch, runtime: Runtime
) -> None:
    monkeypatch.setitem(KINDS, "hubspot", replace(KINDS["hubspot"], intake="webhooks.hubspto"))
    with pytest.raises(
        ImportError, match=r"'hubspot': module 'webhooks.hubspto' does not exist.*registry.py"
    ):
        create_app(runtime)


@pytest.mark.parametrize(
    "adapter",
    ["connector.crm.hubspto:HubSpotAdapter", "connector.crm.hubspot:HubspotAdapter"],
)
def test_a_misspelt_adapter_is_an_error_naming_the_row(monkeypatch: pytest.MonkeyPatch, adapter: str) -> None:
    monkeypatch.setitem(KINDS, "hubspot", replace(KINDS["hubspot"], adapter=adapter))
    with pytest.raises(ImportError, match=r"CRM kind 'hubspot'.*registry.py"):
        adapter_class("hubspot")


def test_a_module_missing_one_of_its_own_imports_is_not_reported_as_a_misspelt_row(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    (tmp_path / "broken_intake.py").write_text("import no_such_library_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(KINDS, "hubspot", replace(KINDS["hubspot"], intake="broken_intake"))
    with pytest.raises(ModuleNotFoundError, match="no_such_library_xyz"):
        KINDS["hubspot"].intake_module()


# --- a fifth CRM: one row plus its own modules ------------------------------------------------


@pytest.fixture
def pipedrive(
    monkeypatch: pytest.MonkeyPatch,
    settings_factory: Callable[..., Settings],
    runtime_factory: Callable[[Settings], Runtime],
    app_factory: Callable[[Runtime], Flask],
) -> Callable[..., tuple[Runtime, Flask]]:
    monkeypatch.setitem(KINDS, PIPEDRIVE.name, PIPEDRIVE)  # the one edit outside its own modules

    def make(**env: str) -> tuple[Runtime, Flask]:
        runtime = runtime_factory(settings_factory(env={**PIPEDRIVE_ENV, **env}))
        return runtime, app_factory(runtime)

    return make


def pipedrive_webhook(entity: str = "deal", record_id: int = 42) -> dict[str, Any]:
    """A Pipedrive webhooks v2 `change` delivery."""
    return {
        "data": {"id": record_id, "title": "Big deal", "value": 150000, "currency": "EUR"},
        "previous": {"value": 90000},
        "meta": {
            "action": "change",
            "entity": entity,
            "entity_id": str(record_id),
            "id": "0b6b4f1e-3c1a-4a51-9e0c-8a1f5c1d2e3f",
            "timestamp": "2026-11-23T10:00:00.000Z",
            "version": "2.0",
        },
    }


def post(
    app: Flask, body: dict[str, Any], password: str = PIPEDRIVE_ENV["PIPEDRIVE_WEBHOOK_PASSWORD"]
) -> Any:
    basic = base64.b64encode(f"crm-approvals:{password}".encode()).decode()
    return app.test_client().post(
        "/webhooks/pipedrive", json=body, headers={"Authorization": f"Basic {basic}"}
    )


def test_a_fifth_crm_gets_its_blueprint_its_default_objects_and_its_adapter(
    pipedrive: Callable[..., tuple[Runtime, Flask]],
) -> None:
    runtime, app = pipedrive()
    assert "/webhooks/pipedrive" in {rule.rule for rule in app.url_map.iter_rules()}

    response = post(app, pipedrive_webhook())
    assert response.status_code == 202, response.get_json()
    with runtime.sessions() as session:
        [row] = session.scalars(select(InboxEvent)).all()
    assert (row.source, row.connection, row.object_type, row.record_id) == (
        "pipedrive",
        "pipedrive",
        "deals",
        "42",
    )
    assert row.dedupe_key == "pipedrive:pipedrive:0b6b4f1e-3c1a-4a51-9e0c-8a1f5c1d2e3f"
    assert row.changed_fields == ["value"]
    assert row.occurred_at.replace(tzinfo=UTC) == datetime(2026, 11, 23, 10, 0, tzinfo=UTC)

    refused = post(app, pipedrive_webhook(entity="person"))  # not among its default objects
    assert refused.status_code == 422
    assert "accepted: deals, organizations" in refused.get_json()["error"]["hint"]

    adapter = runtime.adapter("pipedrive")
    assert isinstance(adapter, PipedriveAdapter)
    with responses.RequestsMock() as rsps:
        rsps.get(
            "https://acme.pipedrive.com/api/v1/deals/42",
            json={"success": True, "data": {"id": 42, "title": "Big deal", "value": 150000}},
        )
        assert adapter.get_record("deals", "42", ["title", "value"]) == {"title": "Big deal", "value": 150000}
        assert f"api_token={PIPEDRIVE_ENV['PIPEDRIVE_API_TOKEN']}" in str(rsps.calls[0].request.url)


def test_a_fifth_crm_without_its_secret_is_reported_at_start_up_and_answers_503(
    pipedrive: Callable[..., tuple[Runtime, Flask]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="webhooks")
    runtime, app = pipedrive(PIPEDRIVE_WEBHOOK_PASSWORD="")
    assert "PIPEDRIVE_WEBHOOK_PASSWORD is not set" in caplog.text
    response = post(app, pipedrive_webhook())
    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "not_configured"
    with runtime.sessions() as session:
        assert session.scalars(select(InboxEvent)).all() == []
