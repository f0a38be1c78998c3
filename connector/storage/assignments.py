"""Who a request is assigned to and who it waits for, as indexed rows.

`approval_steps.approvers` is a JSON list: fine for the engine, but no index on SQLite
can find "requests waiting for u-7" in it. So every save of an outcome that touches
steps or votes also keeps two small tables (models ApprovalAssigneeRow and
ApprovalWaitingRow) in the same transaction: everyone ever assigned (visibility), and the
approvers the open step still waits for (the pending list, ordered by submission).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from connector.approvals.lifecycle import Outcome, current_step_state, step_votes
from connector.storage import batch_writes
from connector.storage.models import ApprovalAssigneeRow, ApprovalWaitingRow


def record(session: Session, outcome: Outcome, submitted_at: datetime) -> None:
    """Bring both tables in line with the request as the outcome leaves it."""
    if not outcome.steps and not outcome.votes:
        return  # nobody was assigned, and no step opened, closed or got a vote
    request = outcome.request
    # a person whose place a deputy took (issue 11) still sees the request
    assigned = sorted(
        {who for step in outcome.steps for who in (*step.approvers, *step.on_behalf_of.values())}
    )
    assignees = [{"approver": approver, "request_id": request.id} for approver in assigned]
    opened = any(t.kind == "submitted" for t in outcome.transitions)  # a new request has none yet
    waiting = _waiting_rows(outcome, submitted_at)
    if opened and batch_writes.add(session, ApprovalAssigneeRow.__table__, assignees):
        batch_writes.add(session, ApprovalWaitingRow.__table__, waiting)  # a batch writes them later
        return
    if assignees:
        module = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
        session.execute(module.insert(ApprovalAssigneeRow).on_conflict_do_nothing(), assignees)
    if not opened:
        session.execute(delete(ApprovalWaitingRow).where(ApprovalWaitingRow.request_id == request.id))
    if waiting:
        session.add_all(ApprovalWaitingRow(**row) for row in waiting)
        session.flush()


def _waiting_rows(outcome: Outcome, submitted_at: datetime) -> list[dict[str, object]]:
    """The approvers the open step of a pending request still waits for."""
    request = outcome.request
    step = current_step_state(request)
    if request.status != "pending" or step is None or step.status != "pending":
        return []
    voted = {vote.approver for vote in step_votes(request, step)}
    return [
        {
            "request_id": request.id,
            "approver": approver,
            "step_index": step.index,
            "round": step.round,
            "submitted_at": submitted_at,
        }
        for approver in dict.fromkeys(step.approvers)
        if approver not in voted
    ]
