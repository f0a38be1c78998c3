"""The user directory: lookups in the cached tables, refreshes from the CRM adapters.

Reads take a short session of their own, or the caller's session (`session=`) when they must
see the caller's transaction (the approval service renders names inside it). A refresh reads
the whole user list from the CRM first, outside any transaction, then replaces the cache in
one transaction, so a CRM failure half-way leaves the last good cache untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from connector.clock import utcnow
from connector.crm.base import CRMAdapter, CRMQueue, CRMUser
from connector.crm.errors import CRMError
from connector.directory.models import DirectoryAlias, DirectoryPerson, DirectoryQueue, DirectoryRefresh
from connector.storage.db import transaction

if TYPE_CHECKING:
    from connector.runtime import Runtime

log = logging.getLogger(__name__)

AdapterLookup = Callable[[str], CRMAdapter]


@dataclass(frozen=True)
class Person:
    connection: str
    id: str
    name: str
    email: str | None = None
    locale: str | None = None  # as the CRM spells it (en_US, zh_CN, pl); None when it says nothing
    manager_id: str | None = None
    active: bool = True


@dataclass(frozen=True)
class RefreshResult:
    connection: str
    ok: bool
    people: int = 0  # listed by the CRM in this refresh
    deactivated: int = 0  # in the cache before, no longer listed: kept, marked inactive
    error: str | None = None
    queues: int | None = None  # queues of approvers read; None when they could not be

    def __str__(self) -> str:
        if not self.ok:
            return f"{self.connection}: directory refresh failed: {self.error}"
        queues = f"; {self.error}" if self.error else (f", {self.queues} queues" if self.queues else "")
        return f"{self.connection}: {self.people} people ({self.deactivated} no longer listed){queues}"


class Directory:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        adapters: AdapterLookup,
        *,
        connections: Iterable[str] = (),
        refresh_minutes: int = 60,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.sessions = sessions
        self.adapters = adapters
        self.connections = tuple(connections)
        self.refresh_every = timedelta(minutes=refresh_minutes)
        self.clock = clock

    @classmethod
    def from_runtime(cls, runtime: Runtime) -> Directory:
        settings = runtime.settings
        return cls(
            runtime.sessions,
            runtime.adapter,
            connections=settings.connections,
            refresh_minutes=settings.directory_refresh_minutes,
        )

    # --- lookups ------------------------------------------------------------------------

    def get(self, connection: str, user_id: str, *, session: Session | None = None) -> Person | None:
        """The person with this id (or another id the CRM uses for them); None when unknown."""
        with self._reading(session) as s:
            return find_person(s, connection, user_id)

    def display_name(self, connection: str, user_id: str, *, session: Session | None = None) -> str:
        """The person's name; the id itself when the directory does not know it."""
        person = self.get(connection, user_id, session=session)
        return person.name if person is not None else user_id

    def canonical_id(self, connection: str, user_id: str, *, session: Session | None = None) -> str:
        """The id records and mapping files use for this person (another CRM id maps to it)."""
        with self._reading(session) as s:
            return canonical_id(s, connection, user_id)

    def find_by_email(self, email: str, *, include_inactive: bool = False) -> list[Person]:
        """Everyone with this e-mail address (case-insensitive), over all connections."""
        wanted = email.strip().lower()
        if not wanted:
            return []
        query = select(DirectoryPerson).where(DirectoryPerson.email_lower == wanted)
        if not include_inactive:
            query = query.where(DirectoryPerson.active.is_(True))
        with self.sessions() as session:
            rows = session.scalars(query.order_by(DirectoryPerson.connection, DirectoryPerson.user_id))
            return [_person(row) for row in rows]

    def manager_of(self, connection: str, user_id: str, *, session: Session | None = None) -> Person | None:
        """The person's manager as the CRM records it; None when there is none or it is unknown."""
        with self._reading(session) as s:
            person = find_person(s, connection, user_id)
            if person is None or person.manager_id is None:
                return None
            return find_person(s, connection, person.manager_id)

    def people(self, connection: str, *, include_inactive: bool = True) -> list[Person]:
        query = select(DirectoryPerson).where(DirectoryPerson.connection == connection)
        if not include_inactive:
            query = query.where(DirectoryPerson.active.is_(True))
        with self.sessions() as session:
            return [_person(row) for row in session.scalars(query.order_by(DirectoryPerson.name))]

    def known_ids(self, connection: str) -> set[str] | None:
        """Every id (and other id) the directory knows for the connection; None before the
        first successful refresh."""
        with self.sessions() as session:
            refresh = session.get(DirectoryRefresh, connection)
            if refresh is None or refresh.refreshed_at is None:
                return None
            ids = set(
                session.scalars(
                    select(DirectoryPerson.user_id).where(DirectoryPerson.connection == connection)
                )
            )
            ids |= set(
                session.scalars(select(DirectoryAlias.alias).where(DirectoryAlias.connection == connection))
            )
            return ids

    def last_refresh(self, connection: str) -> DirectoryRefresh | None:
        with self.sessions() as session:
            return session.get(DirectoryRefresh, connection)

    # --- refreshing ---------------------------------------------------------------------

    def refresh(self, connection: str) -> RefreshResult:
        """Read the connection's users from the CRM now and replace the cache with them."""
        now = self.clock()
        adapter = self.adapters(connection)
        try:
            users = list(adapter.list_users())
        except CRMError as exc:
            self._record_failure(connection, now, str(exc))
            return RefreshResult(connection, ok=False, error=str(exc))
        queues: list[CRMQueue] | None
        queue_error = None
        try:  # queues of approvers; without them (e.g. a missing scope) the people still refresh
            queues = adapter.list_queues()
        except CRMError as exc:
            queues, queue_error = None, str(exc)
            log.warning("directory %s: cannot read queues, keeping the cached ones: %s", connection, exc)
        with transaction(self.sessions) as session:
            deactivated = store_users(session, connection, users, now)
            if queues is not None:
                store_queues(session, connection, queues, now)
        log.info("directory %s: %d people read from the CRM", connection, len(users))
        return RefreshResult(
            connection,
            ok=True,
            people=len(users),
            deactivated=deactivated,
            queues=None if queues is None else len(queues),
            error=queue_error and f"queues not read: {queue_error}",
        )

    def ensure_loaded(self, connection: str) -> RefreshResult | None:
        """Refresh a connection that was never read; None when it already was."""
        if self.last_refresh(connection) is not None:
            return None
        return self.refresh(connection)

    def refresh_due(self) -> list[str]:
        """The sweep job: refresh each configured connection whose last attempt is older than
        DIRECTORY_REFRESH_MINUTES. One failing connection does not stop the others."""
        now = self.clock()
        results = []
        for connection in self.connections:
            last = self.last_refresh(connection)
            if last is not None and now - last.attempted_at < self.refresh_every:
                continue
            try:
                results.append(str(self.refresh(connection)))
            except Exception as exc:  # e.g. missing credentials: say so, keep the others going
                log.warning("directory %s: cannot refresh: %s", connection, exc)
                self._record_failure(connection, now, str(exc))
                results.append(f"{connection}: directory refresh failed: {exc}")
        return results

    def _record_failure(self, connection: str, now: datetime, error: str) -> None:
        log.warning("directory %s: refresh failed, keeping the cached people: %s", connection, error)
        with transaction(self.sessions) as session:
            row = session.get(DirectoryRefresh, connection)
            if row is None:
                session.add(
                    DirectoryRefresh(connection=connection, attempted_at=now, people=0, last_error=error)
                )
            else:
                row.attempted_at, row.last_error = now, error[:2000]

    @contextmanager
    def _reading(self, session: Session | None) -> Iterator[Session]:
        if session is not None:
            yield session
            return
        with self.sessions() as own:
            yield own


# --- session-level operations ---------------------------------------------------------------


_LOOKUPS = "directory_lookups"  # Session.info: (transaction, answers) while a batch of events is applied


def remember_lookups(session: Session) -> None:
    """Answer the same look-up once per transaction (`find_person`, `canonical_id`): for a
    worker's batch of events, which reads the directory for every event and never writes it.
    Someone unknown to the directory is otherwise a select per look-up."""
    session.info[_LOOKUPS] = (session.get_transaction(), {})


def _lookups(session: Session) -> dict[tuple[str, str, str], Any] | None:
    remembered = session.info.get(_LOOKUPS)
    if remembered is None:
        return None
    if remembered[0] is not session.get_transaction():
        session.info.pop(_LOOKUPS, None)  # from a transaction that has ended
        return None
    answers: dict[tuple[str, str, str], Any] = remembered[1]
    return answers


def find_person(session: Session, connection: str, user_id: str) -> Person | None:
    key = str(user_id).strip()
    answers = _lookups(session)
    if answers is not None and ("person", connection, key) in answers:
        found: Person | None = answers["person", connection, key]
        return found
    row = session.get(DirectoryPerson, (connection, key))
    if row is None:
        alias = session.get(DirectoryAlias, (connection, key))
        row = session.get(DirectoryPerson, (connection, alias.user_id)) if alias is not None else None
    person = _person(row) if row is not None else None
    if answers is not None:
        answers["person", connection, key] = person
    return person


def canonical_id(session: Session, connection: str, user_id: str) -> str:
    """The id records and mapping files use for this person (an alias maps to it)."""
    key = str(user_id).strip()
    answers = _lookups(session)
    if answers is not None and ("alias", connection, key) in answers:
        target: str | None = answers["alias", connection, key]
    else:
        alias = session.get(DirectoryAlias, (connection, key))
        target = alias.user_id if alias is not None else None
        if answers is not None:
            answers["alias", connection, key] = target
    return target if target is not None else user_id


def store_users(session: Session, connection: str, users: list[CRMUser], now: datetime) -> int:
    """Upsert the listed users, mark the unlisted ones inactive, replace the aliases.
    Returns how many people were deactivated because the CRM no longer lists them."""
    existing = {
        row.user_id: row
        for row in session.scalars(select(DirectoryPerson).where(DirectoryPerson.connection == connection))
    }
    listed: set[str] = set()
    session.execute(delete(DirectoryAlias).where(DirectoryAlias.connection == connection))
    aliases: dict[str, str] = {}
    for user in users:
        listed.add(user.id)
        values = {
            "name": user.name[:300],
            "email": user.email,
            "email_lower": user.email.strip().lower() if user.email else None,
            "locale": user.locale,
            "manager_id": user.manager_id,
            "active": user.active,
            "refreshed_at": now,
        }
        row = existing.get(user.id)
        if row is None:
            session.add(DirectoryPerson(connection=connection, user_id=user.id, **values))
        else:
            for key, value in values.items():
                setattr(row, key, value)
        for alias in user.other_ids:
            if alias != user.id:
                aliases[alias] = user.id
    session.add_all(DirectoryAlias(connection=connection, alias=a, user_id=u) for a, u in aliases.items())
    gone = [user_id for user_id, row in existing.items() if user_id not in listed and row.active]
    if gone:
        session.execute(
            update(DirectoryPerson)
            .where(DirectoryPerson.connection == connection, DirectoryPerson.user_id.in_(gone))
            .values(active=False, refreshed_at=now)
        )
    refresh = session.get(DirectoryRefresh, connection)
    if refresh is None:
        session.add(
            DirectoryRefresh(connection=connection, attempted_at=now, refreshed_at=now, people=len(listed))
        )
    else:
        refresh.attempted_at = refresh.refreshed_at = now
        refresh.people, refresh.last_error = len(listed), None
    return len(gone)


def store_queues(session: Session, connection: str, queues: list[CRMQueue], now: datetime) -> None:
    """Replace the connection's queues with the ones the CRM listed now."""
    session.execute(delete(DirectoryQueue).where(DirectoryQueue.connection == connection))
    session.flush()
    session.add_all(
        DirectoryQueue(
            connection=connection,
            queue_id=q.id,
            name=q.name[:300],
            members=list(dict.fromkeys(q.members)),
            refreshed_at=now,
        )
        for q in queues
    )


def _person(row: DirectoryPerson) -> Person:
    return Person(
        connection=row.connection,
        id=row.user_id,
        name=row.name,
        email=row.email,
        locale=row.locale,
        manager_id=row.manager_id,
        active=row.active,
    )
