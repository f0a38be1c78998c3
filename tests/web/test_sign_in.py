"""Signing in with a magic link: signed, short-lived, single use; sessions and CSRF."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from flask.testing import FlaskClient
from itsdangerous import TimestampSigner

from connector.config import Settings
from connector.runtime import Runtime
from tests.web.helpers import (
    csrf_token,
    email_of,
    path_of,
    post,
    sign_in_links,
    text,
    web_world,
)
from tests.webhooks.test_api import World


@pytest.fixture
def world(
    tmp_path: Path, settings_factory: Callable[..., Settings], runtime_factory: Callable[[Settings], Runtime]
) -> World:
    return web_world(tmp_path, settings_factory, runtime_factory)


def ask_for_link(world: World, email: str, next_page: str | None = None) -> str:
    client = world.app.test_client()
    data = {"email": email} if next_page is None else {"email": email, "next": next_page}
    answer = post(client, "/app/sign-in", data)
    assert answer.status_code == 200 and "Check your e-mail" in text(answer)
    return sign_in_links(world.runtime, email)[-1]


def use_link(client: FlaskClient, link: str) -> Any:
    page = client.get(path_of(link))
    assert page.status_code == 200, text(page)
    token = link.split("token=", 1)[1].split("&", 1)[0]
    next_page = link.split("next=", 1)[1] if "next=" in link else ""
    from urllib.parse import unquote

    return client.post(
        "/app/sign-in/link",
        data={
            "csrf_token": csrf_token(client, path_of(link)),
            "token": unquote(token),
            "next": unquote(next_page),
        },
    )


def test_root_and_app_send_strangers_to_sign_in(world: World) -> None:
    client = world.app.test_client()
    assert client.get("/").headers["Location"].endswith("/app/")
    answer = client.get("/app/inbox")
    assert answer.status_code == 302 and "/app/sign-in?next=/app/inbox" in answer.headers["Location"]
    page = client.get("/app/sign-in")
    assert page.status_code == 200 and '<label for="email">' in page.get_data(as_text=True)


def test_magic_link_signs_in_once(world: World) -> None:
    world.submit()  # u-mgr becomes a known approver
    link = ask_for_link(world, email_of(world, "u-mgr"))
    assert link.startswith(f"{world.runtime.settings.public_base_url}/app/sign-in/link?token=")
    client = world.app.test_client()
    # Opening the link only shows a button: a mail scanner that follows it signs nobody in.
    opened = client.get(path_of(link))
    assert opened.status_code == 200 and "Sign in as u-mgr" in text(opened)
    assert client.get("/app/inbox").status_code == 302
    answer = use_link(client, link)
    assert answer.status_code == 303 and answer.headers["Location"].endswith("/app/")
    inbox = client.get("/app/inbox")
    assert inbox.status_code == 200 and "D-1" in text(inbox)
    # The same link again, in another browser: refused.
    other = world.app.test_client()
    assert other.get(path_of(link)).status_code == 400
    again = other.post(
        "/app/sign-in/link", data={"csrf_token": csrf_token(other), "token": link.split("token=")[1]}
    )
    assert again.status_code == 400 and "already been used" in text(again)
    assert other.get("/app/inbox").status_code == 302


def test_unknown_address_gets_the_same_answer_and_no_link(world: World) -> None:
    client = world.app.test_client()
    answer = post(client, "/app/sign-in", {"email": "stranger@example.com"})
    assert answer.status_code == 200 and "Check your e-mail" in text(answer)
    answer = post(client, "/app/sign-in", {"email": "u-mgr@elsewhere.example"})
    assert answer.status_code == 200
    assert sign_in_links(world.runtime) == []


def test_malformed_address_is_explained(world: World) -> None:
    answer = post(world.app.test_client(), "/app/sign-in", {"email": "not an address"})
    assert answer.status_code == 400 and "e-mail address you use at work" in text(answer)


def test_expired_link_is_refused(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    world.submit()
    link = ask_for_link(world, email_of(world, "u-mgr"))
    later = int(time.time()) + 16 * 60  # SIGN_IN_LINK_MINUTES defaults to 15
    monkeypatch.setattr(TimestampSigner, "get_timestamp", lambda self: later)
    client = world.app.test_client()
    opened = client.get(path_of(link))
    assert opened.status_code == 400 and "expired" in text(opened)


def test_tampered_link_is_refused(world: World) -> None:
    world.submit()
    link = ask_for_link(world, email_of(world, "u-mgr"))
    token = link.split("token=")[1]
    forged = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    client = world.app.test_client()
    assert "not valid" in text(client.get(f"/app/sign-in/link?token={forged}"))
    answer = client.post("/app/sign-in/link", data={"csrf_token": csrf_token(client), "token": forged})
    assert answer.status_code == 400 and client.get("/app/inbox").status_code == 302


def test_link_returns_to_the_page_asked_for_but_never_elsewhere(world: World) -> None:
    request_id = world.submit()
    page = f"/app/requests/{request_id}"
    link = ask_for_link(world, email_of(world, "u-mgr"), page)
    answer = use_link(world.app.test_client(), link)
    assert answer.headers["Location"].endswith(page)
    for evil in ("https://evil.example/app/", "//evil.example/app/", "/api/v1/me", "/app/\\evil"):
        link = ask_for_link(world, email_of(world, "u-mgr"), evil)
        answer = use_link(world.app.test_client(), link)
        assert answer.headers["Location"].endswith("/app/"), evil


def test_forms_without_the_csrf_token_are_refused(world: World) -> None:
    world.submit()
    client = world.app.test_client()
    answer = client.post("/app/sign-in", data={"email": email_of(world, "u-mgr")})
    assert answer.status_code == 400 and "This form has expired" in text(answer)
    assert sign_in_links(world.runtime) == []
    wrong = client.post("/app/sign-in", data={"email": email_of(world, "u-mgr"), "csrf_token": "forged"})
    assert wrong.status_code == 400


def test_sign_out_ends_the_session(world: World) -> None:
    world.submit()
    client = world.app.test_client()
    use_link(client, ask_for_link(world, email_of(world, "u-mgr")))
    assert client.get("/app/inbox").status_code == 200
    answer = client.post("/app/sign-out", data={"csrf_token": csrf_token(client, "/app/inbox")})
    assert answer.status_code == 303
    assert client.get("/app/inbox").status_code == 302


def test_session_cookie_is_http_only_and_lax(world: World) -> None:
    world.submit()
    client = world.app.test_client()
    answer = use_link(client, ask_for_link(world, email_of(world, "u-mgr")))
    cookie = answer.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Secure" not in cookie  # http base URL


def test_https_base_url_makes_the_cookie_secure(
    tmp_path: Path, settings_factory: Callable[..., Settings], runtime_factory: Callable[[Settings], Runtime]
) -> None:
    world = web_world(
        tmp_path, settings_factory, runtime_factory, public_base_url="https://approvals.example"
    )
    assert world.app.config["SESSION_COOKIE_SECURE"] is True


def test_without_secret_key_the_app_says_how_to_set_it_up(
    tmp_path: Path, settings_factory: Callable[..., Settings], runtime_factory: Callable[[Settings], Runtime]
) -> None:
    world = web_world(tmp_path, settings_factory, runtime_factory, secret_key="")
    answer = world.app.test_client().get("/app/sign-in")
    assert answer.status_code == 503
    assert "SECRET_KEY is not set" in text(answer) and "crm-approvals init" in text(answer)
    # The webhooks and the API do not need it.
    assert world.get("u-mgr", "/me").status_code == 200


def test_unknown_pages_answer_an_html_404(world: World) -> None:
    answer = world.app.test_client().get("/app/no/such/page")
    assert answer.status_code == 404 and answer.mimetype == "text/html"
    assert "Not found" in text(answer)


def test_quoted_next_parameter_is_kept(world: World) -> None:
    answer = world.app.test_client().get("/app/sign-in?next=" + quote("/app/mine"))
    assert 'name="next" value="/app/mine"' in answer.get_data(as_text=True)
