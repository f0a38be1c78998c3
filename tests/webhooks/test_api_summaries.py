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
from connector.storage.models import ApprovalRequestRow, ApprovalStepRow, ApprovalVoteRow
from tests.webhooks.api_engines import world_on_both_engines  # noqa: F401 (the `world` fixture)
from tests.webhooks.test_api import World
from tests.webhooks.test_api_listing import add_request


def reference(world: World, filters: RequestFilters, viewer: Viewer | None) -> dict[str, Any]:
    with world.runtime.sessions() as session:
        return RequestList.of(find_requests(session, filters, viewer)).model_dump(mode="json")


def built(world: World, filters: RequestFilters, viewer: Viewer | None) -> dict[str, Any]:
    with world.runtime.sessions() as session:
        return request_list(session, filters, viewer)


def assert_every_page_built_as_the_reference(
    world: World, given: dict[str, Any], viewer: Viewer | None
) -> None:
    """Page by page from the first, the built page equals the model path's."""
    filters = RequestFilters.model_validate(given)
    while True:
        page = built(world, filters, viewer)
        assert page == reference(world, filters, viewer), (filters, viewer)
        if page["next_cursor"] is None:
            return
        filters = RequestFilters.model_validate({**given, "cursor": page["next_cursor"]})


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
        assert_every_page_built_as_the_reference(world, given, viewer)


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


def open_steps_to_fold(world: World) -> dict[str, str]:
    """Requests whose open step the page's statement must pick out exactly (on PostgreSQL it
    comes as one JSON column of the page's rows): by name, ids."""
    # a fraction with trailing zeros, and none: PostgreSQL's JSON writes both unlike isoformat
    at = datetime(2026, 3, 1, 9, 30, 0, 120000, tzinfo=UTC)
    with transaction(world.runtime.sessions) as session:

        def step(request_id: str, index: int, round_: int, status: str, **given: Any) -> None:
            session.add(
                ApprovalStepRow(
                    request_id=request_id,
                    index=index,
                    round=round_,
                    name=f"step {index}",
                    mode="all",
                    approvers=["u-z", "u-a", "u-hs-mgr"],
                    required=3,
                    status=status,
                    entered_at=at + timedelta(minutes=round_),
                    **given,
                )
            )

        def votes(request_id: str, index: int, round_: int, *approvers: str, **given: Any) -> None:
            for n, approver in enumerate(approvers):
                session.add(
                    ApprovalVoteRow(
                        request_id=request_id,
                        step_index=index,
                        round=round_,
                        approver=approver,
                        decision="approve",
                        comment=f'{approver} says "ok" \\ \n\t\x01 — ✓',
                        at=at + timedelta(seconds=n) if n else at.replace(microsecond=0),
                        **given,
                    )
                )
                session.flush()  # ids in this order: oldest first is not by approver

        # pending, round 3 open with three votes (latest round only; rounds 1 and 2 hold votes too)
        later = add_request(session, at, connection="sandbox", object_type="deal")
        session.flush()
        session.query(ApprovalStepRow).filter_by(request_id=later).update({"status": "cancelled"})
        step(later, 0, 2, "cancelled", left_at=at + timedelta(hours=1))
        step(later, 0, 3, "pending", on_behalf_of={"u-a": "u-z", "u-b": "u-hs-mgr"})
        votes(later, 0, 1, "u-hs-mgr")
        votes(later, 0, 2, "u-a", "u-z")
        votes(later, 0, 3, "u-z", "u-a")
        votes(later, 0, 3, "u-b", acting_admin=True, on_behalf_of="u-hs-mgr", auto_reason="policy")
        # the current step is the second: the first, pending still (as no store leaves it), is not shown
        second = add_request(session, at + timedelta(minutes=1), connection="sandbox", object_type="deal")
        session.flush()
        step(second, 1, 1, "pending", left_at=at.replace(microsecond=0) + timedelta(days=1))
        votes(second, 0, 1, "u-hs-mgr")
        session.query(ApprovalRequestRow).filter_by(id=second).update({"current_step": 1})
        # pending, but the latest round of its current step is not: no open step, though an
        # earlier round still says pending
        stale = add_request(session, at + timedelta(minutes=2), connection="sandbox", object_type="deal")
        session.flush()
        step(stale, 0, 2, "approved", left_at=at + timedelta(hours=2))
        votes(stale, 0, 2, "u-hs-mgr")
        # approved: no current step, its step's votes not shown
        approved = add_request(
            session, at + timedelta(minutes=3), connection="sandbox", object_type="deal", status="approved"
        )
        session.flush()
        votes(approved, 0, 1, "u-hs-mgr")
        # pending without a vote yet
        fresh = add_request(session, at + timedelta(minutes=4), connection="sandbox", object_type="deal")
    return {"later": later, "second": second, "stale": stale, "approved": approved, "fresh": fresh}


def test_the_page_folds_in_exactly_each_open_step_and_its_votes(world: World) -> None:
    ids = open_steps_to_fold(world)
    admin = Viewer("u-admin", True)
    for given, viewer in (
        ({}, admin),
        ({"limit": 2}, admin),
        ({"status": ["pending"]}, admin),
        ({"status": ["approved"]}, admin),  # no open steps to fold in: read as on SQLite
        ({}, Viewer("u-hs-rep", False)),  # its own requests: the visible page's statement
        ({"status": ["pending"], "limit": 2}, Viewer("u-hs-rep", False)),  # the same, narrowed
        ({"pending_for": "u-hs-mgr"}, Viewer("u-hs-mgr", False)),  # from approval_waiting
    ):
        assert_every_page_built_as_the_reference(world, given, viewer)

    shown = {s["id"]: s["current_step"] for s in built(world, RequestFilters(), admin)["requests"]}
    later = shown[ids["later"]]
    assert (later["round"], later["on_behalf_of"]) == (3, {"u-a": "u-z", "u-b": "u-hs-mgr"})
    assert [(v["round"], v["approver"]) for v in later["votes"]] == [(3, "u-z"), (3, "u-a"), (3, "u-b")]
    assert later["entered_at"] == "2026-03-01T09:33:00.120000+00:00"
    assert [v["at"] for v in later["votes"]] == [
        "2026-03-01T09:30:00+00:00",
        "2026-03-01T09:30:01.120000+00:00",
        "2026-03-01T09:30:00+00:00",
    ]
    assert later["votes"][0]["comment"] == 'u-z says "ok" \\ \n\t\x01 — ✓'
    assert later["votes"][2]["acting_admin"] is True and later["votes"][0]["acting_admin"] is False
    assert (later["votes"][2]["on_behalf_of"], later["votes"][2]["auto_reason"]) == ("u-hs-mgr", "policy")
    second = shown[ids["second"]]
    assert (second["index"], second["votes"], second["left_at"]) == (1, [], "2026-03-02T09:30:00+00:00")
    assert shown[ids["stale"]] is None and shown[ids["approved"]] is None
    assert shown[ids["fresh"]]["votes"] == [] and shown[ids["fresh"]]["left_at"] is None
