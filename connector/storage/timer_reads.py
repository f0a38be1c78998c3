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

from sqlalchemy.orm import Session

from connector.approvals.timers import HISTORY_KINDS, OpenStep


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


def _moment(value: Any) -> datetime:
    """A UTC column's driver value as the aware datetime `UTCDateTime` gives."""
    if isinstance(value, str):  # SQLite keeps ISO text ('YYYY-MM-DD HH:MM:SS.ffffff', in UTC)
        value = datetime.fromisoformat(value)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _approvers(value: Any, seen: dict[Any, tuple[str, ...]]) -> tuple[str, ...]:
    """The step's approvers column (JSON text on SQLite; a list, or text, on PostgreSQL)."""
    if not isinstance(value, str):
        return tuple(json.loads(value) if isinstance(value, bytes) else value)
    known = seen.get(value)
    if known is None:
        known = seen[value] = tuple(json.loads(value))
    return known


def load_timer_steps(session: Session, ids: Sequence[str]) -> list[TimerRead]:
    """The requests with these ids (those that exist), each with its open step as a timer
    decision reads it, in three statements of plain SQL (the tables of
    connector/storage/models.py) through the driver's own values: the request rows
    beside their current step's rows and their highest seq, that step's votes, and its
    history rows of the kinds a timer counts (`HISTORY_KINDS`). Moments are decoded only
    where a decision reads them (the step's opening, its reminders and escalations)."""
    if not ids:
        return []
    conn = session.connection()
    mark = "?" if conn.dialect.paramstyle == "qmark" else "%s"

    def among(values: Sequence[str]) -> str:
        return "(" + ", ".join([mark] * len(values)) + ")"

    # plain SQL through the driver (columns as stored: no result processing, and none of
    # SQLAlchemy's per-execution expansion of a 2,000-value IN list); "index" and "round" quoted
    rows = conn.exec_driver_sql(
        "SELECT r.id, r.connection, r.object_type, r.record_id, r.rule_name, r.status, r.version,"
        " (SELECT max(t.seq) FROM approval_transitions t WHERE t.request_id = r.id),"
        ' s."round", s.name, s.status, s.entered_at, s.approvers, r.current_step'
        " FROM approval_requests r LEFT JOIN approval_steps s"
        ' ON s.request_id = r.id AND s."index" = r.current_step'
        f" WHERE r.id IN {among(ids)}",
        tuple(ids),
    ).fetchall()
    latest: dict[str, Any] = {}  # request id -> its current step's row of the highest round
    for row in rows:
        known = latest.get(row[0])
        if known is None or (row[8] is not None and (known[8] is None or row[8] > known[8])):
            latest[row[0]] = row
    open_ids = [rid for rid, row in latest.items() if row[8] is not None]
    voted: dict[tuple[str, int], set[str]] = {}
    history: dict[str, list[tuple[int, str, datetime | None]]] = {}
    if open_ids:
        for rid, round_, approver in conn.exec_driver_sql(
            'SELECT v.request_id, v."round", v.approver FROM approval_votes v'
            " JOIN approval_requests r ON r.id = v.request_id AND r.current_step = v.step_index"
            f" WHERE r.id IN {among(open_ids)}",
            tuple(open_ids),
        ):
            voted.setdefault((rid, round_), set()).add(approver)
        for rid, seq, kind, at in conn.exec_driver_sql(
            "SELECT t.request_id, t.seq, t.kind, t.at FROM approval_transitions t"
            " JOIN approval_requests r ON r.id = t.request_id AND r.current_step = t.step_index"
            f" WHERE r.id IN {among(open_ids)} AND t.kind IN {among(HISTORY_KINDS)}"
            " ORDER BY t.seq",
            (*open_ids, *HISTORY_KINDS),
        ):
            moment = _moment(at) if kind == "reminded" or kind == "escalated" else None
            history.setdefault(rid, []).append((seq, kind, moment))
    out = []
    seen: dict[Any, tuple[str, ...]] = {}  # the same approver lists recur: each decoded once
    for row in latest.values():
        (rid, connection, object_type, record_id, rule_name, status, version, seq, round_, name, step_status,
         entered_at, approvers, current) = row  # fmt: skip
        step = None
        if round_ is not None:
            step = OpenStep(
                rid, status, current, round_, name, step_status, _moment(entered_at),
                _approvers(approvers, seen), frozenset(voted.get((rid, round_), ())), history.get(rid, []),
            )  # fmt: skip
        out.append(
            TimerRead(rid, connection, object_type, record_id, rule_name, status, version, seq or 0, step)
        )
    return out
