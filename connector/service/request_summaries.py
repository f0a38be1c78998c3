"""A page of `GET /api/v1/requests` as JSON, read straight from the rows a summary shows.

The same answer as `RequestList.of(find_requests(...)).model_dump(mode="json")`
(connector/service/request_views.py, which the OpenAPI document describes), without its
costs on a page of many requests: only the columns a summary shows are read, only the open
step and its votes of pending requests (a summary shows no other child), and the answer is
built as plain dicts we made ourselves rather than validated model by model.
tests/service/test_request_summaries.py holds the two equal.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from connector.service.request_query import RequestFilters, Viewer, page_rows
from connector.storage.approval_store import RecordKey
from connector.storage.models import ApprovalRequestRow, ApprovalStepRow, ApprovalVoteRow

R = ApprovalRequestRow
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
VOTE_COLUMNS = tuple(c for c in ApprovalVoteRow.__table__.c if c.name != "id")


def request_list(session: Session, filters: RequestFilters, viewer: Viewer | None) -> dict[str, Any]:
    """The RequestList of this page as JSON-ready dicts."""
    rows, total, next_cursor = page_rows(session, filters, viewer, SUMMARY_COLUMNS)
    open_steps = _open_steps(session, rows)
    summaries = [_summary(row, open_steps.get(row.id)) for row in rows]
    return {"requests": summaries, "count": len(summaries), "total": total, "next_cursor": next_cursor}


def _open_steps(session: Session, rows: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """The open step (latest round of `current_step`, if still pending) of each request
    that has one, with that round's votes."""
    current = {row.id: row.current_step for row in rows if row.current_step is not None}
    if not current:
        return {}
    S, V = ApprovalStepRow.__table__.c, ApprovalVoteRow.__table__.c
    latest: dict[str, Any] = {}
    for row in session.execute(select(*STEP_COLUMNS).where(S.request_id.in_(current))):
        values = row._mapping  # by name: a Row's own .index would shadow the column
        request_id = values["request_id"]
        if values["index"] != current[request_id]:
            continue
        seen = latest.get(request_id)
        if seen is None or values["round"] > seen["round"]:
            latest[request_id] = values
    steps = {rid: _step(values) for rid, values in latest.items() if values["status"] == "pending"}
    if steps:
        votes = select(*VOTE_COLUMNS).where(V.request_id.in_(steps)).order_by(V.id)
        for vote in session.execute(votes):
            cast = vote._mapping
            open_step = steps[cast["request_id"]]
            if cast["step_index"] == open_step["index"] and cast["round"] == open_step["round"]:
                open_step["votes"].append(_vote(cast))
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
        "step_index": values["step_index"],
        "round": values["round"],
        "approver": values["approver"],
        "decision": values["decision"],
        "comment": values["comment"],
        "acting_admin": bool(values["acting_admin"]),
        "at": values["at"].isoformat(),
        "on_behalf_of": values["on_behalf_of"],
        "auto_reason": values["auto_reason"],
    }


def _timestamp(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
