"""What the step-timer sweep reads to decide: each request's open step only.

`approval_store.load_many` reads whole requests (every step, vote and history row); a timer
decision needs only the open step's row (its latest round), who voted in that round and the
history rows of that step (`connector.approvals.timers.OpenStep`: `history_state` counts
nothing else), plus the request's highest history `seq`, so a reminder's history row gets the
next one. The sweep decides every claimed request on this and saves its reminders from it in
bulk; anything that saves a request through the approval store (escalation, time-out) reads
it whole.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple

from sqlalchemy import Integer, String, and_, func, select, type_coerce
from sqlalchemy.orm import Session

from connector.approvals.timers import HISTORY_KINDS, OpenStep
from connector.storage.models import (
    ApprovalRequestRow,
    ApprovalStepRow,
    ApprovalTransitionRow,
    ApprovalVoteRow,
)

REQUESTS = ApprovalRequestRow.__table__.c
STEPS = ApprovalStepRow.__table__.c
VOTES = ApprovalVoteRow.__table__.c
TRANSITIONS = ApprovalTransitionRow.__table__.c


class TimerRead(NamedTuple):
    """A claimed request as the sweep's reminders need it: the request row's keys and version,
    its highest history seq, and its `OpenStep` (None when it has no current step)."""

    id: str
    connection: str
    object_type: str
    record_id: str
    rule_name: str
    status: str
    version: int
    last_seq: int
    step: OpenStep | None


def _plain(column: Any) -> Any:
    """The column with no result processing: the driver's own value (SQLite: text for moments
    and JSON; PostgreSQL: aware datetimes, and JSON as text or decoded)."""
    return type_coerce(column, String() if not isinstance(column.type, Integer) else Integer())


def _moment(value: Any) -> datetime:
    """A UTC column's driver value as the aware datetime `UTCDateTime` gives."""
    if isinstance(value, str):  # SQLite keeps ISO text ('YYYY-MM-DD HH:MM:SS.ffffff', in UTC)
        value = datetime.fromisoformat(value)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def load_timer_steps(session: Session, ids: Sequence[str]) -> list[TimerRead]:
    """The requests with these ids (those that exist), each with its open step as a timer
    decision reads it, in three statements through the driver's plain values: the request rows
    beside their current step's rows and their highest seq, that step's votes, and its
    history rows of the kinds a timer counts (`HISTORY_KINDS`). Moments are decoded only
    where a decision reads them (the step's opening, its reminders and escalations)."""
    if not ids:
        return []
    last_seq = (
        select(func.max(TRANSITIONS.seq)).where(TRANSITIONS.request_id == REQUESTS.id).scalar_subquery()
    )
    rows = session.execute(
        select(
            REQUESTS.id,
            REQUESTS.connection,
            REQUESTS.object_type,
            REQUESTS.record_id,
            REQUESTS.rule_name,
            REQUESTS.status,
            REQUESTS.version,
            last_seq,
            STEPS.round,
            STEPS.name,
            STEPS.status,
            _plain(STEPS.entered_at),
            _plain(STEPS.approvers),
            REQUESTS.current_step,
        )  # fmt: skip
        .select_from(ApprovalRequestRow.__table__)
        .outerjoin(
            ApprovalStepRow.__table__,
            and_(STEPS.request_id == REQUESTS.id, STEPS.index == REQUESTS.current_step),
        )
        .where(REQUESTS.id.in_(ids))
    ).all()
    latest: dict[str, Any] = {}  # request id -> its current step's row of the highest round
    for row in rows:
        known = latest.get(row[0])
        if known is None or (row[8] is not None and (known[8] is None or row[8] > known[8])):
            latest[row[0]] = row
    open_ids = [rid for rid, row in latest.items() if row[8] is not None]
    voted: dict[tuple[str, int], set[str]] = {}
    history: dict[str, list[tuple[int, str, datetime | None]]] = {}
    if open_ids:
        for rid, round_, approver in session.execute(
            select(VOTES.request_id, VOTES.round, VOTES.approver)
            .join(
                ApprovalRequestRow.__table__,
                and_(REQUESTS.id == VOTES.request_id, REQUESTS.current_step == VOTES.step_index),
            )
            .where(REQUESTS.id.in_(open_ids))
        ):
            voted.setdefault((rid, round_), set()).add(approver)
        for rid, seq, kind, at in session.execute(
            select(TRANSITIONS.request_id, TRANSITIONS.seq, TRANSITIONS.kind, _plain(TRANSITIONS.at))
            .join(
                ApprovalRequestRow.__table__,
                and_(REQUESTS.id == TRANSITIONS.request_id, REQUESTS.current_step == TRANSITIONS.step_index),
            )
            .where(REQUESTS.id.in_(open_ids), TRANSITIONS.kind.in_(HISTORY_KINDS))
            .order_by(TRANSITIONS.seq)
        ):
            moment = _moment(at) if kind == "reminded" or kind == "escalated" else None
            history.setdefault(rid, []).append((seq, kind, moment))
    out = []
    for row in latest.values():
        (rid, connection, object_type, record_id, rule_name, status, version, seq, round_, name, step_status,
         entered_at, approvers, current) = row  # fmt: skip
        step = None
        if round_ is not None:
            step = OpenStep(
                rid, status, current, round_, name, step_status, _moment(entered_at),
                tuple(_json(approvers)), frozenset(voted.get((rid, round_), ())), history.get(rid, []),
            )  # fmt: skip
        out.append(
            TimerRead(rid, connection, object_type, record_id, rule_name, status, version, seq or 0, step)
        )
    return out
