"""What a pending request makes of an edit before any restart: a vote cast from a CRM field
(connector.approvals.crm_vote) and edits of locked fields (connector.approvals.locking).

Runs inside the worker's event transaction, like the rest of a record change. Each answer
is saved as its own outcome (a vote, or a history row the approvers see), and the fields to
write back (a cleared decision field, a reverted edit) are queued in the outbox in the same
transaction, so an answer is never half-applied.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from connector.approvals.crm_vote import read_crm_vote
from connector.approvals.lifecycle import Outcome, is_active
from connector.approvals.locking import answer_edits
from connector.approvals.spec import EvalContext, MappingSpec, RuleSpec
from connector.storage import audit
from connector.storage.approval_store import RecordKey, StoredRequest
from connector.storage.outbox import enqueue_update

if TYPE_CHECKING:
    from connector.service.approval_service import ApprovalService


def guard_pending(
    service: ApprovalService,
    session: Session,
    record: RecordKey,
    spec: MappingSpec,
    rule: RuleSpec,
    stored: StoredRequest,
    ctx: EvalContext,
    modified_by: str | None,
) -> tuple[StoredRequest, list[str]]:
    """Apply the CRM vote and the lock of `rule` to this change of `stored`'s record; returns
    the request as saved and what was done (for the inbox row's result)."""
    if rule.crm_vote is None and rule.lock is None:
        return stored, []
    now = service.clock()
    editor = modified_by
    if editor is not None and service.people is not None:  # e.g. a HubSpot user id -> its owner id
        editor = service.people.canonical_id(record.connection, editor, session=session)
    notes: list[str] = []
    vote = read_crm_vote(stored.request, rule, spec.roles, ctx, voter=editor, now=now)
    if vote is not None:
        stored = _save(service, session, stored, spec, rule, vote.outcome, vote.write_back, "crm_vote")
        notes.append(f"vote from the CRM by {editor}" if vote.voted else "CRM vote refused")
    if is_active(stored.request):
        lock = answer_edits(stored.request, rule, ctx, editor=editor, admins=service.admins, now=now)
        if lock is not None:
            stored = _save(service, session, stored, spec, rule, lock.outcome, lock.write_back, "lock")
            notes.append(f"locked field edit {'reverted' if lock.write_back else 'flagged'}")
    return stored, notes


def _save(
    service: ApprovalService,
    session: Session,
    stored: StoredRequest,
    spec: MappingSpec,
    rule: RuleSpec,
    outcome: Outcome,
    write_back: Mapping[str, Any],
    why: str,
) -> StoredRequest:
    from connector.service.approval_service import to_wire

    actions = service.render_actions(outcome, rule, stored.record, session)
    saved = service.commit_outcome(session, stored, spec, rule, outcome, actions)
    if write_back:
        record = stored.record
        fields = {name: to_wire(value) for name, value in spec.to_api(write_back).items()}
        request = saved.request
        enqueue_update(
            session,
            record.connection,
            record.object_type,
            record.record_id,
            fields,
            reason=f"request {request.id}: {why}",
            idempotency_key=f"{request.id}:v{request.version}:{why}",
        )
        audit.record(
            session,
            "action_queued",
            connection=record.connection,
            object_type=record.object_type,
            record_id=record.record_id,
            request_id=request.id,
            event=why,
            fields=fields,
        )
    return saved
