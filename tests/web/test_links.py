"""One-click decisions: signed, expiring, single-use links that open a confirmation page."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from itsdangerous import TimestampSigner

from connector.config import Settings
from connector.runtime import Runtime
from connector.web.links import decision_links
from tests.web.helpers import SECRET, csrf_token, path_of, text, web_world
from tests.webhooks.test_api import World, outbox_for, written_rows


@pytest.fixture
def world(
    tmp_path: Path, settings_factory: Callable[..., Settings], runtime_factory: Callable[[Settings], Runtime]
) -> World:
    return web_world(tmp_path, settings_factory, runtime_factory)


def links_for(world: World, request_id: str, approver: str, **kwargs: object) -> dict[str, str]:
    return decision_links(request_id, approver, settings=world.runtime.settings, **kwargs)  # type: ignore[arg-type]


def confirm(world: World, link: str, comment: str = "") -> tuple[Any, Any]:
    client = world.app.test_client()
    page = client.get(path_of(link))
    token = link.split("token=", 1)[1]
    from urllib.parse import unquote

    return client.post(
        "/app/decide",
        data={"csrf_token": csrf_token(client), "token": unquote(token), "comment": comment},
    ), page


def test_links_open_a_prefilled_confirmation_and_a_get_never_decides(world: World) -> None:
    request_id = world.submit()
    links = links_for(world, request_id, "u-mgr")
    assert set(links) == {"approve", "reject"}
    assert all(link.startswith("http://127.0.0.1:8000/app/decide?token=") for link in links.values())
    before = written_rows(world.runtime)
    client = world.app.test_client()
    for _ in range(3):  # a mail scanner, a preview, the person
        page = client.get(path_of(links["approve"]))
        assert page.status_code == 200
    assert written_rows(world.runtime) == before
    shown = text(page)
    assert "Approve D-1?" in shown and "Yes, approve" in shown and "step 1 of 3: manager" in shown


def test_confirming_decides_once_and_voids_the_other_link(world: World) -> None:
    request_id = world.submit()
    links = links_for(world, request_id, "u-mgr")
    answer, _page = confirm(world, links["approve"], "looks right")
    assert answer.status_code == 200 and "You approved the request." in text(answer)
    listed = world.get("u-mgr", f"/requests/{request_id}").get_json()
    assert listed["current_step"]["name"] == "general-manager"
    assert listed["votes"][0]["comment"] == "looks right" and listed["votes"][0]["approver"] == "u-mgr"
    for decision in ("approve", "reject"):
        answer, page = confirm(world, links[decision], "again")
        assert page.status_code == 400 and "already been used" in text(page)
        assert answer.status_code == 400


def test_reject_link_needs_a_comment_and_stays_usable_until_it_has_one(world: World) -> None:
    request_id = world.submit()
    link = links_for(world, request_id, "u-mgr")["reject"]
    answer, page = confirm(world, link)
    assert " required " in f" {text(page)} " or "(required)" in text(page)
    assert answer.status_code == 409 and "needs a comment" in text(answer)
    answer, _page = confirm(world, link, "wrong customer")
    assert "You rejected the request." in text(answer)
    assert outbox_for(world.runtime, request_id)[-1][1]["approval_comment"] == "wrong customer"


def test_a_link_for_someone_who_may_not_vote_decides_nothing(world: World) -> None:
    request_id = world.submit()
    before = written_rows(world.runtime)
    answer, _page = confirm(world, links_for(world, request_id, "u-gm")["approve"])  # step 2's approver
    assert answer.status_code == 409 and "not an approver of the step" in text(answer)
    assert written_rows(world.runtime) == before


def test_a_link_bound_to_a_step_does_not_decide_a_later_one(world: World) -> None:
    request_id = world.submit()
    world.approve_steps(request_id, "u-mgr")
    answer, _page = confirm(world, links_for(world, request_id, "u-gm", step_index=0)["approve"])
    assert answer.status_code == 409 and "already been decided" in text(answer)
    answer, _page = confirm(world, links_for(world, request_id, "u-gm", step_index=1)["approve"])
    assert answer.status_code == 200


def test_expired_and_forged_links(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    request_id = world.submit()
    link = links_for(world, request_id, "u-mgr")["approve"]
    client = world.app.test_client()
    token = link.split("token=")[1]
    assert "not valid" in text(client.get(f"/app/decide?token={token[:-3]}xyz"))
    assert "not valid" in text(client.get("/app/decide"))
    other_key = Settings(secret_key="another-key", public_base_url="http://127.0.0.1:8000")
    forged = decision_links(request_id, "u-mgr", settings=other_key)["approve"]
    assert client.get(path_of(forged)).status_code == 400
    later = int(time.time()) + 73 * 3600  # DECISION_LINK_HOURS defaults to 72
    monkeypatch.setattr(TimestampSigner, "get_timestamp", lambda self: later)
    page = client.get(path_of(link))
    assert page.status_code == 400 and "expired" in text(page)


def test_decision_links_read_the_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECRET_KEY", SECRET)
    monkeypatch.setenv("PUBLIC_BASE_URL", "https://approvals.example/")
    links = decision_links("r1", "u1")
    assert links["approve"].startswith("https://approvals.example/app/decide?token=")


def test_without_a_secret_key_no_links_can_be_made() -> None:
    from connector.config import ConfigError

    with pytest.raises(ConfigError, match="SECRET_KEY is not set"):
        decision_links("r1", "u1", settings=Settings())
