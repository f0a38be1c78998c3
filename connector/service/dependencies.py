"""Cross-record dependencies (issue 12): a rule that `requires:` an approval of a related record
(e.g. a contract's company) starts only once that approval is in force.

- `read_related` (prepare, no transaction open; calls the CRM): the related records' values,
  read through the adapter by the lookup field.
- `with_states` (in the event's transaction): `<related>.approval` criteria values, from our
  own requests (the database is the truth about approvals).
- `Gate.check` (when a request opens): the dependency is approved and unexpired -> go on; it is
  pending -> hold this request `waiting`; there is none or it lapsed -> open it (once: the
  active-request key is unique, so a concurrent second opener finds the first) and hold; it
  was rejected -> the request is rejected with the dependency's reason.
- `release` (after any request is saved closed): waiting requests that depended on it resume
  or are rejected, in the same transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from connector.approvals.lifecycle import ApprovalRequest, Outcome, fail_waiting, resume
from connector.approvals.spec import EvalContext, MappingSpec, RelatedSpec, Requirement, RuleSpec
from connector.crm.base import CRMAdapter
from connector.errors import CrmApprovalsError, FatalError
from connector.rules import MappingSet
from connector.rules.company_rules import approval_field
from connector.storage import approval_store as store
from connector.storage import batch_writes
from connector.storage.approval_store import RecordKey, StoredRequest
from connector.storage.company_models import RequestDependency
from connector.storage.models import ApprovalRequestRow

if TYPE_CHECKING:
    from connector.service.approval_service import ApprovalService

log = logging.getLogger(__name__)
RelatedValues = Mapping[tuple[str, str], Mapping[str, Any]]  # (object, id) -> API values


class DependencyError(FatalError):
    """A `requires:` that cannot be followed (its rule is in no mapping file)."""

    code = "dependency"


@dataclass(frozen=True)
class GateResult:
    hold: str | None = None  # why the request waits
    depends_on: tuple[str, ...] = ()  # request ids it waits for
    reject: str | None = None  # why it cannot proceed at all


def lookup_id(spec: MappingSpec, related: RelatedSpec, values: Mapping[str, Any]) -> str | None:
    """The related record's id from a record's API values (any letter case)."""
    api = spec.fields[related.field].api_name.lower()
    raw = next((v for k, v in values.items() if k.lower() == api), None)
    return None if raw in (None, "") else str(raw)


def read_related(
    adapter: CRMAdapter, mappings: MappingSet, specs: tuple[MappingSpec, ...], values: Mapping[str, Any]
) -> dict[tuple[str, str], dict[str, Any]]:
    """Read every related record a spec's rules require, with the fields its mappings need."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for spec in specs:
        wanted = {req.related for rule in spec.rules for req in rule.requires}
        for name in sorted(wanted):
            related = spec.related[name]
            record_id = lookup_id(spec, related, values)
            if record_id is None or (related.object_type, record_id) in found:
                continue
            their = mappings.for_object(spec.connection, related.object_type)
            fields = sorted({api for other in their for api in other.api_fields()})
            fetched = adapter.get_record(related.object_type, record_id, fields)
            if fetched is not None:
                found[(related.object_type, record_id)] = fetched
    return found


def approval_state(stored: StoredRequest | None, now: datetime) -> str:
    """What `<related>.approval` says: none, waiting, pending, approved, rejected, expired, recalled."""
    if stored is None:
        return "none"
    request = stored.request
    if request.status == "submitted":
        return "pending"
    if request.status == "approved" and request.expires_at is not None and request.expires_at <= now:
        return "expired"
    return request.status


def latest_for(
    session: Session, record: RecordKey, rule_names: tuple[str, ...] | None
) -> StoredRequest | None:
    """The newest request of the related record (for the given rules, or any)."""
    candidates = [
        store.find_latest(session, record, name) for name in (rule_names or _rule_names_of(session, record))
    ]
    present = [c for c in candidates if c is not None]
    return max(present, key=lambda s: s.request.submitted_at) if present else None


def _rule_names_of(session: Session, record: RecordKey) -> tuple[str, ...]:
    rows = session.scalars(
        select(ApprovalRequestRow.rule_name)
        .where(ApprovalRequestRow.connection == record.connection)
        .where(ApprovalRequestRow.object_type == record.object_type)
        .where(ApprovalRequestRow.record_id == record.record_id)
        .distinct()
    )
    return tuple(rows)


def with_states(session: Session, record: RecordKey, spec: MappingSpec, ctx: EvalContext) -> EvalContext:
    """`ctx` with every `<related>.approval` value filled in from our requests."""
    if not spec.related:
        return ctx
    values = dict(ctx.values)
    for name, related in spec.related.items():
        raw = values.get(related.field)
        if raw in (None, ""):
            values[approval_field(name)] = "none"
            continue
        rules = tuple(r.rule for rule in spec.rules for r in rule.requires if r.related == name) or None
        other = RecordKey(record.connection, related.object_type, str(raw))
        values[approval_field(name)] = approval_state(latest_for(session, other, rules), ctx.now)
    return EvalContext(values, ctx.previous, ctx.changed_fields, ctx.today, ctx.now)


@dataclass
class Gate:
    """Decides, when a request with `requires:` opens, whether it may start."""

    mappings: MappingSet
    build_context: Any  # pipeline.build_context (spec, values, previous, changed) -> EvalContext
    service: ApprovalService | None = field(default=None, repr=False)

    def check(
        self,
        session: Session,
        record: RecordKey,
        spec: MappingSpec,
        rule: RuleSpec,
        ctx: EvalContext,
        related_values: RelatedValues,
    ) -> GateResult:
        holds: list[str] = []
        waits: list[str] = []
        for requirement in rule.requires:
            related = spec.related[requirement.related]
            raw = ctx.values.get(related.field)
            if raw in (None, ""):
                return GateResult(reject=f"no {requirement.related} is linked (`{related.field}` is empty)")
            other = RecordKey(record.connection, related.object_type, str(raw))
            their_spec, their_rule = self._rule(record.connection, related, requirement)
            latest = store.find_latest(session, other, requirement.rule)
            state = approval_state(latest, ctx.now)
            if state == "approved" and latest is not None and latest.superseded_by is None:
                continue
            if state == "rejected" and latest is not None:
                reason = latest.request.transitions[-1].comment if latest.request.transitions else None
                return GateResult(reject=_rejected(requirement, other, latest, reason))
            if state not in ("pending", "waiting"):  # none, expired, recalled: ask for it now
                latest = self._open(session, other, their_spec, their_rule, related_values, ctx)
                if latest is None:
                    return GateResult(
                        reject=f"{related.object_type} {other.record_id} could not be read from the CRM"
                    )
                if approval_state(latest, ctx.now) == "approved":
                    continue
            assert latest is not None
            holds.append(
                f"waiting for {requirement.rule} of {related.object_type} {other.record_id} "
                f"(request {latest.request.id})"
            )
            waits.append(latest.request.id)
        if not waits:
            return GateResult()
        return GateResult(hold="; ".join(holds), depends_on=tuple(waits))

    def after_open(
        self, session: Session, stored: StoredRequest, gate: GateResult, spec: MappingSpec, rule: RuleSpec
    ) -> None:
        """Link a held request to what it waits for, or reject it straight away."""
        assert self.service is not None
        now = self.service.clock()
        if gate.reject is not None:
            outcome = fail_waiting(stored.request, reason=gate.reject, now=now)
            if outcome is not None:
                self.service.save_outcome(session, stored, spec, rule, outcome)
            return
        for request_id in gate.depends_on:
            session.add(
                RequestDependency(request_id=stored.request.id, depends_on=request_id, created_at=now)
            )
        session.flush()

    def release(
        self, session: Session, stored: StoredRequest, spec: MappingSpec, rule: RuleSpec, outcome: Outcome
    ) -> None:
        """After-save hook: a closed request releases the requests waiting for it."""
        request = outcome.request
        if request.status not in ("approved", "rejected", "expired", "recalled"):
            return
        if not any(t.kind in ("approved", "rejected", "expired", "recalled") for t in outcome.transitions):
            return
        assert self.service is not None
        waiting_ids = session.scalars(
            select(RequestDependency.request_id).where(RequestDependency.depends_on == request.id)
        )
        for waiting_id in list(waiting_ids):
            self._release_safely(session, waiting_id, request, stored.record)

    def _release_safely(
        self, session: Session, waiting_id: str, decided: ApprovalRequest, where: RecordKey
    ) -> None:
        """A dependent that cannot start (nobody to approve its first step, a broken template, its
        rule gone) must not undo the decision that released it: it is rejected saying why, or,
        if even that fails, left waiting and logged (admins see it under status `waiting`)."""
        try:
            batch_writes.before_savepoint(session)  # a batch's buffered rows go first
            with session.begin_nested():
                self._release_one(session, waiting_id, decided, where)
            return
        except CrmApprovalsError as exc:
            problem = exc
        log.warning("request %s could not be released by %s: %s", waiting_id, decided.id, problem)
        try:
            batch_writes.before_savepoint(session)  # a batch's buffered rows go first
            with session.begin_nested():
                self._reject(session, waiting_id, f"could not start after {decided.rule_name}: {problem}")
        except CrmApprovalsError:
            log.exception("request %s stays waiting: it could not be rejected either", waiting_id)

    def _reject(self, session: Session, waiting_id: str, reason: str) -> None:
        assert self.service is not None
        waiting = store.load(session, waiting_id)
        if waiting is None:
            return
        their_spec, their_rule = self.service.rule_of(waiting)
        outcome = fail_waiting(waiting.request, reason=reason, now=self.service.clock())
        if outcome is not None:
            self.service.save_outcome(session, waiting, their_spec, their_rule, outcome)

    def _release_one(
        self, session: Session, waiting_id: str, decided: ApprovalRequest, where: RecordKey
    ) -> None:
        assert self.service is not None
        waiting = store.load(session, waiting_id)
        if waiting is None or waiting.request.status != "waiting":
            return
        their_spec, their_rule = self.service.rule_of(waiting)
        now = self.service.clock()
        what = f"{where.object_type} {where.record_id}"
        outcome: Outcome | None
        if decided.status == "approved":
            others = session.scalars(
                select(RequestDependency.depends_on).where(RequestDependency.request_id == waiting_id)
            )
            pending = [
                rid for rid in others if rid != decided.id and _status(session, rid) not in ("approved",)
            ]
            if pending:
                return  # still waiting for another dependency
            updates = {
                approval_field(name): "approved"
                for name, related in their_spec.related.items()
                if str(waiting.request.record.get(related.field)) == where.record_id
            }
            outcome = resume(
                waiting.request,
                their_rule,
                their_spec.roles,
                now=now,
                comment=f"{decided.rule_name} of {what} approved (request {decided.id})",
                values=updates,
            )
        else:
            reason = decided.transitions[-1].comment if decided.transitions else None
            why = f"{decided.rule_name} of {what} was {decided.status}" + (f": {reason}" if reason else "")
            outcome = fail_waiting(waiting.request, reason=why, now=now)
        if outcome is not None:
            self.service.save_outcome(session, waiting, their_spec, their_rule, outcome)

    def _rule(
        self, connection: str, related: RelatedSpec, requirement: Requirement
    ) -> tuple[MappingSpec, RuleSpec]:
        for spec in self.mappings.for_object(connection, related.object_type):
            for rule in spec.rules:
                if rule.name == requirement.rule:
                    return spec, rule
        raise DependencyError(
            f"`requires:` names rule {requirement.rule!r} of {related.object_type!r} on {connection!r}, "
            "but no mapping file has it; add that mapping file or fix the rule name"
        )

    def _open(
        self,
        session: Session,
        other: RecordKey,
        spec: MappingSpec,
        rule: RuleSpec,
        related_values: RelatedValues,
        ctx: EvalContext,
    ) -> StoredRequest | None:
        """Open the related record's approval; a concurrent opener's request is used instead."""
        assert self.service is not None
        values = related_values.get((other.object_type, other.record_id))
        if values is None:
            return None
        their_ctx = self.build_context(spec, values, None, set(values))
        try:
            batch_writes.before_savepoint(session)  # a batch's buffered rows go first
            with session.begin_nested():
                self.service.open_for(session, other, spec, rule, their_ctx)
        except IntegrityError:
            log.info("the approval of %s was opened concurrently; waiting for that one", other.ref)
        return store.find_latest(session, other, rule.name)


def _status(session: Session, request_id: str) -> str | None:
    return session.scalar(select(ApprovalRequestRow.status).where(ApprovalRequestRow.id == request_id))


def _rejected(requirement: Requirement, other: RecordKey, latest: StoredRequest, reason: str | None) -> str:
    what = f"{requirement.rule} of {other.object_type} {other.record_id}"
    text = f"{what} was rejected (request {latest.request.id})"
    return text + (f": {reason}" if reason else "")
