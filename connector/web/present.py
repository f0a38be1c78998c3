"""What the pages show about a request, built from the stored request and its mapping file:
the record's values and what changed, why the rule matched (the explanation `crm-approvals
explain` gives), and the chain with its approvers, votes and comments."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from connector.approvals.lifecycle import (
    FLAG_KINDS,
    ApprovalRequest,
    StepState,
    Transition,
    Vote,
    current_step_state,
    may_recall,
    may_vote,
    step_votes,
)
from connector.approvals.spec import MappingSpec, RuleSpec
from connector.rules import MappingSet
from connector.service.explain import RuleExplanation, explain_record
from connector.storage.approval_store import StoredRequest
from connector.storage.models import RecordSnapshot
from connector.web import i18n

NAME_FIELDS = ("name", "title", "subject")  # canonical fields that name a record, first found wins
CURRENCY_FIELD = "currency"


@dataclass(frozen=True)
class ValueRow:
    field: str
    label: str
    value: str
    changed: bool = False  # the change that opened (or restarted) the request touched it
    before: str | None = None  # its value before that change, when we had seen the record before
    now: str | None = None  # set when the CRM's last-seen value differs from the submitted one


@dataclass(frozen=True)
class ConditionLine:
    depth: int
    text: str
    actual: str | None
    held: bool


@dataclass(frozen=True)
class StepView:
    state: StepState
    votes: list[Vote]
    waiting_on: list[str]  # approvers of an open step who have not voted
    is_open: bool


@dataclass
class RequestView:
    stored: StoredRequest
    spec: MappingSpec | None
    rule: RuleSpec | None
    title: str
    amount: str | None
    triggers: list[str]  # labels of the fields whose conditions made the rule match
    current: StepView | None
    steps: list[StepView] = field(default_factory=list)
    values: list[ValueRow] = field(default_factory=list)
    reasons: list[ConditionLine] = field(default_factory=list)
    history: list[Transition] = field(default_factory=list)
    # What the approvers should know before deciding: locked fields edited while pending, votes
    # set in the CRM by someone else (lifecycle.FLAG_KINDS), newest first.
    flags: list[Transition] = field(default_factory=list)
    can_vote: bool = False
    can_recall: bool = False
    comment_required: bool = True
    bulk_approve: bool = False

    @property
    def request(self) -> ApprovalRequest:
        return self.stored.request

    @property
    def connection(self) -> str:
        return self.stored.record.connection

    @property
    def step_number(self) -> int:
        """1-based position of the open step among the rule's steps."""
        return (self.current.state.index + 1) if self.current is not None else 0

    @property
    def step_count(self) -> int:
        return len(self.rule.steps) if self.rule is not None else len({s.index for s in self.request.steps})

    @property
    def waiting_since(self) -> datetime | None:
        return self.current.state.entered_at if self.current is not None else None


def find_rule(
    mappings: MappingSet | None, stored: StoredRequest
) -> tuple[MappingSpec | None, RuleSpec | None]:
    if mappings is None:
        return None, None
    record = stored.record
    for spec in mappings.for_object(record.connection, record.object_type):
        for rule in spec.rules:
            if rule.name == stored.request.rule_name:
                return spec, rule
    return None, None


def summarize(
    stored: StoredRequest, mappings: MappingSet | None, user_id: str, is_admin: bool
) -> RequestView:
    """What lists show: name, amount, the triggering fields, the open step."""
    spec, rule = find_rule(mappings, stored)
    req = stored.request
    explained = _explain(spec, rule, req)
    triggers = []
    if explained is not None:
        for trace in explained.conditions:
            if trace.field is not None and trace.result and trace.field not in triggers:
                triggers.append(trace.field)
    current = current_step_state(req)
    current_view = _step_view(req, current) if current is not None and current.status == "pending" else None
    return RequestView(
        stored=stored,
        spec=spec,
        rule=rule,
        title=_title(stored),
        amount=_amount(spec, req.record, stored.record.connection),
        triggers=[i18n.humanize(name) for name in triggers],
        current=current_view,
        can_vote=rule is not None
        and may_vote(req, user_id, is_admin, allow_self_approval=rule.allow_self_approval),
        can_recall=may_recall(req, user_id, is_admin),
        comment_required=rule is None or rule.reject_comment == "required",
        bulk_approve=rule is not None and rule.bulk_approve,
    )


def detail(
    session: Session, stored: StoredRequest, mappings: MappingSet | None, user_id: str, is_admin: bool
) -> RequestView:
    """Everything the request page shows."""
    view = summarize(stored, mappings, user_id, is_admin)
    req = stored.request
    view.steps = [_step_view(req, step) for step in req.steps]
    view.values = _values(session, view.spec, stored)
    explained = _explain(view.spec, view.rule, req)
    if explained is not None:
        base = min((c.path.count(".") for c in explained.conditions), default=0)
        view.reasons = [
            ConditionLine(
                depth=c.path.count(".") - base,
                text=i18n.condition_text(c.operator, c.field, c.expected),
                actual=None if c.field is None else i18n.plain(c.actual),
                held=c.result,
            )
            for c in explained.conditions
        ]
    view.history = list(req.transitions)
    view.flags = [t for t in reversed(req.transitions) if t.kind in FLAG_KINDS]
    return view


def _step_view(req: ApprovalRequest, step: StepState) -> StepView:
    votes = step_votes(req, step)
    voted = {v.approver for v in votes}
    is_open = step.status == "pending" and req.current_step == step.index
    waiting = [a for a in step.approvers if a not in voted] if is_open else []
    return StepView(step, votes, waiting, is_open)


def _explain(spec: MappingSpec | None, rule: RuleSpec | None, req: ApprovalRequest) -> RuleExplanation | None:
    """The rule's conditions evaluated on the values as submitted (as `crm-approvals explain`)."""
    if spec is None or rule is None:
        return None
    previous = spec.to_api(req.record_previous) if req.record_previous is not None else None
    changed = tuple(spec.fields[name].api_name for name in req.changed_fields if name in spec.fields)
    explanation = explain_record(spec, spec.to_api(req.record), previous, changed)
    return next((r for r in explanation.rules if r.rule == rule.name), None)


def _title(stored: StoredRequest) -> str:
    for name in NAME_FIELDS:
        value = stored.request.record.get(name)
        if value not in (None, ""):
            return str(value)
    return stored.record.record_id


def _currency(record: dict[str, Any]) -> str | None:
    value = record.get(CURRENCY_FIELD)
    return value if isinstance(value, str) else None


def _amount(spec: MappingSpec | None, record: dict[str, Any], connection: str) -> str | None:
    if spec is None:
        return None
    for name, field_spec in spec.fields.items():
        if field_spec.type == "money" and record.get(name) not in (None, ""):
            return i18n.show(record[name], "money", _currency(record), connection)
    return None


def _values(session: Session, spec: MappingSpec | None, stored: StoredRequest) -> list[ValueRow]:
    req = stored.request
    record, connection = req.record, stored.record.connection
    currency = _currency(record)
    latest = _last_seen(session, spec, stored)
    changed = set(req.changed_fields)
    previous = req.record_previous or {}
    rows = []
    for name in record:
        kind = spec.fields[name].type if spec is not None and name in spec.fields else "string"
        shown = i18n.show(record[name], kind, currency, connection)
        # The first time we see a record there is nothing to compare with: changed, before unknown.
        known_before = name in changed and req.record_previous is not None
        before = i18n.show(previous.get(name), kind, currency, connection) if known_before else None
        now = None
        if latest is not None and name in latest:
            current = i18n.show(latest[name], kind, currency, connection)
            now = current if current != shown else None
        rows.append(ValueRow(name, i18n.humanize(name), shown, name in changed, before, now))
    rows.sort(key=lambda row: (not row.changed, list(record).index(row.field)))  # changes first
    return rows


def _last_seen(session: Session, spec: MappingSpec | None, stored: StoredRequest) -> dict[str, Any] | None:
    """The record's values as the CRM last sent them (canonical names), when we have them."""
    if spec is None:
        return None
    record = stored.record
    row = session.get(RecordSnapshot, (record.connection, record.object_type, record.record_id))
    if row is None:
        return None
    lowered = {k.lower(): v for k, v in row.values.items()}
    return {
        name: lowered[f.api_name.lower()] for name, f in spec.fields.items() if f.api_name.lower() in lowered
    }
