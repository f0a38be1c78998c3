"""Shared fixtures: a migrated database per test, the Flask app, and the real PostgreSQL
and Redis servers (skipped when unreachable, except under CI=true where they must run)."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from connector.config import Settings, parse_connections
from connector.runtime import Runtime
from connector.storage.migrate import upgrade
from connector.worker import Tasks, make_huey

PG_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")

SANDBOX_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"

# Hypothesis budgets (tests/webhooks/test_fuzz.py). `ci` is loaded here, so `make test` stays
# bounded; `pytest --hypothesis-profile=long` overrides it for the long run (docs/operations.md).
# Tests that set max_examples themselves (test_openapi.py) keep their own.
_FUZZ_CHECKS = dict(
    deadline=None,  # a PostgreSQL round trip is not a slow example
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
    print_blob=True,  # a failure prints the @reproduce_failure line
)
hypothesis_settings.register_profile("ci", max_examples=250, **_FUZZ_CHECKS)
hypothesis_settings.register_profile("long", max_examples=3500, **_FUZZ_CHECKS)
hypothesis_settings.load_profile("ci")


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    if _reachable(host, port):
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{name} at {host}:{port} is unreachable, and under CI=true its tests must run")
    pytest.skip(f"{name} at {host}:{port} is unreachable")


def make_settings(tmp_path: Path, env: dict[str, str] | None = None, **overrides: Any) -> Settings:
    """Settings for a test: a fresh SQLite file, an in-memory queue, the given connections."""
    env = {"CRM_CONNECTIONS": "sandbox", "SANDBOX_WEBHOOK_SECRET": SANDBOX_SECRET, **(env or {})}
    values: dict[str, Any] = {
        "database_url": f"sqlite:///{tmp_path}/test.db",
        "queue_url": "memory://",
        "connections": parse_connections(env),
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings_factory(tmp_path: Path) -> Callable[..., Settings]:
    return lambda env=None, **overrides: make_settings(tmp_path, env, **overrides)


@pytest.fixture
def runtime_factory() -> Iterator[Callable[[Settings], Runtime]]:
    made: list[Runtime] = []

    def factory(settings: Settings) -> Runtime:
        upgrade(settings.database_url)
        runtime = Runtime.from_settings(settings)
        made.append(runtime)
        return runtime

    yield factory
    for runtime in made:
        runtime.close()


@pytest.fixture
def runtime(
    settings_factory: Callable[..., Settings], runtime_factory: Callable[[Settings], Runtime]
) -> Runtime:
    return runtime_factory(settings_factory())


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.xdist_group("services"))])
def either(request: pytest.FixtureRequest, runtime_factory: Callable[[Settings], Runtime]) -> Runtime:
    """SQLite's runtime, or one on a fresh PostgreSQL schema: a test that takes it runs on both."""
    if request.param == "sqlite":
        return request.getfixturevalue("runtime")  # type: ignore[no-any-return]
    return runtime_factory(Settings(database_url=request.getfixturevalue("pg_url")))


@pytest.fixture
def app_factory() -> Callable[[Runtime], Flask]:
    from webhooks.app import create_app

    def factory(runtime: Runtime) -> Flask:
        app = create_app(runtime, Tasks(runtime, make_huey("memory://")))
        app.testing = True
        return app

    return factory


@pytest.fixture
def client(runtime: Runtime, app_factory: Callable[[Runtime], Flask]) -> FlaskClient:
    return app_factory(runtime).test_client()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh schema in the real PostgreSQL database, dropped afterwards."""
    require_service("PostgreSQL", "127.0.0.1", 5432)
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_URL.replace("postgresql://", "postgresql://", 1), autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
def redis_url() -> Iterator[str]:
    require_service("Redis", "127.0.0.1", 6379)
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield REDIS_URL
    client.flushdb()
