"""The sync jobs' tables: migration 0007_sync creates what the models declare, and a
checkpoint keeps any adapter's cursor (text, page number, none) across processes."""

from __future__ import annotations

from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from connector.runtime import Runtime
from connector.storage.db import Base, transaction
from connector.storage.sync_state import load_checkpoint, new_checkpoint, save_checkpoint

SYNC_TABLES = {"sync_checkpoints", "zoho_channels"}


def _differences(runtime: Runtime) -> list[Any]:
    """What autogenerate would change in the sync tables (each difference names its table)."""
    with runtime.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    return [d for d in diff if any(table in repr(d) for table in SYNC_TABLES)]


def test_migration_matches_the_models(runtime: Runtime) -> None:
    assert _differences(runtime) == []


@pytest.mark.parametrize(
    "cursor", [None, "eyJtIjogIjIwMjYifQ==", 3, "https://x/services/data/v60.0/query/01g-2000"]
)
def test_checkpoint_round_trip_keeps_the_cursor(runtime: Runtime, cursor: Any) -> None:
    checkpoint = new_checkpoint("backfill", "sandbox", "deal", {"since": None})
    checkpoint.cursor, checkpoint.records_done = cursor, 400
    checkpoint.count("done", 398)
    checkpoint.count("dead", 2)
    with transaction(runtime.sessions) as session:
        save_checkpoint(session, checkpoint)
    checkpoint.count("done")
    with transaction(runtime.sessions) as session:
        save_checkpoint(session, checkpoint)  # an update of the same row
    with runtime.sessions() as session:
        loaded = load_checkpoint(session, "backfill", "sandbox", "deal")
    assert loaded is not None
    assert (loaded.run_id, loaded.cursor, loaded.records_done) == (checkpoint.run_id, cursor, 400)
    assert loaded.counts == {"done": 399, "dead": 2} and loaded.resumed
    assert load_checkpoint(runtime.sessions(), "backfill", "sandbox", "company") is None


@pytest.mark.xdist_group("services")
def test_migration_matches_the_models_on_postgres(pg_url: str, runtime_factory: Any) -> None:
    from connector.config import Settings

    assert _differences(runtime_factory(Settings(database_url=pg_url))) == []
