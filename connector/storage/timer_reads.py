"""What the step-timer sweep reads to decide: each request's open step only.

`approval_store.load_many` reads whole requests (every step, vote and history row); a timer
decision needs only the open step's row (its latest round), the votes of that round and the
history rows of that step (`connector.approvals.timers.timer_state` counts nothing else), plus
the request's highest history `seq`, so a transition the decision appends gets the next one.

A `Partial` is for deciding and for bulk writes that touch only the request's version and
append history (reminders); anything that saves a request through the approval store
(escalation, time-out) reads it whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from connector.approvals.lifecycle import ApprovalRequest, Outcome, StepState, Transition, Vote
from connector.storage.approval_store import RecordKey, StoredRequest
from connector.storage.models import (
    ApprovalRequestRow,
    ApprovalStepRow,
    ApprovalTransitionRow,
    ApprovalVoteRow,
)

T = TypeVar("T")
REQUESTS = ApprovalRequestRow.__table__.c
STEPS = ApprovalStepRow.__table__.c
VOTES = ApprovalVoteRow.__table__.c
TRANSITIONS = ApprovalTransitionRow.__table__.c


@dataclass(frozen=True)
class Partial:
    """A request with only its open step's rows; `last_seq` is its highest history seq."""

    stored: StoredRequest
    last_seq: int

    def renumber(self, outcome: Outcome) -> Outcome:
        """The outcome of a decision on the partial request, with the new history rows numbered
        after the request's real last row (the pure core numbers them after the rows it saw)."""
        seen = len(self.stored.request.transitions)
        # the pure core appends after the rows it was given and numbers them len + 1, len + 2...
        added = tuple(replaced(t, seq=self.last_seq + t.seq - seen) for t in outcome.transitions)
        outcome.request.transitions[seen:] = added  # the decision's own copy of the list
        return replaced(outcome, transitions=added)


def replaced(item: T, **changes: Any) -> T:
    """`dataclasses.replace` for plain dataclasses (frozen or not, no __slots__, no
    __post_init__): a shallow copy with some fields changed, without its per-call field
    inspection and __init__, several times cheaper; the sweep does it for every reminder."""
    new = object.__new__(type(item))
    new.__dict__.update(item.__dict__)
    new.__dict__.update(changes)
    return new


# What a timer decision and its bulk save read of the request row: not the record snapshot
# (`record`, `record_previous`, `changed_fields`), which neither reads; a Partial has them empty.
_COLUMNS = [
    REQUESTS[name]
    for name in (
        "id", "connection", "object_type", "record_id", "rule_name", "mapping_path", "mapping_hash",
        "submitter", "status", "current_step", "submitted_at", "updated_at", "superseded_by", "version",
    )
]  # fmt: skip


# The child rows' columns in their dataclass's field order (the tables mirror the dataclasses),
# so a row becomes its dataclass positionally, with no per-row dict.
_STEP_COLUMNS = [STEPS[f.name] for f in fields(StepState)]
_VOTE_COLUMNS = [VOTES[f.name] for f in fields(Vote)]
_TRANSITION_COLUMNS = [TRANSITIONS[f.name] for f in fields(Transition)]
_APPROVERS = next(i for i, f in enumerate(fields(StepState)) if f.name == "approvers")


def _step(row: Any) -> StepState:
    values = list(row)
    values[_APPROVERS] = tuple(values[_APPROVERS])  # JSON hands back a list
    return StepState(*values)


def _grouped(rows: Any, make: Any) -> dict[str, list[Any]]:
    """Rows whose first column is the request id, made into dataclasses, by request id."""
    grouped: dict[str, list[Any]] = {}
    for row in rows:
        grouped.setdefault(row[0], []).append(make(row))
    return grouped


def _partial(
    row: Any, steps: list[StepState], votes: list[Vote], transitions: list[Transition]
) -> StoredRequest:
    record = RecordKey(row.connection, row.object_type, row.record_id)
    request = ApprovalRequest(
        id=row.id,
        rule_name=row.rule_name,
        record_ref=record.ref,
        submitter=row.submitter,
        status=row.status,
        current_step=row.current_step,
        record={},
        record_previous=None,
        changed_fields=(),
        submitted_at=row.submitted_at,
        updated_at=row.updated_at,
        approved_at=None,  # not read by a timer decision
        expires_at=None,
        closed_at=None,
        expired_at=None,
        version=row.version,
        steps=steps,
        votes=votes,
        transitions=transitions,
    )
    return StoredRequest(request, record, row.mapping_path, row.mapping_hash, row.superseded_by)


def load_open_steps(session: Session, ids: Sequence[str]) -> list[Partial]:
    """The requests with these ids (those that exist) with only their open step's rows."""
    if not ids:
        return []
    rows = session.execute(select(*_COLUMNS).where(REQUESTS.id.in_(ids))).all()
    open_ids = [row.id for row in rows if row.current_step is not None]
    on_step = and_(REQUESTS.id == STEPS.request_id, REQUESTS.current_step == STEPS.index)
    steps = _grouped(
        session.execute(
            select(*_STEP_COLUMNS)
            .join(ApprovalRequestRow.__table__, on_step)
            .where(REQUESTS.id.in_(open_ids))
            .order_by(STEPS.entered_at, STEPS.index, STEPS.round)
        ),
        _step,
    )
    votes = _grouped(
        session.execute(
            select(*_VOTE_COLUMNS)
            .join(
                ApprovalRequestRow.__table__,
                and_(REQUESTS.id == VOTES.request_id, REQUESTS.current_step == VOTES.step_index),
            )
            .where(REQUESTS.id.in_(open_ids))
            .order_by(VOTES.id)
        ),
        lambda row: Vote(*row),
    )
    history = _grouped(
        session.execute(
            select(*_TRANSITION_COLUMNS)
            .join(
                ApprovalRequestRow.__table__,
                and_(REQUESTS.id == TRANSITIONS.request_id, REQUESTS.current_step == TRANSITIONS.step_index),
            )
            .where(REQUESTS.id.in_(open_ids))
            .order_by(TRANSITIONS.seq)
        ),
        lambda row: Transition(*row),
    )
    last_seq: dict[str, int] = dict(
        session.execute(
            select(TRANSITIONS.request_id, func.max(TRANSITIONS.seq))
            .where(TRANSITIONS.request_id.in_(ids))
            .group_by(TRANSITIONS.request_id)
        ).all()
    )
    out = []
    for row in rows:
        if row.current_step is None:
            stored = _partial(row, [], [], [])
        else:
            stored = _partial(row, steps.get(row.id, []), votes.get(row.id, []), history.get(row.id, []))
        out.append(Partial(stored, last_seq.get(row.id, 0)))
    return out
