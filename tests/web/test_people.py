"""The web app wired to the user directory and the notification outbox: names, sign-in by the
directory's address (inactive people refused), the user's CRM locale, sign-in mail and one-click
links sent by the worker through a real local SMTP server."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from connector.config import Settings
from connector.crm.base import CRMUser
from connector.notify.sender import send_now
from connector.runtime import Runtime
from tests.notify.test_notifications import notify_settings, smtp  # noqa: F401 (the SMTP fixture)
from tests.web.helpers import (
    address,
    path_of,
    post,
    seed_directory,
    sign_in_links,
    signed_in,
    text,
    web_world,
)
from tests.webhooks.test_api import USERS, World


@pytest.fixture
def world(
    tmp_path: Path,
    settings_factory: Callable[..., Settings],
    runtime_factory: Callable[[Settings], Runtime],
    smtp: Any,  # noqa: F811
) -> World:
    def with_smtp(env: dict[str, str] | None = None, **overrides: Any) -> Settings:
        settings = settings_factory(env, **overrides)
        return replace(settings, notify=notify_settings(smtp[1]))

    world = web_world(tmp_path, with_smtp, runtime_factory)
    people = [CRMUser(u, u, email=address(u)) for u in USERS if u != "u-mgr"]
    boris = CRMUser("u-mgr", "Boris Novak", email="boris.novak@example.com", locale="pl_PL")
    seed_directory(
        world.runtime, [*people, boris, CRMUser("u-gone", "Gone Person", address("u-gone"), active=False)]
    )
    return world


def body(message: Any, kind: str = "plain") -> str:
    return message.get_body(preferencelist=(kind,)).get_content()  # type: ignore[no-any-return]


def test_pages_name_people_from_the_directory(world: World) -> None:
    request_id = world.submit()
    shown = text(signed_in(world, "u-rep").get(f"/app/requests/{request_id}"))
    assert "Boris Novak" in shown


def test_the_users_crm_locale_wins_over_the_browser(world: World) -> None:
    world.submit()
    page = signed_in(world, "u-mgr").get("/app/inbox", headers={"Accept-Language": "en-GB,en;q=0.9"})
    assert '<html lang="pl">' in page.get_data(as_text=True)
    page = signed_in(world, "u-fin-1").get("/app/inbox", headers={"Accept-Language": "zh-CN"})
    assert '<html lang="zh-Hans">' in page.get_data(as_text=True)  # no CRM locale: the browser's


def test_the_sign_in_mail_is_sent_by_the_worker_and_signs_in(world: World, smtp: Any) -> None:  # noqa: F811
    inbox, _port = smtp
    client = world.app.test_client()
    answer = post(client, "/app/sign-in", {"email": "Boris.Novak@example.com"})
    assert answer.status_code == 200 and "Check your e-mail" in text(answer)
    assert inbox.messages == []  # the web request only queued it
    assert send_now(world.runtime)["sent"] == 1
    [mail] = inbox.to("Boris Novak <boris.novak@example.com>") or inbox.to("boris.novak@example.com")
    assert mail["Subject"] == "Twój link do logowania w crm-approvals"  # Boris's CRM locale
    [link] = sign_in_links(world.runtime, "boris.novak@example.com")
    assert link in body(mail) and link.replace("&", "&amp;") in body(mail, "html")
    page = client.get(path_of(link))
    assert page.status_code == 200 and "Boris Novak" in text(page)


def test_unknown_and_inactive_addresses_get_no_link(world: World, smtp: Any) -> None:  # noqa: F811
    inbox, _port = smtp
    for email in (address("u-gone"), "stranger@example.com", address("u-mgr")):  # u-mgr's is now Boris's
        answer = post(world.app.test_client(), "/app/sign-in", {"email": email})
        assert answer.status_code == 200 and "Check your e-mail" in text(answer)  # the same answer
    assert sign_in_links(world.runtime) == []
    assert send_now(world.runtime)["sent"] == 0 and inbox.messages == []


def test_a_step_opened_mail_has_one_click_links_to_the_confirmation_page(world: World, smtp: Any) -> None:  # noqa: F811
    inbox, _port = smtp
    world.submit()
    send_now(world.runtime)
    [mail] = [m for m in inbox.messages if "boris.novak@example.com" in m["To"]]
    plain = body(mail)
    approve = next(line.split(": ", 1)[1] for line in plain.splitlines() if "/app/decide?token=" in line)
    page = world.app.test_client().get(path_of(approve.strip()))
    assert page.status_code == 200
    assert "D-1" in text(page)
