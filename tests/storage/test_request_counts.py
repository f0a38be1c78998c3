"""The exact `total` of GET /api/v1/requests read the cheap way (connector/service/request_query.py
`_total`): the counts the database keeps in approval_request_counts (migration
0023_request_counts), an approver's waiting rows, a submitter's index. Each must stay the count
of what the pages show, on SQLite and PostgreSQL, through every kind of change: new requests,
votes, rejections, recalls, reassignment, deputies, set-based expiry, a rule renamed and a
request deleted by hand, and PostgreSQL's compaction of its delta rows."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import bindparam, text

from connector.storage.db import UTCDateTime, make_engine, make_session_factory, transaction
from connector.storage.migrate import upgrade
from connector.storage.request_counts import compact, count_requests
from tests.webhooks.api_engines import world_on_both_engines  # noqa: F401 (the `world` fixture)
from tests.webhooks.test_api import USERS, World

QUERIES = (
    "all=true",
    "status=pending",
    "status=approved",
    "status=pending&status=rejected&status=recalled",
    "status=expired",
    "rule=big-deal",
    "rule=board-review&status=pending",
    "connection=sandbox",
    "connection=elsewhere",
    "rule=renamed",
)


def walk(world: World, user: str, query: str) -> tuple[int, list[str]]:
    """The first page's total, and every id of every page (3 a page, following next_cursor)."""
    seen: list[str] = []
    total, cursor = None, None
    for _ in range(100):
        suffix = f"&cursor={cursor}" if cursor else ""
        response = world.get(user, f"/requests?{query}&limit=3{suffix}")
        assert response.status_code == 200, response.get_json()
        body = response.get_json()
        total = body["total"] if total is None else total
        assert body["total"] == total  # the same on every page
        seen += [r["id"] for r in body["requests"]]
        cursor = body["next_cursor"]
        if cursor is None:
            assert total is not None
            return total, seen
    raise AssertionError("the walk did not end")


def assert_exact(world: World) -> None:
    """Every kept count equals the table's; every list's total equals the rows its pages show."""
    with world.runtime.engine.connect() as conn:
        counted = set(
            conn.execute(
                text(
                    "SELECT status, rule_name, connection, count(*) FROM approval_requests "
                    "GROUP BY status, rule_name, connection"
                )
            ).all()
        )
        kept = set(
            conn.execute(
                text(
                    "SELECT status, rule_name, connection, sum(n) FROM approval_request_counts "
                    "GROUP BY status, rule_name, connection HAVING sum(n) <> 0"
                )
            ).all()
        )
        stray = conn.execute(
            text(
                "SELECT count(*) FROM approval_waiting WHERE request_id NOT IN "
                "(SELECT id FROM approval_requests WHERE status = 'pending')"
            )
        ).scalar_one()
        orphans = conn.execute(
            text(
                "SELECT count(*) FROM approval_assignees "
                "WHERE request_id NOT IN (SELECT id FROM approval_requests)"
            )
        ).scalar_one()
    assert kept == counted
    assert stray == 0  # approval_waiting holds pending requests only
    assert orphans == 0  # and approval_assignees existing ones
    for query in QUERIES:
        total, seen = walk(world, "u-admin", query)
        assert total == len(seen) == len(set(seen)), query
    for user in (*USERS, "u-nobody", "u-admin"):
        total, seen = walk(world, user, "pending_for=me")
        assert total == len(seen), user
        if user == "u-admin":
            continue
        # what visibility means: submitted by them, or assigned to them; narrowed or not
        for query, narrowing in (("all=true", ""), ("status=pending", "AND status = 'pending'")):
            total, seen = walk(world, user, query)
            with world.runtime.engine.connect() as conn:
                visible = conn.execute(
                    text(
                        "SELECT id FROM approval_requests WHERE (submitter = :u OR id IN "
                        f"(SELECT request_id FROM approval_assignees WHERE approver = :u)) {narrowing} "
                        "ORDER BY submitted_at DESC, id DESC"
                    ),
                    {"u": user},
                ).scalars()
                assert seen == list(visible) and total == len(seen), (user, query)
        total, seen = walk(world, "u-admin", f"pending_for={user}")
        assert total == len(seen), user


def test_totals_stay_exact_through_every_kind_of_change(world: World) -> None:
    assert_exact(world)  # nothing yet: all zero
    first = world.submit("D-1")  # big-deal: u-mgr, then u-gm, then finance
    second = world.submit("D-2")
    board = world.submit("D-3", amount=60000)  # board-review: u-board-1 and u-board-2 (all)
    world.submit("D-4", owner_id="u-board-1")  # submitted by a board member, waiting for u-mgr
    assert_exact(world)

    world.approve_steps(first, "u-mgr")  # on to u-gm
    world.approve_steps(board, "u-board-1")  # half voted: waits for u-board-2 only
    assert world.vote("u-mgr", second, "reject", comment="no").status_code == 200
    assert_exact(world)

    moved = world.post(
        "u-admin", f"/requests/{first}/reassign", {"step_index": 1, "from_user": "u-gm", "to_user": "u-fin-1"}
    )
    assert moved.status_code == 200, moved.get_json()
    today = datetime.now(UTC).date()
    away = {
        "deputy": "u-fin-2",
        "starts_on": today.isoformat(),
        "ends_on": (today + timedelta(days=3)).isoformat(),
    }
    assert world.post("u-mgr", "/delegations", away).status_code == 200  # D-4's open step moves
    assert_exact(world)

    world.approve_steps(first, "u-fin-1", "u-fin-3")  # finance: any one; approved
    world.approve_steps(board, "u-board-2")  # approved
    recalled = world.submit("D-5")
    assert world.post("u-rep", f"/requests/{recalled}/recall", {"comment": "oops"}).status_code == 200
    assert_exact(world)

    # set-based expiry (one UPDATE of many rows) moves approved to expired
    past = datetime.now(UTC) - timedelta(days=1)
    with transaction(world.runtime.sessions) as session:
        session.execute(
            text("UPDATE approval_requests SET expires_at = :at WHERE status = 'approved'").bindparams(
                bindparam("at", past, type_=UTCDateTime())
            )
        )
    assert world.runtime.approvals is not None
    assert world.runtime.approvals.expire_due(world.runtime.sessions) == 2
    assert_exact(world)

    # by hand: a rule renamed, a pending and a closed request deleted (a purge)
    with transaction(world.runtime.sessions) as session:
        session.execute(
            text("UPDATE approval_requests SET rule_name = 'renamed' WHERE id = :id"), {"id": second}
        )
        session.execute(
            text("DELETE FROM approval_requests WHERE id IN (:a, :b)"), {"a": board, "b": recalled}
        )
        pending = session.execute(text("SELECT id FROM approval_requests WHERE status = 'pending'")).scalars()
        session.execute(text("DELETE FROM approval_requests WHERE id = :id"), {"id": next(iter(pending))})
    assert_exact(world)

    with transaction(world.runtime.sessions) as session:
        before = count_requests(session)
        compact(session)  # PostgreSQL: each key's delta rows become one; SQLite: nothing to do
    with world.runtime.sessions() as session:
        assert count_requests(session) == before
        rows, keys = session.execute(
            text(
                "SELECT count(*), count(DISTINCT status || rule_name || connection) "
                "FROM approval_request_counts"
            )
        ).one()
    assert rows == keys
    assert_exact(world)
    world.submit("D-6")  # counted on from the compacted rows
    assert_exact(world)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/m.db"
    return str(request.getfixturevalue("pg_url"))


def test_the_migration_counts_what_is_there_and_drops_stray_rows(
    database_url: str,
) -> None:
    upgrade(database_url, "0018_expiry_api")
    engine = make_engine(database_url)
    stamp = bindparam("at", datetime(2026, 1, 1, tzinfo=UTC), type_=UTCDateTime())
    with engine.begin() as conn:
        for request_id, status, rule in (
            ("a", "pending", "r1"),
            ("b", "approved", "r1"),
            ("c", "approved", "r2"),
        ):
            conn.execute(
                text(
                    "INSERT INTO approval_requests (id, connection, object_type, record_id, rule_name, "
                    "mapping_path, mapping_hash, submitter, status, record, changed_fields, "
                    "submitted_at, updated_at, version) VALUES (:id, 'c', 'o', :id, :rule, 'm', 'h', 'u', "
                    ":status, '{}', '[]', :at, :at, 1)"
                ).bindparams(stamp, id=request_id, status=status, rule=rule)
            )
        conn.execute(
            text("INSERT INTO approval_assignees (approver, request_id) VALUES ('u-x', 'a'), ('u-x', 'gone')")
        )
        for request_id in ("a", "b"):  # "b" is approved: a waiting row left behind
            conn.execute(
                text(
                    "INSERT INTO approval_waiting (request_id, approver, step_index, round, submitted_at) "
                    "VALUES (:id, 'u-x', 0, 1, :at)"
                ).bindparams(stamp, id=request_id)
            )
    upgrade(database_url)
    with engine.connect() as conn:
        kept = set(conn.execute(text("SELECT status, rule_name, connection, n FROM approval_request_counts")))
        waiting = set(conn.execute(text("SELECT request_id FROM approval_waiting")).scalars())
        assigned = set(conn.execute(text("SELECT request_id FROM approval_assignees")).scalars())
    engine.dispose()
    assert kept == {("pending", "r1", "c", 1), ("approved", "r1", "c", 1), ("approved", "r2", "c", 1)}
    assert waiting == {"a"}
    assert assigned == {"a"}  # "gone" was deleted before


def test_postgresql_counts_stay_exact_with_writers_and_compactions_at_once(pg_url: str) -> None:
    """Delta rows need no lock: four writers changing requests of the same keys at once and two
    compactions looping beside them leave every key's sum equal to the table's count."""
    upgrade(pg_url)
    engine = make_engine(pg_url)
    stamp = bindparam("at", datetime(2026, 1, 1, tzinfo=UTC), type_=UTCDateTime())
    stop = threading.Event()
    errors: list[BaseException] = []

    def write(worker: int) -> None:
        try:
            for n in range(40):
                with engine.begin() as conn:
                    request_id = f"w{worker}-{n}"
                    conn.execute(
                        text(
                            "INSERT INTO approval_requests (id, connection, object_type, record_id, "
                            "rule_name, mapping_path, mapping_hash, submitter, status, record, "
                            "changed_fields, submitted_at, updated_at, version) VALUES (:id, 'c', 'o', :id, "
                            ":rule, 'm', 'h', 'u', 'pending', '{}', '[]', :at, :at, 1)"
                        ).bindparams(stamp, id=request_id, rule=f"r{n % 2}")
                    )
                    if n % 3 == 0:
                        conn.execute(
                            text("UPDATE approval_requests SET status = 'approved' WHERE id = :id"),
                            {"id": request_id},
                        )
                    if n % 5 == 0:
                        conn.execute(text("DELETE FROM approval_requests WHERE id = :id"), {"id": request_id})
        except BaseException as exc:
            errors.append(exc)

    def fold() -> None:
        sessions = make_session_factory(engine)
        try:
            while not stop.is_set():
                with transaction(sessions) as session:
                    compact(session)
        except BaseException as exc:
            errors.append(exc)

    writers = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    folders = [threading.Thread(target=fold) for _ in range(2)]  # two workers' sweeps at once
    for thread in (*folders, *writers):
        thread.start()
    for thread in writers:
        thread.join()
    stop.set()
    for thread in folders:
        thread.join()
    assert errors == []
    with engine.connect() as conn:
        counted = set(
            conn.execute(
                text("SELECT status, rule_name, count(*) FROM approval_requests GROUP BY 1, 2")
            ).all()
        )
        kept = set(
            conn.execute(
                text(
                    "SELECT status, rule_name, sum(n) FROM approval_request_counts "
                    "GROUP BY 1, 2 HAVING sum(n) <> 0"
                )
            ).all()
        )
    engine.dispose()
    assert kept == counted
    assert sum(n for _status, _rule, n in counted) == 4 * (40 - 8)  # 8 of each 40 deleted
