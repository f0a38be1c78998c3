"""The intake contract: every CRM's webhook endpoint accepts a correctly signed delivery in
its documented format, refuses forged and stale ones with a clear 4xx, drops redeliveries,
and answers 503 naming the variable to set while its secret setting is missing."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import select

from connector.config import Settings, parse_connections
from connector.crm.registry import crm_kind
from connector.runtime import Runtime
from connector.storage.models import InboxEvent
from tests.contract.discover import intake_harnesses
from tests.contract.harness import Delivery, IntakeHarness
from webhooks.intake import intake_module

HARNESSES = intake_harnesses()


@pytest.fixture(params=HARNESSES, ids=[h.kind for h in HARNESSES])
def harness(request: pytest.FixtureRequest) -> IntakeHarness:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def setup(
    harness: IntakeHarness,
    settings_factory: Any,
    runtime_factory: Any,
    app_factory: Callable[[Runtime], Flask],
) -> tuple[Runtime, Any]:
    runtime = runtime_factory(settings_factory(env=dict(harness.env)))
    return runtime, app_factory(runtime).test_client()


def send(client: Any, delivery: Delivery) -> Any:
    return client.post(delivery.path, data=delivery.body, headers=delivery.headers)


def rows(runtime: Runtime) -> list[InboxEvent]:
    with runtime.sessions() as session:
        return list(session.scalars(select(InboxEvent).order_by(InboxEvent.id)))


def test_signed_delivery_becomes_a_canonical_event(harness: IntakeHarness, setup: Any) -> None:
    runtime, client = setup
    response = send(client, harness.signed_delivery(harness.record_id, "evt-1", int(time.time())))
    assert harness.accepted(response.status_code, response.data), response.data
    [row] = rows(runtime)
    assert (row.source, row.record_id, row.object_type) == (
        harness.kind,
        harness.record_id,
        harness.object_type,
    )
    assert row.status == "pending"
    # Who made the change, where the delivery says (else the worker reads last-modified-by).
    assert row.modified_by == harness.modified_by


def test_redelivery_is_acknowledged_and_dropped(harness: IntakeHarness, setup: Any) -> None:
    runtime, client = setup
    now = int(time.time())
    first = send(client, harness.signed_delivery(harness.record_id, "evt-1", now))
    again = send(client, harness.signed_delivery(harness.record_id, "evt-1", now))
    assert harness.accepted(first.status_code, first.data)
    assert harness.accepted(again.status_code, again.data)
    assert len(rows(runtime)) == 1


def test_forged_delivery_is_refused(harness: IntakeHarness, setup: Any) -> None:
    runtime, client = setup
    response = send(client, harness.forged_delivery(harness.record_id, "evt-1", int(time.time())))
    assert harness.rejected(response.status_code), response.status_code
    assert rows(runtime) == []


def test_stale_delivery_is_refused(harness: IntakeHarness, setup: Any) -> None:
    runtime, client = setup
    delivery = harness.stale_delivery(harness.record_id, "evt-1", int(time.time()))
    if delivery is None:
        pytest.skip(f"{harness.kind} deliveries carry no signed timestamp")
    response = send(client, delivery)
    assert harness.rejected(response.status_code), response.status_code
    assert rows(runtime) == []


def test_without_its_secret_setting_the_endpoint_answers_503(
    harness: IntakeHarness,
    settings_factory: Callable[..., Settings],
    runtime_factory: Callable[[Settings], Runtime],
    app_factory: Callable[[Runtime], Flask],
) -> None:
    delivery = harness.signed_delivery(harness.record_id, "evt-1", int(time.time()))
    endpoint = delivery.path.partition("?")[0]
    secrets = [s for s in intake_module(crm_kind(harness.kind)).SECRETS if s.endpoint == endpoint]
    assert secrets, f"{harness.kind}: no secret setting guards {endpoint}"
    [connection] = parse_connections(dict(harness.env)).values()
    for secret in secrets:  # each one missing on its own
        variable = f"{connection.env_prefix}{secret.name}"
        runtime = runtime_factory(settings_factory(env={**harness.env, variable: ""}))
        response = send(app_factory(runtime).test_client(), delivery)
        assert response.status_code == 503
        assert f"{variable} is not set" in response.get_data(as_text=True)
        assert rows(runtime) == []
