"""An approval request as the API answers it and `crm-approvals requests ... --json` prints it.

These models are the wire format: the API builds its answers from them and its OpenAPI
document is generated from them (webhooks/openapi.py), so the two cannot drift apart.
Fields: docs/api.md#the-request-object.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, Field, PlainSerializer, WithJsonSchema

from connector.approvals.lifecycle import (
    FLAG_KINDS,
    ApprovalRequest,
    RequestStatus,
    StepStatus,
    TransitionKind,
    current_step_state,
    step_votes,
)
from connector.approvals.lifecycle import StepState as StepRow
from connector.approvals.lifecycle import Transition as TransitionRow
from connector.approvals.lifecycle import Vote as VoteRow
from connector.approvals.modes import Decision
from connector.approvals.spec import StepMode
from connector.service.approval_service import to_wire
from connector.service.request_query import RequestPage
from connector.storage.approval_store import StoredRequest

# ISO 8601 with the UTC offset as datetime.isoformat() writes it: 2026-11-23T22:07:29.025333+00:00
Timestamp = Annotated[
    datetime,
    PlainSerializer(lambda value: value.isoformat(), return_type=str),
    WithJsonSchema({"type": "string", "format": "date-time"}, mode="serialization"),
]


class RecordRef(BaseModel):
    connection: str
    object: str
    id: str
    ref: str = Field(description="connection:object:id")


class Vote(BaseModel):
    step_index: int
    round: int
    approver: str
    decision: Decision
    comment: str | None
    acting_admin: bool
    at: Timestamp
    on_behalf_of: str | None = Field(None, description="The approver the voter stood in for as their deputy.")
    auto_reason: str | None = Field(
        None, description="Cast by the engine (same_approver: ask_once), and why; null for a person's vote."
    )

    @classmethod
    def of(cls, vote: VoteRow) -> Vote:
        return cls(
            step_index=vote.step_index,
            round=vote.round,
            approver=vote.approver,
            decision=vote.decision,
            comment=vote.comment,
            acting_admin=vote.acting_admin,
            at=vote.at,
            on_behalf_of=vote.on_behalf_of,
            auto_reason=vote.auto_reason,
        )


class Step(BaseModel):
    """One activation of a step: a step re-opened (back, restart) appears once per round."""

    index: int
    round: int
    name: str
    mode: StepMode
    approvers: list[str] = Field(description="Assigned user ids.")
    on_behalf_of: dict[str, str] = Field(
        default_factory=dict, description="Deputy user id -> the approver they stand in for (out of office)."
    )
    required: int = Field(description="Approvals that approve the step.")
    status: StepStatus
    entered_at: Timestamp
    left_at: Timestamp | None
    votes: list[Vote] = Field(description="The votes of this round.")

    @classmethod
    def of(cls, request: ApprovalRequest, step: StepRow) -> Step:
        return cls(
            index=step.index,
            round=step.round,
            name=step.name,
            mode=step.mode,
            approvers=list(step.approvers),
            on_behalf_of=dict(step.on_behalf_of),
            required=step.required,
            status=step.status,
            entered_at=step.entered_at,
            left_at=step.left_at,
            votes=[Vote.of(v) for v in step_votes(request, step)],
        )


class Transition(BaseModel):
    seq: int
    kind: TransitionKind
    from_status: RequestStatus | None
    to_status: RequestStatus
    step_index: int | None
    actor: str | None = Field(description="null: the engine acted on its own.")
    acting_admin: bool
    comment: str | None
    at: Timestamp

    @classmethod
    def of(cls, transition: TransitionRow) -> Transition:
        return cls(
            seq=transition.seq,
            kind=transition.kind,
            from_status=transition.from_status,
            to_status=transition.to_status,
            step_index=transition.step_index,
            actor=transition.actor,
            acting_admin=transition.acting_admin,
            comment=transition.comment,
            at=transition.at,
        )


class MappingRef(BaseModel):
    path: str
    hash: str = Field(description="SHA-256 of the mapping file that opened the request.")


class RequestSummary(BaseModel):
    id: str
    record: RecordRef
    rule: str
    status: RequestStatus
    submitter: str
    submitted_at: Timestamp
    updated_at: Timestamp
    current_step: Step | None = Field(description="The open step; null when the request is not pending.")
    values: dict[str, Any] = Field(description="Record snapshot at submission, by canonical field name.")
    version: int

    @classmethod
    def of(cls, stored: StoredRequest) -> RequestSummary:
        return cls(**_summary_fields(stored))


class RequestDetail(RequestSummary):
    previous_values: dict[str, Any] | None
    changed_fields: list[str]
    approved_at: Timestamp | None
    expires_at: Timestamp | None
    closed_at: Timestamp | None
    expired_at: Timestamp | None
    superseded_by: str | None
    mapping: MappingRef
    steps: list[Step]
    votes: list[Vote]
    transitions: list[Transition]
    flags: list[Transition] = Field(
        description="What the approvers should know: locked fields edited while pending, votes set in the "
        "CRM by someone else (also in transitions)."
    )

    @classmethod
    def of(cls, stored: StoredRequest) -> RequestDetail:
        req = stored.request
        return cls(
            **_summary_fields(stored),
            previous_values=to_wire(req.record_previous) if req.record_previous is not None else None,
            changed_fields=list(req.changed_fields),
            approved_at=req.approved_at,
            expires_at=req.expires_at,
            closed_at=req.closed_at,
            expired_at=req.expired_at,
            superseded_by=stored.superseded_by,
            mapping=MappingRef(path=stored.mapping_path, hash=stored.mapping_hash),
            steps=[Step.of(req, step) for step in req.steps],
            votes=[Vote.of(v) for v in req.votes],
            transitions=[Transition.of(t) for t in req.transitions],
            flags=[Transition.of(t) for t in req.transitions if t.kind in FLAG_KINDS],
        )


class RequestList(BaseModel):
    """One page of requests, newest submitted first."""

    requests: list[RequestSummary]
    count: int = Field(description="Requests on this page.")
    total: int = Field(description="Requests matching the filters, on all pages.")
    next_cursor: str | None = Field(description="Pass as cursor= for the next page; null on the last page.")

    @classmethod
    def of(cls, page: RequestPage) -> RequestList:
        summaries = [RequestSummary.of(s) for s in page.requests]
        return cls(requests=summaries, count=len(summaries), total=page.total, next_cursor=page.next_cursor)


def _summary_fields(stored: StoredRequest) -> dict[str, Any]:
    req = stored.request
    current = current_step_state(req)
    record = stored.record
    return {
        "id": req.id,
        "record": RecordRef(
            connection=record.connection, object=record.object_type, id=record.record_id, ref=record.ref
        ),
        "rule": req.rule_name,
        "status": req.status,
        "submitter": req.submitter,
        "submitted_at": req.submitted_at,
        "updated_at": req.updated_at,
        "current_step": Step.of(req, current)
        if current is not None and current.status == "pending"
        else None,
        "values": to_wire(req.record),
        "version": req.version,
    }
