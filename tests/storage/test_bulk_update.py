"""bulk.update_rows: many rows, each to its own values, in one UPDATE ... FROM (VALUES ...) per
batch, on SQLite and PostgreSQL (the step-timer sweep's version bumps and timer moves)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, insert, select

from connector.storage.bulk import update_rows
from connector.storage.db import UTCDateTime, make_engine, make_session_factory, transaction

METADATA = MetaData()
ROWS = Table(
    "bulk_update_rows",
    METADATA,
    Column("id", String(36), primary_key=True),
    Column("version", Integer, nullable=False),
    Column("at", UTCDateTime, nullable=False),
    Column("claim", String(32), nullable=True),
)
T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/bulk.db"
    return str(request.getfixturevalue("pg_url"))


def test_each_row_gets_its_values_only_where_every_key_matches(url: str) -> None:
    engine = make_engine(url)
    METADATA.create_all(engine)
    sessions = make_session_factory(engine)
    try:
        with transaction(sessions) as session:
            session.execute(
                insert(ROWS), [{"id": f"r{n}", "version": 1, "at": T0, "claim": "c"} for n in range(7)]
            )
            # r1 and r4 are at another version than the one given: left alone
            updated = update_rows(
                session,
                ROWS,
                ("id", "version"),
                ("version", "at"),
                [(f"r{n}", 9 if n in (1, 4) else 1, 2, T0.replace(hour=n)) for n in range(7)],
                nulls=("claim",),
                batch=3,  # three statements: 3, 3 and 1 rows
            )
        assert updated == 5
        with sessions() as session:
            rows = {r.id: (r.version, r.at, r.claim) for r in session.execute(select(ROWS))}
        for n in range(7):
            if n in (1, 4):
                assert rows[f"r{n}"] == (1, T0, "c")
            else:
                assert rows[f"r{n}"] == (2, T0.replace(hour=n), None)
        with transaction(sessions) as session:
            assert update_rows(session, ROWS, ("id",), ("version",), []) == 0
    finally:
        METADATA.drop_all(engine)
        engine.dispose()
