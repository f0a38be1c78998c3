"""Who people are, as the web app sees them: the user directory (connector/directory/).

The web session holds a user id without its connection, so lookups without a connection try
each configured connection in turn (ids of different CRMs do not collide in practice).

A request reads the directory once, before any page opens its own session (`prime`, called
by the blueprint before each request): on SQLite every session takes the write lock, so a
lookup from inside a page's session would wait on itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flask import g, has_request_context
from sqlalchemy import select

from connector.directory import Directory, Person
from connector.directory.models import DirectoryAlias, DirectoryPerson
from connector.directory.service import _person
from connector.runtime import Runtime


@dataclass(frozen=True)
class Snapshot:
    """The directory as one request sees it."""

    people: dict[tuple[str, str], Person] = field(default_factory=dict)
    aliases: dict[tuple[str, str], str] = field(default_factory=dict)  # (connection, other id) -> id

    def get(self, connection: str, user_id: str) -> Person | None:
        key = (connection, user_id.strip())
        return self.people.get(key) or self.people.get((connection, self.aliases.get(key, "")))


def prime(runtime: Runtime) -> Snapshot:
    """Read the directory for this request (once)."""
    if has_request_context() and "people" in g:
        return g.people
    with runtime.sessions() as session:
        snapshot = Snapshot(
            {(row.connection, row.user_id): _person(row) for row in session.scalars(select(DirectoryPerson))},
            {(row.connection, row.alias): row.user_id for row in session.scalars(select(DirectoryAlias))},
        )
    if has_request_context():
        g.people = snapshot
    return snapshot


def person(runtime: Runtime, connection: str | None, user_id: str) -> Person | None:
    """The directory's entry for a user id; None when no connection knows it."""
    snapshot = prime(runtime)
    connections = (connection,) if connection else tuple(runtime.settings.connections)
    for name in connections:
        found = snapshot.get(name, user_id)
        if found is not None:
            return found
    return None


def display_name(runtime: Runtime, connection: str | None, user_id: str) -> str:
    """How to name a user on a page: the directory's name, the id when it does not know them."""
    found = person(runtime, connection, user_id)
    return found.name if found is not None else user_id


def locale_of(runtime: Runtime, user_id: str) -> str | None:
    """The user's own locale, when the CRM says; the browser's language is used otherwise."""
    found = person(runtime, None, user_id)
    return found.locale if found is not None else None


def find_by_email(runtime: Runtime, email: str) -> Person | None:
    """The active user with this address, or None (unknown, or inactive in the CRM)."""
    found = Directory.from_runtime(runtime).find_by_email(email)
    return found[0] if found else None
