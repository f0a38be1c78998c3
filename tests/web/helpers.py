"""Shared by the web app's tests: a world with the approvals API's mapping, signed-in clients."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flask.testing import FlaskClient
from sqlalchemy import select

from connector.clock import utcnow
from connector.config import Settings
from connector.crm.base import CRMUser
from connector.directory.service import store_users
from connector.notify.models import Notification
from connector.runtime import Runtime
from connector.storage.db import transaction
from connector.web import people
from tests.webhooks.test_api import USERS, World, build_world

SECRET = "test-secret-key-of-enough-length-0123456789"
ADMIN = "u-admin"
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def web_world(
    tmp_path: Path,
    settings_factory: Callable[..., Settings],
    runtime_factory: Callable[[Settings], Runtime],
    **overrides: Any,
) -> World:
    overrides = {"secret_key": SECRET, "admin_users": (ADMIN,), **overrides}
    world = build_world(tmp_path, settings_factory, runtime_factory, **overrides)
    # The sandbox's directory as the worker would have read it: the engine's users by their ids
    # (so pages the older tests read still name them so), at addresses they sign in with.
    seed_directory(world.runtime, [CRMUser(u, u, email=address(u)) for u in (*USERS, ADMIN, "u-nobody")])
    return world


def address(user_id: str) -> str:
    return f"{user_id}@example.com"


def seed_directory(runtime: Runtime, users: list[CRMUser], connection: str = "sandbox") -> None:
    with transaction(runtime.sessions) as session:
        store_users(session, connection, users, utcnow())


def csrf_token(client: FlaskClient, page: str = "/app/sign-in") -> str:
    html = client.get(page).get_data(as_text=True)
    match = _CSRF.search(html)
    assert match, html
    return match.group(1)


def signed_in(world: World, user_id: str) -> FlaskClient:
    """A client whose session says `user_id` (the sign-in flow itself is tested in test_sign_in)."""
    client = world.app.test_client()
    with client.session_transaction() as session:
        session["uid"] = user_id
    return client


def post(client: FlaskClient, path: str, data: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    """A form POST with the CSRF token of the client's session."""
    return client.post(path, data={"csrf_token": csrf_token(client), **(data or {})}, **kwargs)


def email_of(world: World, user_id: str) -> str:
    return email_of_user(world.runtime, user_id)


def email_of_user(runtime: Runtime, user_id: str) -> str:
    """The address the directory has for a user: what they type to sign in."""
    person = people.person(runtime, None, user_id)
    assert person is not None and person.email, f"{user_id} is not in the directory"
    return person.email


def sign_in_links(runtime: Runtime, email: str | None = None) -> list[str]:
    """Sign-in links queued for the worker to e-mail so far (newest last)."""
    with runtime.sessions() as session:
        query = select(Notification).where(Notification.template == "sign_in").order_by(Notification.id)
        if email is not None:
            person = people.find_by_email(runtime, email)
            if person is None:
                return []
            query = query.where(Notification.user_id == person.id)
        return [row.context["links"]["sign_in"] for row in session.scalars(query)]


def path_of(link: str) -> str:
    """A link as the test client requests it (no scheme and host)."""
    return "/" + link.split("/", 3)[3]


def text(response: Any) -> str:
    """The visible text of a page, whitespace collapsed (for assertions on what people read)."""
    html = response.get_data(as_text=True)
    html = re.sub(r"<(script|style)\b.*?</\1>", " ", html, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html)).strip()
