"""The API test world on SQLite and on PostgreSQL, for the modules that check a behaviour on
both engines. A module takes it as its `world` fixture by importing `world_on_both_engines`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from connector.config import Settings
from connector.runtime import Runtime
from tests.webhooks.test_api import World, build_world


@pytest.fixture(name="world", params=["sqlite", "postgresql"])
def world_on_both_engines(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    settings_factory: Callable[..., Settings],
    runtime_factory: Callable[[Settings], Runtime],
) -> World:
    overrides = {"database_url": request.getfixturevalue("pg_url")} if request.param == "postgresql" else {}
    return build_world(tmp_path, settings_factory, runtime_factory, **overrides)
