"""The out-of-office page (connector/web/delegations.py): set, list and cancel a deputy with the
CSRF token; refusals in words; the request page names the deputy and whom they stand in for."""

from __future__ import annotations

import html
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from connector.config import Settings
from connector.runtime import Runtime
from tests.web.helpers import csrf_token, post, signed_in, text, web_world
from tests.webhooks.test_api import World


def today() -> date:
    """Read when used, not at import: a run that crosses midnight UTC must not use yesterday."""
    return datetime.now(UTC).date()


@pytest.fixture
def world(
    tmp_path: Path, settings_factory: Callable[..., Settings], runtime_factory: Callable[[Settings], Runtime]
) -> World:
    return web_world(tmp_path, settings_factory, runtime_factory)


def form(deputy: str, days: int = 5, **more: str) -> dict[str, str]:
    return {
        "deputy": deputy,
        "starts_on": today().isoformat(),
        "ends_on": (today() + timedelta(days=days)).isoformat(),
        **more,
    }


def test_set_a_deputy_and_see_it_on_the_request_page(world: World) -> None:
    request_id = world.submit()
    boris = signed_in(world, "u-mgr")
    page = boris.get("/app/out-of-office")
    assert page.status_code == 200
    assert '<option value="u-gm">' in page.get_data(as_text=True)  # people from the directory
    assert '<option value="u-mgr">' not in page.get_data(as_text=True)  # not oneself
    done = post(boris, "/app/out-of-office", form("u-gm", note="holiday"), follow_redirects=True)
    assert done.status_code == 200
    words = text(done)
    assert "u-gm acts for you from" in words and "in force" in words
    page = signed_in(world, "u-gm").get(f"/app/requests/{request_id}")
    words = text(page)
    assert "deputy for u-mgr" in words and "Handed to a deputy" in words
    voted = post(signed_in(world, "u-gm"), f"/app/requests/{request_id}/approve", {"step_index": "0"})
    assert voted.status_code in (200, 303)
    assert "deputy for u-mgr" in text(signed_in(world, "u-admin").get(f"/app/requests/{request_id}"))


def test_refusals_are_shown_in_words_and_change_nothing(world: World) -> None:
    boris = signed_in(world, "u-mgr")
    assert post(boris, "/app/out-of-office", form("u-gm")).status_code == 303
    gm = signed_in(world, "u-gm")
    refused = post(gm, "/app/out-of-office", form("u-mgr"))
    assert refused.status_code == 400
    words = html.unescape(text(refused))
    assert "has chosen you as their own deputy" in words and "u-gm -> u-mgr" in words
    bad_dates = post(gm, "/app/out-of-office", {"deputy": "u-rep", "starts_on": "soon", "ends_on": ""})
    assert bad_dates.status_code == 400 and "YYYY-MM-DD" in text(bad_dates)
    backwards = post(gm, "/app/out-of-office", form("u-rep", days=-3))
    assert backwards.status_code == 400 and "ends" in text(backwards)
    assert "Nobody acts for you" not in text(gm.get("/app/out-of-office"))  # u-gm is Boris's deputy


def test_a_form_without_the_csrf_token_is_refused(world: World) -> None:
    boris = signed_in(world, "u-mgr")
    csrf_token(boris, "/app/out-of-office")
    refused = boris.post("/app/out-of-office", data=form("u-gm"))
    assert refused.status_code == 400
    assert "Nobody acts for you" in text(boris.get("/app/out-of-office"))


def test_cancel_from_the_page_and_only_ones_own(world: World) -> None:
    boris = signed_in(world, "u-mgr")
    post(boris, "/app/out-of-office", form("u-gm"))
    page = boris.get("/app/out-of-office").get_data(as_text=True)
    action = page.split('action="/app/out-of-office/')[1].split('"')[0]
    other = post(signed_in(world, "u-rep"), f"/app/out-of-office/{action}", follow_redirects=True)
    assert "There is no such delegation." in text(other)
    done = post(boris, f"/app/out-of-office/{action}", follow_redirects=True)
    assert "new steps come to you again" in text(done) and "cancelled" in text(done)
    request_id = world.submit()
    assert "deputy for" not in text(signed_in(world, "u-mgr").get(f"/app/requests/{request_id}"))


@pytest.mark.parametrize(
    ("accept", "words"),
    [
        ("pl-PL,pl;q=0.9", ("Nieobecność", "Ustaw zastępcę", "Do (włącznie)")),
        ("zh-CN,zh", ("外出", "设置代理人")),
    ],
)
def test_the_page_speaks_polish_and_chinese(world: World, accept: str, words: tuple[str, ...]) -> None:
    page = text(signed_in(world, "u-mgr").get("/app/out-of-office", headers={"Accept-Language": accept}))
    assert all(word in page for word in words), page
