"""GET /api/v1/requests as an admin view: filters, visibility, keyset pages and bad parameters,
on SQLite and PostgreSQL (the approver lookups differ: json_each vs JSONB containment)."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from itertools import count
from urllib.parse import quote

import pytest
from sqlalchemy.orm import Session

from connector.storage.db import transaction
from connector.storage.models import (
    ApprovalAssigneeRow,
    ApprovalRequestRow,
    ApprovalStepRow,
    ApprovalWaitingRow,
)
from tests.webhooks.api_engines import world_on_both_engines  # noqa: F401 (the `world` fixture)
from tests.webhooks.test_api import World, error_of

_row_ids = count()


def add_request(
    session: Session,
    submitted_at: datetime,
    *,
    request_id: str | None = None,
    connection: str = "hubspot",
    object_type: str = "deals",
    rule: str = "hubspot-deal",
    status: str = "pending",
    submitter: str = "u-hs-rep",
    approvers: tuple[str, ...] = ("u-hs-mgr",),
) -> str:
    """A request row as the approval store writes one (one step), with a chosen submission time."""
    request_id = request_id or f"row-{next(_row_ids):05d}"
    pending = status == "pending"
    session.add(
        ApprovalRequestRow(
            id=request_id,
            connection=connection,
            object_type=object_type,
            record_id=f"R-{request_id}",
            rule_name=rule,
            mapping_path="mappings/hubspot.yaml",
            mapping_hash="0" * 64,
            submitter=submitter,
            status=status,
            current_step=0 if pending else None,
            record={"amount": 1},
            record_previous=None,
            changed_fields=["amount"],
            submitted_at=submitted_at,
            updated_at=submitted_at,
            version=1,
        )
    )
    session.add(
        ApprovalStepRow(
            request_id=request_id,
            index=0,
            round=1,
            name="manager",
            mode="one",
            approvers=list(approvers),
            required=1,
            status="pending" if pending else "approved",
            entered_at=submitted_at,
        )
    )
    # the indexed rows the store keeps beside them (connector/storage/assignments.py)
    session.add_all(ApprovalAssigneeRow(approver=a, request_id=request_id) for a in approvers)
    if pending:
        session.add_all(
            ApprovalWaitingRow(
                request_id=request_id, approver=a, step_index=0, round=1, submitted_at=submitted_at
            )
            for a in approvers
        )
    return request_id


def ids(world: World, user: str, query: str) -> set[str]:
    response = world.get(user, f"/requests?{query}")
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["count"] == len(body["requests"]) == body["total"]  # one page in these tests
    return {r["id"] for r in body["requests"]}


# --- filters and who sees what ----------------------------------------------------------------


def test_filters_narrow_the_admin_view_and_others_see_only_their_requests(world: World) -> None:
    now = datetime.now(UTC)
    big = world.submit("D-1")
    board = world.submit("D-2", amount=60000)  # board-review: an `all` step of u-board-1 and -2
    rejected = world.submit("D-3")
    world.vote("u-mgr", rejected, "reject", comment="no")
    recalled = world.submit("D-4")
    assert world.post("u-rep", f"/requests/{recalled}/recall").status_code == 200
    with transaction(world.runtime.sessions) as session:
        approved_hs = add_request(session, now - timedelta(days=10), status="approved")
        pending_hs = add_request(
            session, now - timedelta(days=40), object_type="companies", approvers=("u-mgr",)
        )
    sandbox = {big, board, rejected, recalled}

    assert ids(world, "u-admin", "all=true") == sandbox | {approved_hs, pending_hs}
    assert ids(world, "u-admin", "status=pending") == {big, board, pending_hs}
    assert ids(world, "u-admin", "status=pending&status=approved") == {big, board, pending_hs, approved_hs}
    assert ids(world, "u-admin", "status=rejected") == {rejected}
    assert ids(world, "u-admin", "rule=board-review") == {board}
    assert ids(world, "u-admin", "connection=hubspot") == {approved_hs, pending_hs}
    assert ids(world, "u-admin", "object=DEALS") == {approved_hs}  # case-insensitive
    assert ids(world, "u-admin", "object=deal") == sandbox
    assert ids(world, "u-admin", "record=sandbox:DEAL:D-2") == {board}
    assert ids(world, "u-admin", "status=pending&connection=sandbox&rule=big-deal") == {big}

    # Age: durations before now, or times (UTC unless they say otherwise).
    assert ids(world, "u-admin", "older_than=7d") == {approved_hs, pending_hs}
    assert ids(world, "u-admin", "older_than=1m") == {pending_hs}
    assert ids(world, "u-admin", "newer_than=12h") == sandbox
    twenty_days_ago = (now - timedelta(days=20)).isoformat()
    assert ids(world, "u-admin", f"newer_than={quote(twenty_days_ago)}&older_than=1w") == {approved_hs}
    assert ids(world, "u-admin", f"older_than={(now - timedelta(days=20)).date()}") == {pending_hs}

    # Waiting on whom: the open step has them assigned and they have not voted on it yet.
    assert ids(world, "u-admin", "pending_for=u-mgr") == {big, pending_hs}
    assert ids(world, "u-admin", "pending_for=u-board-1") == {board}
    world.approve_steps(board, "u-board-1")  # an `all` step: still open, waiting on u-board-2
    assert ids(world, "u-admin", "pending_for=u-board-1") == set()
    assert ids(world, "u-admin", "pending_for=u-board-2") == {board}
    assert ids(world, "u-admin", "pending_for=u-mgr&connection=hubspot") == {pending_hs}

    # Without any filter the list is what waits for the caller, as before.
    assert ids(world, "u-admin", "") == set()
    assert ids(world, "u-mgr", "") == {big, pending_hs}
    assert ids(world, "u-mgr", "limit=50") == {big, pending_hs}

    # Everyone else: what they submitted or are (were) assigned to, whatever the filters.
    assert ids(world, "u-mgr", "all=true") == {big, rejected, recalled, pending_hs}
    assert ids(world, "u-rep", "all=true") == sandbox
    assert ids(world, "u-rep", "status=recalled") == {recalled}
    assert ids(world, "u-board-2", "status=pending") == {board}
    assert ids(world, "u-nobody", "all=true") == set()
    assert ids(world, "u-nobody", "connection=hubspot") == set()
    for user, seen in (("u-nobody", False), ("u-mgr", True), ("u-admin", True), ("u-rep", False)):
        response = world.get(user, f"/requests/{pending_hs}")
        assert response.status_code == (200 if seen else 404), user
    error_of(world.get("u-nobody", f"/requests/{big}"), 404, "request_not_found")
    error = error_of(world.get("u-gm", "/requests?pending_for=u-mgr&status=pending"), 403, "admin_only")
    assert "pending_for=me" in error["hint"]


def test_a_list_item_is_the_summary_and_the_detail_has_the_history(world: World) -> None:
    request_id = world.submit("D-9")
    world.vote("u-mgr", request_id, comment="ok")
    listed = world.get("u-admin", "/requests?record=sandbox:deal:D-9").get_json()
    assert listed["next_cursor"] is None
    (item,) = listed["requests"]
    assert item["current_step"]["name"] == "general-manager"
    assert item["submitted_at"].endswith("+00:00")
    assert "transitions" not in item
    detail = world.get("u-admin", f"/requests/{request_id}").get_json()
    assert {k: detail[k] for k in item} == item
    assert [v["comment"] for v in detail["votes"]] == ["ok"]


# --- pages ------------------------------------------------------------------------------------


def walk(world: World, query: str, between_pages: Callable[[int], None]) -> list[str]:
    """Every id of every page, in order, following next_cursor; `between_pages` runs after each."""
    seen: list[str] = []
    cursor: str | None = None
    for page in range(200):
        suffix = f"&cursor={cursor}" if cursor else ""
        body = world.get("u-admin", f"/requests?{query}{suffix}").get_json()
        assert body["count"] == len(body["requests"])
        seen += [r["id"] for r in body["requests"]]
        cursor = body["next_cursor"]
        if cursor is None:
            return seen
        between_pages(page)
    raise AssertionError("the walk did not end")


def test_pages_show_every_row_exactly_once_while_rows_are_inserted(world: World) -> None:
    base = (datetime.now(UTC) - timedelta(days=30)).replace(microsecond=0)
    with transaction(world.runtime.sessions) as session:
        # Three rows share each submission time: the id breaks the tie.
        existing = [add_request(session, base + timedelta(minutes=n // 3)) for n in range(45)]
    existing_pending = set(existing)
    behind_cursor: list[str] = []

    def insert_meanwhile(page: int) -> None:
        with transaction(world.runtime.sessions) as session:
            add_request(session, datetime.now(UTC))  # new requests land on the first page, already read
            add_request(session, datetime.now(UTC))
            # One from a slow transaction: older than everything, still unseen, so shown once.
            behind_cursor.append(add_request(session, base - timedelta(days=1, minutes=page)))

    seen = walk(world, "all=true&limit=4", insert_meanwhile)
    assert len(seen) == len(set(seen)), "a row was shown twice"
    assert set(existing) <= set(seen)
    assert set(behind_cursor) <= set(seen)
    assert seen[:4] == sorted(existing, reverse=True)[:4]  # newest first; ties by id, descending
    assert not set(seen) - set(existing) - set(behind_cursor), "rows inserted on read pages were shown"

    # The same with a filter, a different page size, and the last page exactly full.
    with transaction(world.runtime.sessions) as session:
        for request_id in existing[:5]:
            session.get(ApprovalRequestRow, request_id).status = "approved"  # type: ignore[union-attr]
    existing_pending -= set(existing[:5])
    seen = walk(world, "status=approved&limit=5", lambda _page: None)
    assert seen == sorted(existing[:5], reverse=True)
    body = world.get("u-admin", "/requests?status=approved&limit=5").get_json()
    assert (body["count"], body["total"], body["next_cursor"]) == (5, 5, None)
    first = world.get("u-admin", "/requests?connection=hubspot&status=pending&limit=7").get_json()
    assert first["count"] == 7 and first["total"] == len(existing_pending) + 3 * len(behind_cursor)
    assert first["next_cursor"]


def test_pages_stay_exact_while_another_thread_inserts(world: World) -> None:
    base = datetime.now(UTC) - timedelta(days=30)
    with transaction(world.runtime.sessions) as session:
        existing = [add_request(session, base + timedelta(seconds=n // 2)) for n in range(30)]
    inserted: list[str] = []
    stop = threading.Event()

    def insert_until_stopped() -> None:
        while not stop.is_set():
            with transaction(world.runtime.sessions) as session:
                inserted.append(add_request(session, datetime.now(UTC)))
            time.sleep(0.005)

    inserter = threading.Thread(target=insert_until_stopped)
    inserter.start()
    try:
        seen = walk(world, "all=true&limit=3", lambda _page: time.sleep(0.02))
    finally:
        stop.set()
        inserter.join(timeout=30)
    assert len(inserted) >= 5, "the walk was over before the inserts ran alongside it"
    assert len(seen) == len(set(seen)), "a row was shown twice"
    assert set(existing) <= set(seen)


# --- bad parameters -----------------------------------------------------------------------------


def cursor_of(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode()


@pytest.mark.parametrize(
    ("query", "code", "words"),
    [
        ("offset=20", "unknown_parameter", "cursor"),
        ("limit=10&offset=20", "unknown_parameter", "next_cursor"),
        ("stauts=pending", "unknown_parameter", "status"),
        ("cursor=not-a-cursor", "invalid_cursor", "next_cursor"),
        ("cursor=" + cursor_of("[1, 2]"), "invalid_cursor", "next_cursor"),
        ("cursor=" + cursor_of('["2026-05-01T12:00:00", "x"]'), "invalid_cursor", "next_cursor"),  # no zone
        ("cursor=" + cursor_of('["2026-05-01T12:00:00Z", "a\\u0000b"]'), "invalid_cursor", "next_cursor"),
        ("limit=0", "invalid_limit", "500"),
        ("limit=501", "invalid_limit", "500"),
        ("limit=ten", "invalid_limit", "ten"),
        ("limit=5&limit=6", "invalid_limit", "once"),
        ("status=done", "invalid_status", "pending"),
        ("older_than=yesterday", "invalid_older_than", "12h"),
        ("newer_than=99999y", "invalid_newer_than", "100 years"),
        ("newer_than=2026-13-45", "invalid_newer_than", "2026-11-01"),
        ("record=D-7", "invalid_record", "CONNECTION:OBJECT:ID"),
        ("rule=", "invalid_rule", "rule"),
        ("all=maybe", "invalid_all", "all"),
        ("pending_for=u-mgr%00", "invalid_pending_for", "NUL"),
    ],
)
def test_bad_parameters_are_400_with_the_json_error_shape(
    world: World, query: str, code: str, words: str
) -> None:
    response = world.get("u-admin", f"/requests?{query}")
    error = error_of(response, 400, code)
    assert set(response.get_json()) == {"error"}
    assert set(error) <= {"code", "message", "hint"}
    assert words in error["message"] + " " + (error.get("hint") or "")


def test_a_nul_in_a_path_is_400_not_a_database_error(world: World) -> None:
    error_of(world.get("u-admin", "/requests/abc%00def"), 400, "invalid_request_id")
