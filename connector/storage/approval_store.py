"""Persistence of approval requests: lifecycle dataclasses <-> rows, one to one.

Concurrency: every change to a request is `UPDATE ... WHERE version = <seen>`; a second
writer that saw the same version gets StaleRequestError (a 409), and the unique vote and
active-request keys make a double vote or a second active request fail in the database too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Row, select, update
from sqlalchemy.orm import Session

from connector.approvals.errors import ConflictError
from connector.approvals.lifecycle import (
    ACTIVE_STATUSES,
    ApprovalRequest,
    Outcome,
    StepState,
    Transition,
    Vote,
)
from connector.errors import RetriableError
from connector.storage import assignments, batch_writes
from connector.storage.db import in_keys
from connector.storage.models import (
    ApprovalRequestRow,
    ApprovalStepRow,
    ApprovalTransitionRow,
    ApprovalVoteRow,
)

T = TypeVar("T")


class StaleRequestError(ConflictError, RetriableError):
    """Someone changed the request between our read and our write; a retry reads it afresh."""

    code = "stale_request"


@dataclass(frozen=True)
class RecordKey:
    connection: str
    object_type: str
    record_id: str

    @property
    def ref(self) -> str:
        return f"{self.connection}:{self.object_type}:{self.record_id}"


@dataclass(frozen=True)
class StoredRequest:
    """A request with where it came from: the record and the mapping file that matched."""

    request: ApprovalRequest
    record: RecordKey
    mapping_path: str
    mapping_hash: str
    superseded_by: str | None = None


def active_key(record: RecordKey, rule_name: str) -> str:
    return f"{record.ref}:{rule_name}"


def load(session: Session, request_id: str) -> StoredRequest | None:
    row = session.get(ApprovalRequestRow, request_id)
    return load_rows(session, [row])[0] if row is not None else None


def find_active(session: Session, record: RecordKey, rule_name: str) -> StoredRequest | None:
    if _known_absent(session, record, rule_name, active=True):
        return None
    row = session.scalar(
        select(ApprovalRequestRow).where(ApprovalRequestRow.active_key == active_key(record, rule_name))
    )
    return load_rows(session, [row])[0] if row is not None else None


def find_latest(session: Session, record: RecordKey, rule_name: str) -> StoredRequest | None:
    if _known_absent(session, record, rule_name, active=False):
        return None
    row = session.scalar(
        select(ApprovalRequestRow)
        .where(ApprovalRequestRow.connection == record.connection)
        .where(ApprovalRequestRow.object_type == record.object_type)
        .where(ApprovalRequestRow.record_id == record.record_id)
        .where(ApprovalRequestRow.rule_name == rule_name)
        .order_by(ApprovalRequestRow.submitted_at.desc())
        .limit(1)
    )
    return load_rows(session, [row])[0] if row is not None else None


def ids_due_for_expiry(session: Session, now: datetime) -> list[str]:
    return list(
        session.scalars(
            select(ApprovalRequestRow.id)
            .where(ApprovalRequestRow.status == "approved")
            .where(ApprovalRequestRow.expires_at <= now)
            .where(ApprovalRequestRow.superseded_by.is_(None))
            .order_by(ApprovalRequestRow.expires_at)
        )
    )


def approved_expiring(session: Session, after: datetime, until: datetime) -> list[ApprovalRequestRow]:
    """Approvals still in force that expire in (after, until], soonest first (`sync expiring`)."""
    return list(
        session.scalars(
            select(ApprovalRequestRow)
            .where(ApprovalRequestRow.status == "approved")
            .where(ApprovalRequestRow.expires_at > after, ApprovalRequestRow.expires_at <= until)
            .where(ApprovalRequestRow.superseded_by.is_(None))
            .order_by(ApprovalRequestRow.expires_at, ApprovalRequestRow.id)
        )
    )


def save(session: Session, stored: StoredRequest, outcome: Outcome, seen_version: int | None) -> None:
    """Insert a new request (seen_version None) or apply an outcome to the version we read."""
    request = outcome.request
    values = _request_values(stored, request)
    _forget_known(session, stored.record)
    if seen_version is None:
        if batch_writes.add(session, ApprovalRequestRow.__table__, [{"id": request.id, **values}]):
            # a batch is buffering (connector/storage/batch_writes.py): a new request's rows
            # are written with the other events' in one INSERT per table
            tables = (ApprovalStepRow, ApprovalVoteRow, ApprovalTransitionRow)
            for table, items in zip(tables, (outcome.steps, outcome.votes, outcome.transitions), strict=True):
                batch_writes.add(session, table.__table__, [_as_row(item) for item in items])
            assignments.record(session, outcome, request.submitted_at)
            return
        session.add(ApprovalRequestRow(id=request.id, **values))
        session.flush()
    else:
        result = session.execute(
            update(ApprovalRequestRow)
            .where(ApprovalRequestRow.id == request.id, ApprovalRequestRow.version == seen_version)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            raise StaleRequestError(
                "the request changed while you were looking at it; reload it and try again"
            )
    _save_children(session, outcome.steps, outcome.votes, outcome.transitions)
    assignments.record(session, outcome, request.submitted_at)


# --- a batch's look-ups of records that have no request yet ---------------------------------

_ABSENT = "approval_store_absent"  # Session.info: record key -> (rules with any request, with an active one)


def preload_absent(session: Session, records: Iterable[RecordKey]) -> None:
    """Learn in one select which rules of these records have requests (and active ones), so
    `find_active` and `find_latest` answer "none" for the others without a select each; a
    request saved for a record sends its later look-ups to the database."""
    keys = {(r.connection, r.object_type, r.record_id) for r in records}
    if not keys:
        return
    R = ApprovalRequestRow.__table__.c
    known: dict[tuple[str, str, str], tuple[set[str], set[str]]] = {key: (set(), set()) for key in keys}
    dialect = session.get_bind().dialect.name
    query = select(R.connection, R.object_type, R.record_id, R.rule_name, R.active_key).where(
        in_keys((R.connection, R.object_type, R.record_id), keys, dialect)
    )
    for row in session.execute(query):
        rules, active = known[(row.connection, row.object_type, row.record_id)]
        rules.add(row.rule_name)
        if row.active_key is not None:
            active.add(row.rule_name)
    session.info[_ABSENT] = (session.get_transaction(), known)


def _known_absent(session: Session, record: RecordKey, rule_name: str, *, active: bool) -> bool:
    preloaded = session.info.get(_ABSENT)
    if preloaded is None:
        return False
    transaction, known = preloaded
    if transaction is not session.get_transaction():  # read in a transaction that has ended
        session.info.pop(_ABSENT, None)
        return False
    found = known.get((record.connection, record.object_type, record.record_id))
    if found is None:
        return False
    rules, active_rules = found
    return rule_name not in (active_rules if active else rules)


def _forget_known(session: Session, record: RecordKey) -> None:
    preloaded = session.info.get(_ABSENT)
    if preloaded is not None:
        preloaded[1].pop((record.connection, record.object_type, record.record_id), None)


def supersede(session: Session, old_id: str, new_id: str) -> None:
    """A newer request replaces an approved one: the old one must never expire over it."""
    session.execute(
        update(ApprovalRequestRow).where(ApprovalRequestRow.id == old_id).values(superseded_by=new_id)
    )


def _request_values(stored: StoredRequest, request: ApprovalRequest) -> dict[str, object]:
    return {
        "connection": stored.record.connection,
        "object_type": stored.record.object_type,
        "record_id": stored.record.record_id,
        "rule_name": request.rule_name,
        "mapping_path": stored.mapping_path,
        "mapping_hash": stored.mapping_hash,
        "submitter": request.submitter,
        "status": request.status,
        "current_step": request.current_step,
        "record": request.record,
        "record_previous": request.record_previous,
        "changed_fields": list(request.changed_fields),
        "submitted_at": request.submitted_at,
        "updated_at": request.updated_at,
        "approved_at": request.approved_at,
        "expires_at": request.expires_at,
        "closed_at": request.closed_at,
        "expired_at": request.expired_at,
        "version": request.version,
        "active_key": active_key(stored.record, request.rule_name)
        if request.status in ACTIVE_STATUSES
        else None,
    }


def _save_children(
    session: Session, steps: Sequence[StepState], votes: Sequence[Vote], transitions: Sequence[Transition]
) -> None:
    for step in steps:
        session.merge(ApprovalStepRow(**_as_row(step)))
    session.add_all([ApprovalVoteRow(**_as_row(v)) for v in votes])
    session.add_all([ApprovalTransitionRow(**_as_row(t)) for t in transitions])
    session.flush()


def transition_values(transition: Transition) -> dict[str, Any]:
    """A history row's column values (for bulk inserts)."""
    return _as_row(transition)


def _as_row(item: Any) -> dict[str, Any]:
    """A lifecycle dataclass as column values: the names are the same by design."""
    return {name: _jsonable(getattr(item, name)) for name in field_names(type(item))}


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def field_names(cls: type) -> tuple[str, ...]:
    """A dataclass's field names, in order: `dataclasses.fields` builds them anew on every
    call (a tuple of every field, filtered), which was a tenth of `save`'s time; a class's
    fields do not change."""
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in fields(cls))
    return names


def _from_row(cls: type[T], row: Any) -> T:
    """A lifecycle dataclass from a row (the names are the same): a Core Row or a column
    mapping is read by key (`row.index` would be tuple.index, not the column), an ORM row by
    attribute."""
    values: Mapping[Any, Any]
    if isinstance(row, Row):
        values = row._mapping
    elif isinstance(row, Mapping):
        values = row
    else:
        values = {name: getattr(row, name) for name in field_names(cls)}
    return cls(**{name: _from_json(values[name]) for name in field_names(cls)})


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _from_json(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def load_rows(session: Session, rows: Sequence[Any], *, history: bool = True) -> list[StoredRequest]:
    """The requests of these rows (ORM rows or Core rows of approval_requests), in the same
    order; their children in one query per table, read as plain rows (no ORM objects: a page
    of 50 requests is hundreds of children). `history=False` leaves the transitions out,
    for lists that show none."""
    ids = [row.id for row in rows]
    if not ids:
        return []
    S, V, T = ApprovalStepRow.__table__.c, ApprovalVoteRow.__table__.c, ApprovalTransitionRow.__table__.c
    steps = _by_request(
        session.execute(select(*S).where(S.request_id.in_(ids)).order_by(S.entered_at, S.index, S.round))
    )
    votes = _by_request(session.execute(select(*V).where(V.request_id.in_(ids)).order_by(V.id)))
    transitions = (
        _by_request(session.execute(select(*T).where(T.request_id.in_(ids)).order_by(T.seq)))
        if history
        else {}
    )
    return [
        _stored(row, steps.get(row.id, []), votes.get(row.id, []), transitions.get(row.id, []))
        for row in rows
    ]


def load_many(session: Session, ids: Sequence[str]) -> list[StoredRequest]:
    """The requests with these ids (those that exist), read as plain rows rather than ORM
    objects: for sweeps over many requests (step timers), where the ORM's bookkeeping costs
    more than the reading."""
    if not ids:
        return []
    requests = ApprovalRequestRow.__table__
    return load_rows(session, session.execute(select(requests).where(requests.c.id.in_(ids))).all())


def _by_request(rows: Iterable[Any]) -> dict[str, list[Any]]:
    grouped: dict[str, list[Any]] = {}
    for row in rows:
        values = row._mapping  # by name: a Row's own .index and .count would shadow columns
        grouped.setdefault(values["request_id"], []).append(values)
    return grouped


def _stored(
    row: Any, steps: Sequence[Any], votes: Sequence[Any], transitions: Sequence[Any]
) -> StoredRequest:
    request = ApprovalRequest(
        id=row.id,
        rule_name=row.rule_name,
        record_ref=RecordKey(row.connection, row.object_type, row.record_id).ref,
        submitter=row.submitter,
        status=row.status,
        current_step=row.current_step,
        record=dict(row.record),
        record_previous=dict(row.record_previous) if row.record_previous is not None else None,
        changed_fields=tuple(row.changed_fields),
        submitted_at=row.submitted_at,
        updated_at=row.updated_at,
        approved_at=row.approved_at,
        expires_at=row.expires_at,
        closed_at=row.closed_at,
        expired_at=row.expired_at,
        version=row.version,
        steps=[_from_row(StepState, r) for r in steps],
        votes=[_from_row(Vote, r) for r in votes],
        transitions=[_from_row(Transition, r) for r in transitions],
    )
    record = RecordKey(row.connection, row.object_type, row.record_id)
    return StoredRequest(request, record, row.mapping_path, row.mapping_hash, row.superseded_by)
