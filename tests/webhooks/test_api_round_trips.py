"""What one API call costs the database, on SQLite and PostgreSQL: one pool checkout, the
token read on the call's own connection, and a list in one statement with its open steps.
On PostgreSQL the round trips are counted on the wire (libpq's trace of the connection), so
a ping, a BEGIN, a COMMIT or a statement that comes back shows up here. Also: a revoked
token stops working at the next call, the token's last use is still written, and a pooled
connection that died is replaced without an error."""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import event, select, text

from connector.config import Settings
from connector.runtime import Runtime
from connector.storage.db import transaction
from connector.storage.models import ApiToken
from connector.storage.tokens import create_token, revoke_token
from tests.webhooks.api_engines import world_on_both_engines  # noqa: F401 (the `world` fixture)
from tests.webhooks.test_api import World, build_world, error_of


@contextmanager
def database_work(runtime: Runtime, trace: Path) -> Iterator[Counter[str]]:
    """Counts what the calls in the block cost: `checkouts` from the pool, and `round_trips`:
    on PostgreSQL the client's messages that wait for the server's answer, from libpq's trace
    (a Sync ends each statement of the extended protocol, a Query each simple one: a ping,
    BEGIN, COMMIT, ROLLBACK, DEALLOCATE); on SQLite the statements run (BEGIN IMMEDIATE among
    them)."""
    counts: Counter[str] = Counter()
    postgres = runtime.engine.dialect.name == "postgresql"
    pool = runtime.engine.pool
    traces: list[Path] = []

    def checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        counts["checkouts"] += 1
        if postgres:  # a file per checkout, written by libpq until the checkin
            traces.append(trace.with_name(f"{trace.name}.{len(traces)}"))
            with traces[-1].open("w") as out:
                dbapi_connection.pgconn.trace(os.dup(out.fileno()))
            dbapi_connection.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)

    def checkin(dbapi_connection: Any, _record: Any) -> None:
        if postgres and dbapi_connection is not None:
            dbapi_connection.pgconn.untrace()

    def statement(*_args: Any) -> None:
        counts["statements"] += 1

    event.listen(pool, "checkout", checkout, insert=True)  # before the ping, to see it
    event.listen(pool, "checkin", checkin)
    event.listen(runtime.engine, "before_cursor_execute", statement)
    try:
        yield counts
    finally:
        event.remove(pool, "checkout", checkout)
        event.remove(pool, "checkin", checkin)
        event.remove(runtime.engine, "before_cursor_execute", statement)
    if postgres:
        messages = [
            m
            for path in traces
            for line in path.read_text().splitlines()
            if (m := line.split("\t"))[0] == "F"
        ]
        sent = [m[2] for m in messages]
        # the simple queries by their first word: BEGIN, COMMIT, ROLLBACK, DEALLOCATE, COPY, ...
        for m in messages:
            if m[2] == "Query":
                counts["query " + m[3].strip().strip('"').split()[0]] += 1
        # a Sync after an Execute ends a statement; a Sync right after a named Parse is psycopg
        # preparing a statement used often (once per statement and connection): not counted
        counts["round_trips"] = sum(
            1 for n, m in enumerate(sent) if m == "Query" or (m == "Sync" and sent[n - 1] == "Execute")
        )
    else:
        counts["round_trips"] = counts["statements"]


def test_each_api_read_is_one_checkout_and_a_few_round_trips(world: World, tmp_path: Path) -> None:
    """pending, my requests and the admin list: the token, and the page with its total and its
    open steps with their votes; a page of decided requests has no open steps to read."""
    first, second, decided = world.submit("D-1"), world.submit("D-2"), world.submit("D-3")
    world.approve_steps(first, "u-mgr")  # open at the general manager's step
    world.vote("u-fin-1", second)  # refused: not this step; D-2 waits for u-mgr
    world.approve_steps(decided, "u-mgr", "u-gm", "u-fin-1")
    postgres = world.runtime.engine.dialect.name == "postgresql"
    begin = 0 if postgres else 1  # SQLite: BEGIN IMMEDIATE, the same transaction throughout
    calls = {
        ("u-mgr", "/requests?pending_for=me&limit=50"): 2,
        ("u-rep", "/requests?all=true&limit=50"): 2,
        ("u-admin", "/requests?all=true&limit=50"): 2,
        ("u-admin", "/requests?status=approved&limit=50"): 2,
        ("u-gm", f"/requests/{first}"): 5,  # token, request, steps, votes, transitions
    }
    for (user, path), expected in calls.items():
        assert world.get(user, path).status_code == 200  # the token's last use is written once
        with database_work(world.runtime, tmp_path / "trace.txt") as cost:
            response = world.get(user, path)
        assert response.status_code == 200, response.get_json()
        assert (cost["checkouts"], cost["round_trips"]) == (1, expected + begin), (path, cost)
    listed = world.get("u-admin", "/requests?all=true&limit=50").get_json()
    assert listed["total"] == 3 and [r["current_step"] is None for r in listed["requests"]].count(True) == 1
    error_of(world.get("u-rep", "/requests/no-such-request"), 404, "request_not_found")
    bad = {"Authorization": "Bearer cra_not-a-token"}
    error_of(world.client.get("/api/v1/requests", headers=bad), 401, "invalid_token")
    assert world.runtime.engine.pool.checkedout() == 0  # every call gave its connection back


def test_a_vote_keeps_the_connections_prepared_statements(world: World, tmp_path: Path) -> None:
    """A vote's reads (the request, the delegations in force) end with COMMIT: at a ROLLBACK
    psycopg forgets every statement prepared on the connection and sends DEALLOCATE ALL
    before the next one (a round trip, and the lists' statements prepared again)."""
    first, second = world.submit("D-1"), world.submit("D-2")
    assert world.vote("u-mgr", first).status_code == 200
    with database_work(world.runtime, tmp_path / "trace.txt") as cost:
        response = world.vote("u-mgr", second)
    assert response.status_code == 200, response.get_json()
    listed = world.get("u-gm", "/requests?pending_for=me").get_json()
    assert {r["id"] for r in listed["requests"]} == {first, second}  # both votes saved
    if world.runtime.engine.dialect.name == "postgresql":
        assert (cost["query ROLLBACK"], cost["query DEALLOCATE"]) == (0, 0), cost
        assert cost["query COMMIT"] == cost["checkouts"] == 4, cost  # token, read, delegations, save
    refused = world.vote("u-rep", second)  # refused: the submitter; rolled back as before
    assert refused.status_code == 403, refused.get_json()


def test_a_page_past_the_end_still_has_its_total(world: World) -> None:
    """The total rides on the page's rows; a page without rows reads it on its own."""
    for record in ("D-1", "D-2"):
        world.submit(record)
    first = world.get("u-admin", "/requests?all=true&limit=2").get_json()
    assert first["total"] == 2 and first["next_cursor"] is None
    empty = world.get("u-admin", "/requests?all=true&status=approved").get_json()
    assert (empty["total"], empty["count"]) == (0, 0)
    mine = world.get("u-rep", "/requests?all=true&limit=1").get_json()
    rest = world.get("u-rep", f"/requests?all=true&limit=1&cursor={mine['next_cursor']}").get_json()
    assert (mine["total"], rest["total"], rest["count"], rest["next_cursor"]) == (2, 2, 1, None)


def test_a_revoked_token_stops_working_at_the_next_read(world: World) -> None:
    """Nothing caches a token: the lists and the request page check it on every call."""
    request_id = world.submit()
    with transaction(world.runtime.sessions) as session:
        info, token = create_token(session, "u-mgr", "to revoke")
    headers = {"Authorization": f"Bearer {token}"}
    paths = ("/api/v1/requests?pending_for=me", "/api/v1/requests?all=true", f"/api/v1/requests/{request_id}")
    for path in paths:
        assert world.client.get(path, headers=headers).status_code == 200
    with transaction(world.runtime.sessions) as session:
        revoke_token(session, info.id)
    for path in paths:
        error_of(world.client.get(path, headers=headers), 401, "revoked_token")


def test_a_read_writes_the_tokens_last_use(world: World) -> None:
    """The token is checked in the read's own transaction (SQLite) or in autocommit
    (PostgreSQL); either way its last use is committed."""
    with transaction(world.runtime.sessions) as session:
        info, token = create_token(session, "u-mgr", "used")
    assert info.last_used_at is None
    response = world.client.get("/api/v1/requests", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200
    with world.runtime.sessions() as session:
        assert session.scalar(select(ApiToken.last_used_at).where(ApiToken.id == info.id)) is not None


def test_dead_pooled_connections_are_replaced_without_an_error(
    tmp_path: Path,
    settings_factory: Callable[..., Settings],
    runtime_factory: Callable[[Settings], Runtime],
    pg_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """PostgreSQL restarted (every pooled connection killed): an API read, whose token read is
    the ping of its unpinged checkout, reads again on a new connection; everything else is
    pinged at checkout as before. No call fails."""
    world = build_world(tmp_path, settings_factory, runtime_factory, database_url=pg_url)
    request_id = world.submit()
    engine = world.runtime.engine

    def kill_pooled_connections() -> None:
        backends: list[int] = []
        listener = lambda dbapi_connection, _record, _proxy: backends.append(  # noqa: E731
            dbapi_connection.info.backend_pid
        )
        event.listen(engine.pool, "checkout", listener, insert=True)
        held = [engine.connect() for _ in range(3)]  # the pool's connections, made if need be
        for conn in held:
            conn.close()
        event.remove(engine.pool, "checkout", listener)
        with psycopg.connect(pg_url.split("?")[0], autocommit=True) as admin:
            for pid in backends:
                admin.execute("SELECT pg_terminate_backend(%s)", [pid])

    kill_pooled_connections()
    with caplog.at_level(logging.INFO, logger="webhooks.api"):
        listed = world.get("u-mgr", "/requests?pending_for=me")
    assert listed.status_code == 200 and listed.get_json()["total"] == 1
    assert "API connection was dead" in caplog.text
    kill_pooled_connections()
    assert world.vote("u-mgr", request_id).status_code == 200  # pinged checkouts
    kill_pooled_connections()
    with transaction(world.runtime.sessions) as session:
        assert session.execute(text("SELECT 1")).scalar() == 1
