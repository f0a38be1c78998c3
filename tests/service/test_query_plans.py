"""The API's lists read their pages from indexes, on SQLite and PostgreSQL: the plans of the
statements `find_requests` runs are asked of the database (EXPLAIN), over 20,000 requests
with statistics gathered, as the planner sees them in production. No timing here: speed is
bench/api's subject."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import bindparam, event, text
from sqlalchemy.engine import Engine

from connector.config import Settings
from connector.runtime import Runtime
from connector.service.request_query import RequestFilters, Viewer, find_requests, ids_pending_for
from connector.storage.db import UTCDateTime
from connector.storage.migrate import upgrade

COUNT = 20_000


@pytest.fixture(params=["sqlite", "postgresql"])
def runtime(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Runtime]:
    url = f"sqlite:///{tmp_path}/plans.db" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    upgrade(url)
    env = {"DATABASE_URL": url, "QUEUE_URL": "memory://", "CRM_CONNECTIONS": "sandbox"}
    runtime = Runtime.from_settings(Settings.from_env(env, dotenv_path=str(tmp_path / "none.env")))
    fill(runtime)
    yield runtime
    runtime.close()


def fill(runtime: Runtime) -> None:
    """COUNT requests of 100 submitters over 10 rules; every 7th pending and waiting for one of
    50 approvers, who are assigned to it; the rest approved."""
    from datetime import UTC, datetime

    postgres = runtime.engine.dialect.name == "postgresql"
    series = (
        "SELECT i FROM generate_series(0, :last) AS s(i)"
        if postgres
        else "WITH RECURSIVE s(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM s WHERE i < :last) SELECT i FROM s"
    )
    ident = "'q-' || lpad(i::text, 8, '0')" if postgres else "printf('q-%08d', i)"
    at = bindparam("at", datetime(2026, 1, 1, tzinfo=UTC), type_=UTCDateTime())
    statements = [
        text(
            "INSERT INTO approval_requests (id, connection, object_type, record_id, rule_name, mapping_path, "
            "mapping_hash, submitter, status, current_step, record, changed_fields, submitted_at, "
            f"updated_at, version) SELECT {ident}, 'sandbox', 'deal', 'D-' || i, 'rule-' || (i % 10), "
            "'m.yaml', 'h', "
            "'u-rep-' || (i % 100), CASE WHEN i % 7 = 0 THEN 'pending' ELSE 'approved' END, "
            f"CASE WHEN i % 7 = 0 THEN 0 END, '{{}}', '[]', :at, :at, 1 FROM ({series}) AS n"
        ).bindparams(at, last=COUNT - 1),
        text(
            "INSERT INTO approval_assignees (approver, request_id) "
            "SELECT 'u-mgr-' || (CAST(substr(id, 3) AS INTEGER) % 50), id FROM approval_requests"
        ),
        text(
            "INSERT INTO approval_waiting (request_id, approver, step_index, round, submitted_at) "
            "SELECT id, 'u-mgr-' || (CAST(substr(id, 3) AS INTEGER) % 50), 0, 1, submitted_at "
            "FROM approval_requests WHERE status = 'pending'"
        ),
    ]
    with runtime.engine.begin() as conn:
        for statement in statements:
            conn.execute(statement)
        conn.execute(text("ANALYZE"))


def plans(runtime: Runtime, run: Any) -> list[tuple[str, str]]:
    """(statement, plan) of each SELECT that `run` executes."""
    seen: list[tuple[str, Any]] = []

    def capture(
        _conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool
    ) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            seen.append((statement, parameters))

    event.listen(Engine, "before_cursor_execute", capture)
    try:
        with runtime.sessions() as session:
            run(session)
    finally:
        event.remove(Engine, "before_cursor_execute", capture)
    found = []
    postgres = runtime.engine.dialect.name == "postgresql"
    with runtime.engine.connect() as conn:
        for statement, parameters in seen:
            explain = "EXPLAIN " if postgres else "EXPLAIN QUERY PLAN "
            rows = conn.exec_driver_sql(explain + statement, parameters).all()
            found.append((statement, "\n".join(row[0] for row in rows) if postgres else _tree(rows)))
    return found


def _tree(rows: list[Any]) -> str:
    """SQLite's plan rows (id, parent, -, detail), each indented under its parent."""
    depth: dict[int, int] = {0: -1}
    lines = []
    for node, parent, _unused, detail in rows:
        depth[node] = depth.get(parent, -1) + 1
        lines.append("  " * depth[node] + str(detail))
    return "\n".join(lines)


def page_plan(found: list[tuple[str, str]]) -> str:
    """The plan of the statement that reads the page (ordered, limited)."""
    pages = [
        plan for statement, plan in found if "LIMIT" in statement.upper() and "ORDER BY" in statement.upper()
    ]
    assert len(pages) == 1, found
    return pages[0]


def assert_indexed(plan: str, index: str, postgres: bool, few: bool = False) -> None:
    """`few`: the index finds a few hundred rows at most, which PostgreSQL may sort itself.
    The total read in the same statement from the kept counts (a few rows) may scan those."""
    assert index in plan, plan
    plan = "\n".join(line for line in plan.splitlines() if "approval_request_counts" not in line)
    if postgres:
        assert "Seq Scan" not in plan, plan
        if not few:
            assert "Sort" not in plan.replace("Sort Key", ""), plan  # the index gives the order
    else:
        assert "TEMP B-TREE" not in plan, plan  # no sort of the whole result for the page
        assert "SCAN approval_requests\n" not in plan + "\n", plan  # no full table scan


def test_the_pending_list_reads_the_approvers_waiting_index(runtime: Runtime) -> None:
    postgres = runtime.engine.dialect.name == "postgresql"
    filters = RequestFilters(pending_for="u-mgr-7", limit=50)
    found = plans(runtime, lambda s: find_requests(s, filters, Viewer("u-mgr-7", False)))
    assert_indexed(page_plan(found), "ix_waiting_approver_submitted", postgres, few=True)
    counts = [plan for statement, plan in found if "count(" in statement.lower()]
    assert counts and "ix_waiting_approver_submitted" in counts[0], counts
    inbox = plans(runtime, lambda s: ids_pending_for(s, "u-mgr-7", limit=50))
    assert_indexed(page_plan(inbox), "ix_waiting_approver_submitted", postgres, few=True)
    with runtime.sessions() as session:  # and it lists the right ones: every 7th, of this approver
        page = find_requests(session, filters, Viewer("u-mgr-7", False))
    assert page.total == len([i for i in range(0, COUNT, 7) if i % 50 == 7])
    assert all(s.request.status == "pending" for s in page.requests)


def test_the_admin_lists_read_the_submission_order_index(runtime: Runtime) -> None:
    postgres = runtime.engine.dialect.name == "postgresql"
    everything = plans(runtime, lambda s: find_requests(s, RequestFilters(limit=50), None))
    assert_indexed(page_plan(everything), "ix_requests_submitted", postgres)
    by_status = plans(runtime, lambda s: find_requests(s, RequestFilters(status=["pending"], limit=50), None))
    assert_indexed(page_plan(by_status), "ix_requests_status_submitted", postgres)
    by_rule = plans(runtime, lambda s: find_requests(s, RequestFilters(rule="rule-3", limit=50), None))
    assert_indexed(page_plan(by_rule), "ix_requests_rule_submitted", postgres)
    for found in (everything, by_status, by_rule):  # the total: the kept counts, not a count
        statements = [statement for statement, _plan in found]
        assert any("FROM approval_request_counts" in statement for statement in statements), statements
        assert not any("count(" in statement.lower() for statement in statements), statements


def subquery_plans(plan: str) -> str:
    """The parts of a plan that compute its uncorrelated subqueries (the total of a page that
    reads it in the same statement): InitPlan on PostgreSQL, SCALAR SUBQUERY on SQLite."""
    kept, depth = [], None
    for line in plan.splitlines():
        indent = len(line) - len(line.lstrip(" "))
        if "InitPlan" in line or "SCALAR SUBQUERY" in line:
            depth = indent if depth is None or indent < depth else depth
        elif depth is not None and indent <= depth:
            depth = None
        if depth is not None:
            kept.append(line)
    return "\n".join(kept)


def test_my_requests_are_counted_by_the_submitter_and_assignee_indexes(runtime: Runtime) -> None:
    postgres = runtime.engine.dialect.name == "postgresql"
    found = plans(runtime, lambda s: find_requests(s, RequestFilters(limit=50), Viewer("u-mgr-7", False)))
    (page,) = [plan for statement, plan in found if "count(" in statement.lower()]
    count = subquery_plans(page)
    assert "ix_requests_submitter_submitted" in count, count
    if postgres:
        assert "Seq Scan" not in count, count
    else:
        assert "SCAN approval_requests\n" not in count + "\n" and "SCAN approval_assignees" not in count, (
            count
        )
    with runtime.sessions() as session:  # u-mgr-7 is assigned every 50th request from the 7th
        page = find_requests(session, RequestFilters(limit=50), Viewer("u-mgr-7", False))
    assert page.total == len(range(7, COUNT, 50))


def test_my_requests_use_the_submitter_and_assignee_indexes(runtime: Runtime) -> None:
    postgres = runtime.engine.dialect.name == "postgresql"
    found = plans(runtime, lambda s: find_requests(s, RequestFilters(limit=50), Viewer("u-rep-3", False)))
    plan = page_plan(found)
    assert "approval_assignees" in plan or "pk_approval_assignees" in plan or "assignees" in plan, plan
    if postgres:
        assert "Seq Scan on approval_assignees" not in plan, plan
    else:
        assert "SCAN approval_assignees" not in plan, plan  # searched by its key, never scanned
