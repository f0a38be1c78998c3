"""The web app's pages with the Flask test client: who sees what, decisions through the
ApprovalService (as the REST API), bulk approval, my requests, the admin view, API tokens."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from connector.clock import utcnow
from connector.config import Settings
from connector.runtime import Runtime
from connector.storage import approval_store as store
from connector.storage.db import transaction
from connector.storage.models import ApprovalStepRow
from tests.web.helpers import ADMIN, post, signed_in, text, web_world
from tests.webhooks.test_api import BIG_DEAL_RULE, BOARD_RULE, World, outbox_for, write_mapping, written_rows


@pytest.fixture
def world(
    tmp_path: Path, settings_factory: Callable[..., Settings], runtime_factory: Callable[[Settings], Runtime]
) -> World:
    return web_world(tmp_path, settings_factory, runtime_factory)


def status_of(world: World, request_id: str) -> tuple[str, int | None]:
    with world.runtime.sessions() as session:
        stored = store.load(session, request_id)
    assert stored is not None
    return stored.request.status, stored.request.current_step


def vote(world: World, user: str, request_id: str, decision: str, htmx: bool = False, **form: str):  # type: ignore[no-untyped-def]
    client = signed_in(world, user)
    data = {"step_index": str(status_of(world, request_id)[1]), **form}
    headers = {"HX-Request": "true"} if htmx else {}
    return client, post(client, f"/app/requests/{request_id}/{decision}", data, headers=headers)


# --- inbox -------------------------------------------------------------------------------------


def test_inbox_lists_what_waits_for_me_oldest_first(world: World) -> None:
    first = world.submit("D-1", amount=150000)
    second = world.submit("D-2", amount=250000)
    page = signed_in(world, "u-mgr").get("/app/inbox")
    html = page.get_data(as_text=True)
    assert page.status_code == 200
    assert html.index(f"/app/requests/{first}") < html.index(f"/app/requests/{second}")
    shown = text(page)
    assert "150,000" in shown and "250,000" in shown  # money, formatted
    assert "step 1 of 3: manager" in shown
    assert '<span class="chip">Amount</span>' in html  # the field that made the rule match
    assert "Submitted by u-rep" in shown


def test_inbox_of_someone_with_nothing_to_do(world: World) -> None:
    world.submit()
    for user in ("u-nobody", "u-gm", "u-rep"):  # not involved; a later step; the submitter
        assert "Nothing waits for you" in text(signed_in(world, user).get("/app/inbox")), user


# --- who may see a request ------------------------------------------------------------------------


def test_a_request_is_404_for_whoever_may_not_see_it(world: World) -> None:
    request_id = world.submit()
    for user in ("u-nobody", "u-fin-1"):  # not involved; finance's step has not opened yet
        answer = signed_in(world, user).get(f"/app/requests/{request_id}")
        assert answer.status_code == 404 and "Not found" in text(answer), user
    for user in ("u-mgr", "u-rep", ADMIN):  # approver, submitter, admin
        assert signed_in(world, user).get(f"/app/requests/{request_id}").status_code == 200, user
    assert signed_in(world, "u-mgr").get("/app/requests/no-such-id").status_code == 404


def test_deciding_on_a_request_one_may_not_see_is_404_and_writes_nothing(world: World) -> None:
    request_id = world.submit()
    before = written_rows(world.runtime)
    _client, answer = vote(world, "u-nobody", request_id, "approve")
    assert answer.status_code == 404
    assert written_rows(world.runtime) == before


def test_request_page_shows_changes_reasons_and_chain(world: World) -> None:
    request_id = world.submit("D-1", amount=150000)
    world.submit("D-1", amount=160000)  # a restart_on_change field: the request restarts with before -> after
    page = signed_in(world, "u-mgr").get(f"/app/requests/{request_id}")
    shown, html = text(page), page.get_data(as_text=True)
    assert "Amount was 150,000 → now 160,000" in shown
    assert "Amount is more than 100,000 (it is 160,000)" in shown  # why, in words
    assert "Decimal(" not in html and "None" not in shown
    assert "Waiting at step 1 of 3, manager, for u-mgr since" in shown
    for step in ("manager", "Restarted: the record changed", "Submitted"):
        assert step in shown
    assert (
        'name="step_index" value="0"' in html and ">Approve</button>" in html and ">Reject</button>" in html
    )
    # The submitter sees no vote buttons but may recall; an outsider approver of nothing sees neither.
    rep = signed_in(world, "u-rep").get(f"/app/requests/{request_id}").get_data(as_text=True)
    assert ">Approve</button>" not in rep and "Recall my request" in rep


# --- decisions -------------------------------------------------------------------------------------


def test_approving_through_the_page_moves_the_chain(world: World) -> None:
    request_id = world.submit()
    client, answer = vote(world, "u-mgr", request_id, "approve", comment="fine")
    assert answer.status_code == 303
    page = text(client.get(answer.headers["Location"]))
    assert "You approved this request." in page and "fine" in page
    assert status_of(world, request_id) == ("pending", 1)
    # The same path as the API: the general manager sees it in the API's pending list now.
    assert [r["id"] for r in world.get("u-gm", "/requests?pending_for=me").get_json()["requests"]] == [
        request_id
    ]


def test_reject_needs_a_comment_by_default(world: World) -> None:
    request_id = world.submit()
    before = written_rows(world.runtime)
    client, answer = vote(world, "u-mgr", request_id, "reject")
    assert "needs a comment" in text(client.get(answer.headers["Location"]))
    assert written_rows(world.runtime) == before and status_of(world, request_id) == ("pending", 0)
    _client, answer = vote(world, "u-mgr", request_id, "reject", comment="margin too thin")
    assert status_of(world, request_id) == ("rejected", None)
    assert outbox_for(world.runtime, request_id)[-1] == (
        "reject",
        {"approval_status": "Rejected", "approval_comment": "margin too thin"},
    )


def test_a_rule_may_make_the_reject_comment_optional(world: World) -> None:
    write_mapping(
        world.mapping_file,
        BIG_DEAL_RULE.replace(
            "    expires_after: 30d\n", "    expires_after: 30d\n    reject_comment: optional\n"
        ),
        BOARD_RULE,
    )
    assert not world.pipeline.mappings.reload()
    request_id = world.submit()
    html = signed_in(world, "u-mgr").get(f"/app/requests/{request_id}").get_data(as_text=True)
    assert "(optional)" in html
    vote(world, "u-mgr", request_id, "reject")
    assert status_of(world, request_id) == ("rejected", None)


def test_htmx_decision_swaps_the_main_part_in_place(world: World) -> None:
    request_id = world.submit()
    _client, answer = vote(world, "u-mgr", request_id, "reject", htmx=True)
    html = answer.get_data(as_text=True)
    assert (
        answer.status_code == 200
        and "<html" not in html
        and 'role="alert"' in html
        and "needs a comment" in html
    )
    _client, answer = vote(world, "u-mgr", request_id, "approve", htmx=True)
    html = answer.get_data(as_text=True)
    assert "<html" not in html and "You approved this request." in html
    assert ">Approve</button>" not in html  # u-mgr has voted; the step moved on


def test_decision_without_the_csrf_token_is_refused(world: World) -> None:
    request_id = world.submit()
    before = written_rows(world.runtime)
    client = signed_in(world, "u-mgr")
    answer = client.post(f"/app/requests/{request_id}/approve", data={"step_index": "0"})
    assert answer.status_code == 400 and "This form has expired" in text(answer)
    assert written_rows(world.runtime) == before


def test_a_stale_page_says_what_happened(world: World) -> None:
    request_id = world.submit()
    vote(world, "u-mgr", request_id, "approve")
    client = signed_in(world, "u-gm")
    answer = post(client, f"/app/requests/{request_id}/approve", {"step_index": "0"})
    assert "already been decided" in text(client.get(answer.headers["Location"]))


def test_recall_by_the_submitter_and_not_by_an_approver(world: World) -> None:
    request_id = world.submit()
    client = signed_in(world, "u-mgr")
    answer = post(client, f"/app/requests/{request_id}/recall")
    assert "Only the submitter or an admin" in text(client.get(answer.headers["Location"]))
    client = signed_in(world, "u-rep")
    answer = post(client, f"/app/requests/{request_id}/recall")
    assert "The request was withdrawn." in text(client.get(answer.headers["Location"]))
    assert status_of(world, request_id) == ("recalled", None)


# --- bulk approval ------------------------------------------------------------------------------------


def test_bulk_approve_only_where_the_rule_allows(world: World) -> None:
    first, second = world.submit("D-1"), world.submit("D-2", amount=200000)
    client = signed_in(world, "u-mgr")
    assert 'type="checkbox"' not in client.get("/app/inbox").get_data(as_text=True)
    answer = post(client, "/app/inbox/approve", {"item": [f"{first}:0"]})
    assert "one decision at a time" in text(client.get(answer.headers["Location"]))
    assert status_of(world, first) == ("pending", 0)

    write_mapping(
        world.mapping_file,
        BIG_DEAL_RULE.replace("    expires_after: 30d\n", "    expires_after: 30d\n    bulk_approve: true\n"),
        BOARD_RULE,
    )
    assert not world.pipeline.mappings.reload()
    html = client.get("/app/inbox").get_data(as_text=True)
    assert html.count('type="checkbox"') == 2 and 'for="bulk-comment"' in html
    answer = post(client, "/app/inbox/approve", {"item": [f"{first}:0", f"{second}:0"], "comment": "ok"})
    assert "2 requests approved." in text(client.get(answer.headers["Location"]))
    assert status_of(world, first) == ("pending", 1) and status_of(world, second) == ("pending", 1)


# --- my requests -------------------------------------------------------------------------------------


def test_my_requests_say_where_each_waits_on_whom_since_when(world: World) -> None:
    first = world.submit("D-1")
    world.submit("D-2", amount=200000)
    vote(world, "u-mgr", first, "approve")
    shown = text(signed_in(world, "u-rep").get("/app/mine"))
    assert "Step 2 of 3, general-manager: waiting for u-gm since" in shown
    assert "Step 1 of 3, manager: waiting for u-mgr since" in shown
    assert "You have no approval requests." in text(signed_in(world, "u-mgr").get("/app/mine"))


# --- admin ---------------------------------------------------------------------------------------------


def test_admin_pages_are_404_for_others(world: World) -> None:
    client = signed_in(world, "u-mgr")
    for page in ("/app/admin", "/app/admin/tokens"):
        assert client.get(page).status_code == 404
    assert 'href="/app/admin"' not in client.get("/app/inbox").get_data(as_text=True)


def test_admin_lists_all_requests_with_filters(world: World) -> None:
    big, board = world.submit("D-1"), world.submit("D-2", amount=60000)
    rejected = world.submit("D-3")
    vote(world, "u-mgr", rejected, "reject", comment="no")
    client = signed_in(world, ADMIN)

    def listed(query: str = "") -> set[str]:
        return set(
            re.findall(r"/app/requests/([0-9a-f]+)", client.get(f"/app/admin{query}").get_data(as_text=True))
        )

    assert listed() == {big, board, rejected}
    assert listed("?status=rejected") == {rejected}
    assert listed("?rule=board-review") == {board}
    assert listed("?connection=sandbox") == {big, board, rejected}
    assert listed("?connection=other") == set()
    assert listed("?overdue=3") == set()
    with transaction(world.runtime.sessions) as session:
        session.execute(
            update(ApprovalStepRow)
            .where(ApprovalStepRow.request_id == big)
            .values(entered_at=utcnow() - timedelta(days=4))
        )
    assert listed("?overdue=3") == {big}
    assert listed("?status=bogus&overdue=5") == {big, board, rejected}  # unknown filter values are ignored
    partial = client.get("/app/admin?status=rejected", headers={"HX-Request": "true"}).get_data(as_text=True)
    assert "<html" not in partial and rejected in partial


def test_admin_reassigns_a_step_and_the_new_approver_decides(world: World) -> None:
    request_id = world.submit()
    client = signed_in(world, ADMIN)
    html = client.get(f"/app/requests/{request_id}").get_data(as_text=True)
    assert "User id of the new approver" in html
    answer = post(
        client,
        f"/app/requests/{request_id}/reassign",
        {"step_index": "0", "old": "u-mgr", "new": "u-deputy", "comment": "holiday"},
    )
    assert "The step now waits for u-deputy." in text(client.get(answer.headers["Location"]))
    assert "Nothing waits for you" in text(signed_in(world, "u-mgr").get("/app/inbox"))
    assert request_id in signed_in(world, "u-deputy").get("/app/inbox").get_data(as_text=True)
    vote(world, "u-deputy", request_id, "approve")
    assert status_of(world, request_id) == ("pending", 1)
    # Not for approvers: the route is admin-only.
    _client, answer = vote(world, "u-gm", request_id, "reassign", old="u-gm", new="u-x")
    assert answer.status_code == 404


def test_admin_cancels_a_request(world: World) -> None:
    request_id = world.submit()
    client = signed_in(world, ADMIN)
    assert "Cancel this request" in client.get(f"/app/requests/{request_id}").get_data(as_text=True)
    post(client, f"/app/requests/{request_id}/recall", {"comment": "duplicate"})
    assert status_of(world, request_id) == ("recalled", None)
    shown = text(client.get(f"/app/requests/{request_id}"))
    assert "Request withdrawn" in shown and "duplicate" in shown


def test_admin_issues_and_revokes_api_tokens(world: World) -> None:
    client = signed_in(world, ADMIN)
    answer = post(client, "/app/admin/tokens", {"user_id": "u-bot", "label": "reporting"})
    token = re.search(
        r'id="new-token" class="mono" readonly value="(cra_[^"]+)"', answer.get_data(as_text=True)
    )
    assert answer.status_code == 200 and token
    me = world.client.get("/api/v1/me", headers={"Authorization": f"Bearer {token.group(1)}"})
    assert me.get_json()["user_id"] == "u-bot" and me.get_json()["is_admin"] is False
    listing = client.get("/app/admin/tokens").get_data(as_text=True)
    assert "reporting" in listing and token.group(1) not in listing  # shown once only
    token_id = me.get_json()["token_id"]
    post(client, f"/app/admin/tokens/{token_id}/revoke")
    assert (
        world.client.get("/api/v1/me", headers={"Authorization": f"Bearer {token.group(1)}"}).status_code
        == 401
    )
    bad = post(client, "/app/admin/tokens", {"user_id": " "})
    assert bad.status_code == 400 and "Give the user id" in text(bad)


def test_record_values_are_escaped_everywhere(world: World) -> None:
    request_id = world.submit("<b>D-9</b>", stage="<script>alert(1)</script>")
    client = signed_in(world, "u-mgr")
    for page in ("/app/inbox", f"/app/requests/{request_id}"):
        html = client.get(page).get_data(as_text=True)
        assert "&lt;b&gt;D-9&lt;/b&gt;" in html and "<b>D-9</b>" not in html, page
        assert "<script>alert(1)</script>" not in html, page
    links = signed_in(world, ADMIN).get("/app/admin").get_data(as_text=True)
    assert "<b>D-9</b>" not in links
