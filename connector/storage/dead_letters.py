"""The dead-letter table: work that cannot succeed without a person.

Rows are created here only (`add`), by the outbox (a write-back the CRM refused: `kind`
"outbox", `ref_id` the outbox row) and the inbox (an event that cannot be processed:
`kind` "inbox", `ref_id` the inbox event). Each new one is logged at WARNING with the
CRM's own message and counted in the metrics, once its transaction has committed. What
ops do with them (list, retry, discard) is connector/service/dead_letters.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from connector.logs import log_event
from connector.metrics import DEAD_LETTERS
from connector.storage.db import after_commit
from connector.storage.models import DeadLetter

log = logging.getLogger(__name__)
KINDS = ("outbox", "inbox")
STATES = ("open", "resolved", "all")


def add(session: Session, letter: DeadLetter) -> DeadLetter:
    """Add a dead letter in the caller's transaction; it is logged and counted after commit."""
    session.add(letter)
    session.flush()
    after_commit(session, lambda: _report(letter))
    return letter


def _report(letter: DeadLetter) -> None:
    DEAD_LETTERS.labels(letter.kind, letter.connection).inc()
    what = "write-back refused" if letter.kind == "outbox" else "event cannot be processed"
    code = f"{letter.error_code}: " if letter.error_code else ""
    log_event(
        log,
        logging.WARNING,
        "dead_letter",
        "dead letter %s (%s) for %s:%s:%s: %s%s; see `crm-approvals dead-letters show %s`",
        letter.id,
        what,
        letter.connection,
        letter.object_type,
        letter.record_id,
        code,
        letter.error_message,
        letter.id,
        dead_letter_id=letter.id,
        kind=letter.kind,
        record=f"{letter.connection}:{letter.object_type}:{letter.record_id}",
        code=letter.error_code,
        crm_message=letter.error_message,
        fields=list(letter.error_fields or ()),
    )


@dataclass(frozen=True)
class DeadLetterFilter:
    """Which dead letters: every given criterion must hold. Ages are measured from `now`."""

    ids: tuple[int, ...] = ()
    kind: str | None = None
    connection: str | None = None
    object_type: str | None = None  # case-insensitive
    code: str | None = None  # the CRM's error code, case-insensitive
    older_than: timedelta | None = None
    newer_than: timedelta | None = None
    state: str = "open"  # open | resolved | all

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise ValueError(f"state must be one of {', '.join(STATES)}, got {self.state!r}")
        if self.kind is not None and self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")

    @property
    def narrows(self) -> bool:
        """Whether anything beyond the state was given (retrying "everything" needs saying so)."""
        return any(
            value not in (None, ())
            for value in (
                self.ids,
                self.kind,
                self.connection,
                self.object_type,
                self.code,
                self.older_than,
                self.newer_than,
            )
        )

    def select(self, now: datetime) -> Select[DeadLetter]:
        query = select(DeadLetter)
        if self.ids:
            query = query.where(DeadLetter.id.in_(self.ids))
        if self.kind is not None:
            query = query.where(DeadLetter.kind == self.kind)
        if self.connection is not None:
            query = query.where(DeadLetter.connection == self.connection)
        if self.object_type is not None:
            query = query.where(func.lower(DeadLetter.object_type) == self.object_type.lower())
        if self.code is not None:
            query = query.where(func.lower(DeadLetter.error_code) == self.code.lower())
        if self.older_than is not None:
            query = query.where(DeadLetter.created_at <= now - self.older_than)
        if self.newer_than is not None:
            query = query.where(DeadLetter.created_at >= now - self.newer_than)
        if self.state == "open":
            query = query.where(DeadLetter.resolved_at.is_(None))
        elif self.state == "resolved":
            query = query.where(DeadLetter.resolved_at.is_not(None))
        return query


def open_summary(session: Session) -> tuple[int, datetime | None]:
    """How many dead letters are unresolved, and when the oldest of them was created."""
    count, oldest = session.execute(
        select(func.count(), func.min(DeadLetter.created_at)).where(DeadLetter.resolved_at.is_(None))
    ).one()
    return int(count or 0), oldest  # min() keeps the column's type: an aware UTC datetime
