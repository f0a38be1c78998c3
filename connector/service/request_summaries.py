"""A page of `GET /api/v1/requests` as JSON, read straight from the rows a summary shows.

The same answer as `RequestList.of(find_requests(...)).model_dump(mode="json")`
(connector/service/request_views.py, which the OpenAPI document describes), without its
costs on a page of many requests: only the columns a summary shows are read, only the open
step and its votes of pending requests (a summary shows no other child), and the answer is
built as plain dicts we made ourselves rather than validated model by model.
tests/service/test_request_summaries.py holds the two equal.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, select
from sqlalchemy.orm import Session

from connector.service.request_query import RequestFilters, Viewer, page_rows
from connector.storage.approval_store import RecordKey
from connector.storage.db import in_ids
from connector.storage.models import ApprovalRequestRow, ApprovalStepRow, ApprovalVoteRow

R = ApprovalRequestRow.__table__.c
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
STEP_COLUMNS = tuple(c for c in ApprovalStepRow.__table__.c)
VOTE_COLUMNS = tuple(c.label(f"vote_{c.name}") for c in ApprovalVoteRow.__table__.c if c.name != "id")
_S, _V = ApprovalStepRow.__table__.c, ApprovalVoteRow.__table__.c


@functools.cache
def _open_steps_statement(dialect: str) -> Any:
    """The steps of the requests given as `ids`, each with the votes of its round if it is
    pending (built once per dialect)."""
    return (
        select(*STEP_COLUMNS, *VOTE_COLUMNS)
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


def request_list(session: Session, filters: RequestFilters, viewer: Viewer | None) -> dict[str, Any]:
    """The RequestList of this page as JSON-ready dicts."""
    rows, total, next_cursor = page_rows(session, filters, viewer, SUMMARY_COLUMNS)
    open_steps = _open_steps(session, rows)
    summaries = [_summary(row, open_steps.get(row.id)) for row in rows]
    return {"requests": summaries, "count": len(summaries), "total": total, "next_cursor": next_cursor}


def _open_steps(session: Session, rows: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """The open step (latest round of `current_step`, if still pending) of each request
    that has one, with that round's votes: one statement, each step with the votes of its
    round joined if it is pending (the open step is the only pending one), oldest vote first."""
    current = {row.id: row.current_step for row in rows if row.current_step is not None}
    if not current:
        return {}
    latest: dict[str, Any] = {}
    votes: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    conn = session.connection()
    for row in conn.execute(_open_steps_statement(conn.dialect.name), {"ids": list(current)}).all():
        values = row._mapping  # by name: a Row's own .index would shadow the column
        request_id = values["request_id"]
        if values["index"] != current[request_id]:
            continue
        seen = latest.get(request_id)
        if seen is None or values["round"] > seen["round"]:
            latest[request_id] = values
        if values["vote_approver"] is not None:
            key = (request_id, values["index"], values["round"])
            votes.setdefault(key, []).append(_vote(values))
    steps = {}
    for request_id, values in latest.items():
        if values["status"] == "pending":
            step = steps[request_id] = _step(values)
            step["votes"] = votes.get((request_id, values["index"], values["round"]), [])
    return steps


def _summary(row: Any, current_step: dict[str, Any] | None) -> dict[str, Any]:
    connection, object_type, record_id = row.connection, row.object_type, row.record_id
    return {
        "id": row.id,
        "record": {
            "connection": connection,
            "object": object_type,
            "id": record_id,
            "ref": RecordKey(connection, object_type, record_id).ref,
        },
        "rule": row.rule_name,
        "status": row.status,
        "submitter": row.submitter,
        "submitted_at": row.submitted_at.isoformat(),
        "updated_at": row.updated_at.isoformat(),
        "current_step": current_step,
        # decoded from the JSON column just now: already what to_wire would make of it
        "values": row.record,
        "version": row.version,
    }


def _step(values: Any) -> dict[str, Any]:
    return {
        "index": values["index"],
        "round": values["round"],
        "name": values["name"],
        "mode": values["mode"],
        "approvers": list(values["approvers"]),
        "on_behalf_of": dict(values["on_behalf_of"] or {}),
        "required": values["required"],
        "status": values["status"],
        "entered_at": values["entered_at"].isoformat(),
        "left_at": _timestamp(values["left_at"]),
        "votes": [],
    }


def _vote(values: Any) -> dict[str, Any]:
    return {
        "step_index": values["vote_step_index"],
        "round": values["vote_round"],
        "approver": values["vote_approver"],
        "decision": values["vote_decision"],
        "comment": values["vote_comment"],
        "acting_admin": bool(values["vote_acting_admin"]),
        "at": values["vote_at"].isoformat(),
        "on_behalf_of": values["vote_on_behalf_of"],
        "auto_reason": values["vote_auto_reason"],
    }


def _timestamp(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
