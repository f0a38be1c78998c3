"""Migration 0018_expiry_api fills approval_assignees and approval_waiting from the steps and
votes already stored, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import bindparam, text

from connector.storage.db import JSONType, UTCDateTime, make_engine
from connector.storage.migrate import upgrade

AT = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/m.db"
    return str(request.getfixturevalue("pg_url"))


def test_the_backfill_lists_who_was_assigned_and_who_the_open_step_still_waits_for(database_url: str) -> None:
    upgrade(database_url, "0010_hardening")
    engine = make_engine(database_url)
    at = bindparam("at", AT, type_=UTCDateTime())
    with engine.begin() as conn:
        for request_id, status, step in (("open", "pending", 1), ("done", "approved", None)):
            conn.execute(
                text(
                    "INSERT INTO approval_requests (id, connection, object_type, record_id, rule_name, "
                    "mapping_path, mapping_hash, submitter, status, current_step, record, changed_fields, "
                    "submitted_at, updated_at, version) VALUES (:id, 'c', 'o', :id, 'r', 'm', 'h', 'u-rep', "
                    ":status, :step, '{}', '[]', :at, :at, 1)"
                ).bindparams(at, id=request_id, status=status, step=step)
            )
        steps = (
            ("open", 0, "approved", ["u-a"]),
            ("open", 1, "pending", ["u-b", "u-c", "u-d"]),
            ("done", 0, "approved", ["u-a", "u-e"]),
        )
        for request_id, index, status, approvers in steps:
            conn.execute(
                text(
                    'INSERT INTO approval_steps (request_id, "index", round, name, mode, approvers, '
                    "required, "
                    "status, entered_at) VALUES (:id, :index, 1, 's', 'all', :approvers, 1, :status, :at)"
                ).bindparams(
                    at,
                    bindparam("approvers", approvers, type_=JSONType),
                    id=request_id,
                    index=index,
                    status=status,
                )
            )
        conn.execute(
            text(
                "INSERT INTO approval_votes (request_id, step_index, round, approver, decision, at, "
                "acting_admin) "
                "VALUES ('open', 1, 1, 'u-c', 'approve', :at, :no)"
            ).bindparams(at, no=False)
        )
    upgrade(database_url)
    with engine.connect() as conn:
        assignees = set(conn.execute(text("SELECT approver, request_id FROM approval_assignees")).all())
        waiting = set(
            conn.execute(text("SELECT request_id, approver, step_index, round FROM approval_waiting"))
        )
    engine.dispose()
    assert assignees == {
        ("u-a", "open"), ("u-b", "open"), ("u-c", "open"), ("u-d", "open"), ("u-a", "done"), ("u-e", "done"),
    }  # fmt: skip
    assert waiting == {("open", "u-b", 1, 1), ("open", "u-d", 1, 1)}  # u-c voted; "done" waits for nobody
