"""GET /api/v1/requests builds its pages as plain JSON (connector/service/request_summaries.py):
every page must equal what the documented models give for the same requests
(RequestList.of(find_requests(...)), which the OpenAPI document describes), on SQLite and
PostgreSQL, for requests in every state a summary shows differently."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from connector.service.request_query import RequestFilters, Viewer, find_requests
from connector.service.request_summaries import request_list
from connector.service.request_views import RequestList
from connector.storage.db import transaction
from connector.storage.models import ApprovalStepRow, ApprovalVoteRow
from tests.webhooks.api_engines import world_on_both_engines  # noqa: F401 (the `world` fixture)
from tests.webhooks.test_api import World
from tests.webhooks.test_api_listing import add_request


def reference(world: World, filters: RequestFilters, viewer: Viewer | None) -> dict[str, Any]:
    with world.runtime.sessions() as session:
        return RequestList.of(find_requests(session, filters, viewer)).model_dump(mode="json")


def built(world: World, filters: RequestFilters, viewer: Viewer | None) -> dict[str, Any]:
    with world.runtime.sessions() as session:
        return request_list(session, filters, viewer)


def requests_in_every_state(world: World) -> dict[str, str]:
    """Requests in every state a summary shows differently, by name: ids."""
    fresh = world.submit("D-1", stage="Zürich — négociation")  # big-deal, first of three steps open
    moved = world.submit("D-2")
    world.approve_steps(moved, "u-mgr")  # second step open; the first step's vote not shown
    board = world.submit("D-3", amount=60000)  # an `all` step with one of two votes cast
    world.approve_steps(board, "u-board-1")
    rejected = world.submit("D-4")
    assert world.vote("u-mgr", rejected, "reject", comment="no").status_code == 200
    approved = world.submit("D-5", amount=60000)
    world.approve_steps(approved, "u-board-1", "u-board-2")
    recalled = world.submit("D-6")
    assert world.post("u-rep", f"/requests/{recalled}/recall", {"comment": "oops"}).status_code == 200
    # a step re-opened: round 2 is the open one, round 1's vote is history
    at = datetime.now(UTC) - timedelta(days=1)
    with transaction(world.runtime.sessions) as session:
        again = add_request(session, at, connection="sandbox", object_type="deal", rule="big-deal")
        session.flush()
        session.query(ApprovalStepRow).filter_by(request_id=again).update({"status": "cancelled"})
        session.add(
            ApprovalStepRow(
                request_id=again,
                index=0,
                round=2,
                name="manager",
                mode="one",
                approvers=["u-hs-mgr", "u-deputy"],
                on_behalf_of={"u-deputy": "u-hs-mgr"},
                required=1,
                status="pending",
                entered_at=at + timedelta(hours=1),
            )
        )
        for round_, approver in ((1, "u-hs-mgr"), (2, "u-deputy")):
            session.add(
                ApprovalVoteRow(
                    request_id=again,
                    step_index=0,
                    round=round_,
                    approver=approver,
                    decision="approve",
                    comment=f"round {round_} — ok ✓",
                    at=at + timedelta(hours=round_),
                    on_behalf_of="u-hs-mgr" if approver == "u-deputy" else None,
                )
            )
    return {
        "fresh": fresh,
        "moved": moved,
        "board": board,
        "rejected": rejected,
        "approved": approved,
        "recalled": recalled,
        "again": again,
    }


def test_pages_equal_the_documented_models_for_every_state(world: World) -> None:
    ids = requests_in_every_state(world)
    fresh, moved, board, rejected = ids["fresh"], ids["moved"], ids["board"], ids["rejected"]
    approved, recalled, again = ids["approved"], ids["recalled"], ids["again"]
    admin = Viewer("u-admin", True)
    whole = built(world, RequestFilters(), admin)
    assert whole == reference(world, RequestFilters(), admin)
    assert whole["total"] == whole["count"] == 7
    summaries = {s["id"]: s for s in whole["requests"]}
    assert summaries[fresh]["current_step"]["name"] == "manager"
    assert summaries[moved]["current_step"]["name"] == "general-manager"
    assert summaries[moved]["current_step"]["votes"] == []
    assert [v["approver"] for v in summaries[board]["current_step"]["votes"]] == ["u-board-1"]
    assert summaries[rejected]["current_step"] is None
    assert summaries[approved]["current_step"] is None
    assert summaries[recalled]["current_step"] is None
    reopened = summaries[again]["current_step"]
    assert (reopened["round"], reopened["on_behalf_of"]) == (2, {"u-deputy": "u-hs-mgr"})
    assert [v["comment"] for v in reopened["votes"]] == ["round 2 — ok ✓"]

    # page by page, filtered, and as someone who sees only some of them
    for given, viewer in (
        ({"limit": 2}, admin),
        ({"status": ["pending"], "limit": 3}, admin),
        ({"pending_for": "u-mgr"}, Viewer("u-mgr", False)),
        ({}, Viewer("u-board-2", False)),
        ({}, Viewer("u-nobody", False)),
    ):
        filters = RequestFilters.model_validate(given)
        while True:
            page = built(world, filters, viewer)
            assert page == reference(world, filters, viewer), (filters, viewer)
            if page["next_cursor"] is None:
                break
            filters = RequestFilters.model_validate({**given, "cursor": page["next_cursor"]})


def test_the_api_answers_the_built_page(world: World) -> None:
    pending = world.submit("D-1")
    response = world.get("u-mgr", "/requests?limit=1")
    assert response.status_code == 200
    body = response.get_json()
    assert body == reference(world, RequestFilters(pending_for="u-mgr", limit=1), Viewer("u-mgr", False))
    assert [r["id"] for r in body["requests"]] == [pending]
    RequestList.model_validate(body)  # the documented shape


def test_the_api_answers_the_documented_models_byte_for_byte(world: World) -> None:
    """The body a client receives is exactly what Flask makes of the documented models' JSON
    for the same page (key order, number and time formats, escapes of non-ASCII text): the
    built page and the models' dump could be equal as Python values (1 == True == 1.0) and
    still differ on the wire."""
    ids = requests_in_every_state(world)
    admin, mgr = Viewer("u-admin", True), Viewer("u-mgr", False)
    for user, path, filters, viewer in (
        ("u-admin", "/requests?all=true&limit=50", RequestFilters(limit=50), admin),
        ("u-admin", "/requests?all=true&limit=3", RequestFilters(limit=3), admin),
        ("u-admin", "/requests?status=pending", RequestFilters(status=["pending"]), admin),
        ("u-mgr", "/requests", RequestFilters(pending_for="u-mgr"), mgr),
        ("u-mgr", "/requests?all=true", RequestFilters(), mgr),
        ("u-board-2", "/requests?all=true", RequestFilters(), Viewer("u-board-2", False)),
    ):
        response = world.get(user, path)
        assert response.status_code == 200, response.get_json()
        with world.app.app_context():
            expected = world.app.json.response(reference(world, filters, viewer)).get_data()
        assert response.get_data() == expected, path
    body = world.get("u-admin", "/requests?all=true&limit=50").get_data()
    assert len(RequestList.model_validate_json(body).requests) == len(ids)
    for text in (b"Z\\u00fcrich", b"ok \\u2713", b'"acting_admin":false', b'"left_at":null'):
        assert text in body  # what the comparison above covers: escapes, booleans, nulls
