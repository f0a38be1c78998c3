"""The directory as the approval engine's org chart (``connector.approvals.routing.Org``):
managers, active flags and CRM queue members, read from the cached directory tables.

Reads use the caller's session when given (the worker's event transaction), else one short
session per lookup; the engine asks only for the few people a step names.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from connector.directory.models import DirectoryQueue
from connector.directory.service import canonical_id, find_person


class DirectoryOrg:
    def __init__(
        self, sessions: sessionmaker[Session], connection: str, *, session: Session | None = None
    ) -> None:
        self.sessions = sessions
        self.connection = connection
        self.session = session

    def manager_id(self, user_id: str) -> str | None:
        with self._reading() as s:
            person = find_person(s, self.connection, user_id)
            return person.manager_id if person is not None else None

    def is_active(self, user_id: str) -> bool:
        with self._reading() as s:
            person = find_person(s, self.connection, user_id)
            return person is None or person.active

    def queue_members(self, queue: str) -> tuple[str, ...] | None:
        """Members of the queue with this id, or else with this name (case-insensitive)."""
        wanted = queue.strip()
        with self._reading() as s:
            row = s.get(DirectoryQueue, (self.connection, wanted))
            if row is None:
                rows = s.scalars(select(DirectoryQueue).where(DirectoryQueue.connection == self.connection))
                row = next((r for r in rows if r.name.strip().lower() == wanted.lower()), None)
            if row is None:
                return None
            # HubSpot teams list user ids; records and mapping files use owner ids
            return tuple(dict.fromkeys(canonical_id(s, self.connection, m) for m in row.members))

    def queue_names(self) -> tuple[str, ...]:
        with self._reading() as s:
            rows = s.scalars(
                select(DirectoryQueue.name)
                .where(DirectoryQueue.connection == self.connection)
                .order_by(DirectoryQueue.name)
            )
            return tuple(rows)

    @contextmanager
    def _reading(self) -> Iterator[Session]:
        if self.session is not None:
            yield self.session
            return
        with self.sessions() as own:
            yield own
