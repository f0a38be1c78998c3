"""Who people are, as the web app sees them: the user directory (connector/directory/).

The web session holds a user id without its connection, so lookups without a connection try
each configured connection in turn (ids of different CRMs do not collide in practice).
"""

from __future__ import annotations

from connector.directory import Directory, Person
from connector.runtime import Runtime


def directory(runtime: Runtime) -> Directory:
    return Directory.from_runtime(runtime)


def person(runtime: Runtime, connection: str | None, user_id: str) -> Person | None:
    """The directory's entry for a user id; None when no connection knows it."""
    people = directory(runtime)
    connections = (connection,) if connection else tuple(runtime.settings.connections)
    for name in connections:
        found = people.get(name, user_id)
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
    found = directory(runtime).find_by_email(email)
    return found[0] if found else None
