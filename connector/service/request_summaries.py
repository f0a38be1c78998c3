"""A page of `GET /api/v1/requests` as JSON, read straight from the rows a summary shows.

The same answer as `RequestList.of(find_requests(...)).model_dump(mode="json")`
(connector/service/request_views.py, which the OpenAPI document describes), without its
costs on a page of many requests: only the columns a summary shows are read, only the open
step and its votes of pending requests (a summary shows no other child), and the answer is
built as plain dicts we made ourselves rather than validated model by model. The open steps
come with the page's own statement, as one JSON column of its rows.
tests/webhooks/test_api_summaries.py holds the two equal, to the byte of the API's answer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, and_, case, func, select, type_coerce
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from connector.service.request_query import RequestFilters, Viewer, page_rows
from connector.storage.approval_store import RecordKey
from connector.storage.db import in_ids
from connector.storage.models import ApprovalRequestRow, ApprovalStepRow, ApprovalVoteRow

R = ApprovalRequestRow.__table__.c
_S, _V = ApprovalStepRow.__table__.c, ApprovalVoteRow.__table__.c
# Read by position below (a Row's tuple access, not its name lookup): the unpacking in
# _summary, _step and _vote follows the order of these columns.
SUMMARY_COLUMNS = (
    R.id,
    R.connection,
    R.object_type,
    R.record_id,
    R.rule_name,
    R.status,
    R.submitter,
    R.submitted_at,
    R.updated_at,
    R.current_step,
    R.record,
    R.version,
)
_CURRENT_STEP = SUMMARY_COLUMNS.index(R.current_step)
STEP_COLUMNS = (
    _S.request_id,
    _S.index,
    _S.round,
    _S.name,
    _S.mode,
    _S.approvers,
    _S.required,
    _S.status,
    _S.entered_at,
    _S.left_at,
    _S.on_behalf_of,
)
VOTE_COLUMNS = (
    _V.step_index,
    _V.round,
    _V.approver,
    _V.decision,
    _V.comment,
    _V.acting_admin,
    _V.at,
    _V.on_behalf_of,
    _V.auto_reason,
)
_ROUND, _STATUS = STEP_COLUMNS.index(_S.round), STEP_COLUMNS.index(_S.status)
_VOTE = len(STEP_COLUMNS)  # where a row's vote columns start
_VOTE_APPROVER = _VOTE + VOTE_COLUMNS.index(_V.approver)


@functools.cache
def _open_steps_statement(dialect: str) -> Any:
    """The steps of the requests given as `ids`, each with the votes of its round if it is
    pending (built once per dialect)."""
    return (
        select(*STEP_COLUMNS, *(c.label(f"vote_{c.name}") for c in VOTE_COLUMNS))
        .select_from(ApprovalStepRow.__table__)
        .outerjoin(
            ApprovalVoteRow.__table__,
            and_(
                _V.request_id == _S.request_id,
                _V.step_index == _S.index,
                _V.round == _S.round,
                _S.status == "pending",
            ),
        )
        .where(in_ids(_S.request_id, dialect))
        .order_by(_V.id)
    )


@functools.cache
def _open_step_column(dialect: str) -> Any:
    """The open step of the page's request as one JSON array (NULL if none): the latest round
    of its `current_step` if that round is pending, its columns as STEP_COLUMNS less
    request_id, then its votes, oldest first, each as VOTE_COLUMNS (NULL if none). Exactly
    what _open_steps selects, read in the page's statement (built once per dialect): on
    PostgreSQL a round trip less, on SQLite less CPU than a second statement."""
    votes_of_round = (_V.request_id == _S.request_id, _V.step_index == _S.index, _V.round == _S.round)
    if dialect == "postgresql":
        array: Any = func.json_build_array
        votes = select(func.json_agg(postgresql.aggregate_order_by(array(*VOTE_COLUMNS), _V.id))).where(
            *votes_of_round
        )
        # jsonb columns and json values embed as JSON
        approvers: Any = _S.approvers
        on_behalf_of: Any = _S.on_behalf_of
        votes_json: Any = votes.scalar_subquery()
    else:
        # SQLite (before 3.44) has no ORDER BY in an aggregate: it aggregates an ordered
        # subquery in its order (and does not flatten one into an aggregate query)
        array = func.json_array
        ordered = (
            select(array(*VOTE_COLUMNS).label("vote"))
            .where(*votes_of_round)
            .order_by(_V.id)
            .correlate(ApprovalStepRow.__table__)
            .subquery()
        )
        votes = select(func.json_group_array(func.json(ordered.c.vote)))
        # JSON kept as text, or passed through a subquery, embeds as a string unless read by json()
        approvers, on_behalf_of = func.json(_S.approvers), func.json(_S.on_behalf_of)
        votes_json = func.json(votes.scalar_subquery())
    # STEP_COLUMNS less request_id, then the votes: _open_step_of_json unpacks them in this order
    step = array(
        _S.index,
        _S.round,
        _S.name,
        _S.mode,
        approvers,
        _S.required,
        _S.status,
        _S.entered_at,
        _S.left_at,
        on_behalf_of,
        votes_json,
    )
    latest = (  # by the primary key's index (request_id, index, round), backwards: one row
        select(case((_S.status == "pending", step), else_=None))
        .where(_S.request_id == R.id, _S.index == R.current_step)
        .order_by(_S.round.desc())
        .limit(1)
        .scalar_subquery()
    )
    return type_coerce(latest, JSON).label("open_step")


@functools.cache
def _summary_with_open_step_columns(dialect: str) -> tuple[Any, ...]:
    return (*SUMMARY_COLUMNS, _open_step_column(dialect))


_OPEN_STEP = len(SUMMARY_COLUMNS)


def request_list(session: Session, filters: RequestFilters, viewer: Viewer | None) -> dict[str, Any]:
    """The RequestList of this page as JSON-ready dicts."""
    if _may_show_open_steps(filters):
        columns = _summary_with_open_step_columns(session.connection().dialect.name)
        rows, total, next_cursor = page_rows(session, filters, viewer, columns)
        summaries = [_summary(row, _open_step_of_json(row[_OPEN_STEP])) for row in rows]
    else:
        rows, total, next_cursor = page_rows(session, filters, viewer, SUMMARY_COLUMNS)
        open_steps = _open_steps(session, rows)
        summaries = [_summary(row, open_steps.get(row[0])) for row in rows]
    return {"requests": summaries, "count": len(summaries), "total": total, "next_cursor": next_cursor}


def _may_show_open_steps(filters: RequestFilters) -> bool:
    """Whether the page may hold pending requests. A page filtered to other statuses (approved,
    rejected...) has no open step as the store keeps requests (a decision clears the current
    step): there the column would cost a probe per row and a bigger statement for nothing,
    where _open_steps reads nothing unless a row has a current step, and then the same steps."""
    return not filters.status or "pending" in filters.status


def _open_step_of_json(step: list[Any] | None) -> dict[str, Any] | None:
    """The open step from _open_step_column's array: its step's fields, then its votes."""
    if step is None:
        return None
    *fields, votes = step
    return _step(fields, [_vote(vote, _iso) for vote in votes or ()], _iso)


def _iso(moment: str) -> str:
    """What isoformat makes of the column's datetime. PostgreSQL writes times in JSON in the
    session's zone, with the fraction's trailing zeros trimmed; SQLite as stored (UTC,
    without a zone, as UTCDateTime reads it)."""
    at = datetime.fromisoformat(moment)
    return (at if at.tzinfo is not None else at.replace(tzinfo=UTC)).isoformat()


def _open_steps(session: Session, rows: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """The open step (latest round of `current_step`, if still pending) of each request
    that has one, with that round's votes: one statement, each step with the votes of its
    round joined if it is pending (the open step is the only pending one), oldest vote first."""
    current = {row[0]: row[_CURRENT_STEP] for row in rows if row[_CURRENT_STEP] is not None}
    if not current:
        return {}
    latest: dict[str, Any] = {}  # request id -> the row of its current step's latest round
    votes: dict[tuple[str, int], list[dict[str, Any]]] = {}  # (request id, round) -> its votes
    conn = session.connection()
    for row in conn.execute(_open_steps_statement(conn.dialect.name), {"ids": list(current)}):
        request_id, index, round_ = row[0], row[1], row[_ROUND]
        if index != current[request_id]:
            continue
        seen = latest.get(request_id)
        if seen is None or round_ > seen[_ROUND]:
            latest[request_id] = row
        if row[_VOTE_APPROVER] is not None:
            votes.setdefault((request_id, round_), []).append(_vote(row[_VOTE:]))
    steps = {}
    for request_id, row in latest.items():
        if row[_STATUS] == "pending":
            steps[request_id] = _step(row[1:_VOTE], votes.get((request_id, row[_ROUND]), []))
    return steps


def _summary(row: Any, open_step: dict[str, Any] | None) -> dict[str, Any]:
    (
        request_id,
        connection,
        object_type,
        record_id,
        rule_name,
        status,
        submitter,
        submitted_at,
        updated_at,
        _current_step,
        record,
        version,
        *_,  # the open step if read, and the page's total (request_query.page_rows)
    ) = row
    return {
        "id": request_id,
        "record": {
            "connection": connection,
            "object": object_type,
            "id": record_id,
            "ref": RecordKey(connection, object_type, record_id).ref,
        },
        "rule": rule_name,
        "status": status,
        "submitter": submitter,
        "submitted_at": submitted_at.isoformat(),
        "updated_at": updated_at.isoformat(),
        "current_step": open_step,
        # decoded from the JSON column just now: already what to_wire would make of it
        "values": record,
        "version": version,
    }


def _step(
    fields: Sequence[Any], votes: list[dict[str, Any]], iso: Callable[[Any], str] = datetime.isoformat
) -> dict[str, Any]:
    """A step's summary from its fields in STEP_COLUMNS' order less request_id (a row's, or the
    open step column's JSON, whose times are text for `iso`)."""
    index, round_, name, mode, approvers, required, status, entered_at, left_at, on_behalf_of = fields
    return {
        "index": index,
        "round": round_,
        "name": name,
        "mode": mode,
        "approvers": list(approvers),
        "on_behalf_of": dict(on_behalf_of or {}),
        "required": required,
        "status": status,
        "entered_at": iso(entered_at),
        "left_at": iso(left_at) if left_at is not None else None,
        "votes": votes,
    }


def _vote(fields: Sequence[Any], iso: Callable[[Any], str] = datetime.isoformat) -> dict[str, Any]:
    """A vote's summary from its fields in VOTE_COLUMNS' order (as _step's)."""
    step_index, round_, approver, decision, comment, acting_admin, at, on_behalf_of, auto_reason = fields
    return {
        "step_index": step_index,
        "round": round_,
        "approver": approver,
        "decision": decision,
        "comment": comment,
        "acting_admin": bool(acting_admin),  # SQLite's JSON: 0 or 1
        "at": iso(at),
        "on_behalf_of": on_behalf_of,
        "auto_reason": auto_reason,
    }
