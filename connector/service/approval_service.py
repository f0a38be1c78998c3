"""Approval use cases over the database: open or restart requests from record changes,
votes, recall and expiry. The rules themselves live in the pure core
(connector.approvals); this module loads and saves state around them, queues the
write-back actions in the outbox and writes the audit log, all in the caller's transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from connector.approvals.actions import render_outcome_actions
from connector.approvals.errors import ConflictError
from connector.approvals.lifecycle import (
    Outcome,
    cast_vote,
    expire,
    on_record_change,
    open_request,
    reassign,
    recall,
    restart_fields,
)
from connector.approvals.spec import EvalContext, MappingSpec, RuleSpec
from connector.clock import utcnow
from connector.rules import MappingSet
from connector.storage import approval_store as store
from connector.storage import audit
from connector.storage.approval_store import RecordKey, StoredRequest
from connector.storage.db import transaction
from connector.storage.outbox import enqueue_update

SUBMITTER_FIELDS = ("submitter", "owner")  # canonical fields naming who submitted, first found wins


class RuleGoneError(ConflictError):
    code = "rule_gone"
    status = 409


@dataclass
class ApprovalService:
    mappings: MappingSet
    clock: Callable[[], datetime] = utcnow

    # --- record changes (called by the worker, inside the event's transaction) -------

    def on_record_change(
        self, session: Session, record: RecordKey, spec: MappingSpec, ctx: EvalContext
    ) -> list[str]:
        matched = [rule for rule in spec.rules if rule.when(ctx)]
        if spec.match == "first":
            matched = matched[:1]
        summaries = []
        for rule in matched:
            audit.record(
                session,
                "rule_matched",
                **_where(record),
                mapping_hash=spec.content_hash,
                rule=rule.name,
                mapping=spec.source_path,
            )
            summaries.append(f"{rule.name}: {self._apply_rule(session, record, spec, rule, ctx)}")
        return summaries

    def _apply_rule(
        self, session: Session, record: RecordKey, spec: MappingSpec, rule: RuleSpec, ctx: EvalContext
    ) -> str:
        now = self.clock()
        active = store.find_active(session, record, rule.name)
        if active is not None:
            outcome = on_record_change(active.request, rule, spec.roles, ctx, now)
            if outcome is None:
                return f"already pending as {active.request.id}"
            self._commit(session, active, spec, rule, outcome, active.request.version)
            return f"restarted {active.request.id}"
        latest = store.find_latest(session, record, rule.name)
        approved = latest is not None and _still_approved(latest, now)
        if latest is not None and approved and not restart_fields(latest.request, rule, ctx):
            until = latest.request.expires_at or "no expiry"
            return f"already approved by {latest.request.id} until {until}"
        outcome = open_request(
            rule, spec.roles, ctx, record_ref=record.ref, submitter=_submitter(ctx), now=now
        )
        stored = StoredRequest(outcome.request, record, spec.source_path, spec.content_hash)
        self._commit(session, stored, spec, rule, outcome, None)
        if latest is not None and approved:
            store.supersede(session, latest.request.id, outcome.request.id)
        return f"opened {outcome.request.id} ({outcome.request.status})"

    # --- people acting on a request (called by the API) -------------------------------

    def vote(
        self,
        session: Session,
        request_id: str,
        *,
        user: str,
        decision: str,
        step_index: int,
        comment: str | None = None,
        is_admin: bool = False,
    ) -> StoredRequest:
        stored, spec, rule = self._load(session, request_id)
        outcome = cast_vote(
            stored.request,
            rule,
            spec.roles,
            approver=user,
            decision=decision,
            step_index=step_index,
            now=self.clock(),
            comment=comment,
            is_admin=is_admin,
        )
        return self._commit(session, stored, spec, rule, outcome, stored.request.version)

    def recall(
        self, session: Session, request_id: str, *, user: str, comment: str | None, is_admin: bool
    ) -> StoredRequest:
        stored, spec, rule = self._load(session, request_id)
        outcome = recall(stored.request, actor=user, comment=comment, now=self.clock(), is_admin=is_admin)
        return self._commit(session, stored, spec, rule, outcome, stored.request.version)

    def reassign(
        self,
        session: Session,
        request_id: str,
        *,
        user: str,
        step_index: int,
        old: str,
        new: str,
        comment: str | None,
        is_admin: bool,
    ) -> StoredRequest:
        stored, spec, rule = self._load(session, request_id)
        outcome = reassign(
            stored.request,
            step_index=step_index,
            old=old,
            new=new,
            actor=user,
            now=self.clock(),
            comment=comment,
            is_admin=is_admin,
        )
        return self._commit(session, stored, spec, rule, outcome, stored.request.version)

    # --- expiry (periodic job and `crm-approvals sync expire`) -------------------------

    def expire_due(self, sessions: sessionmaker[Session]) -> list[str]:
        """Expire every approved request past its expiry; safe to run at any time."""
        now = self.clock()
        with sessions() as session:
            due = store.ids_due_for_expiry(session, now)
        expired = []
        for request_id in due:
            with transaction(sessions) as session:
                stored = store.load(session, request_id)
                if stored is None:
                    continue
                outcome = expire(stored.request, now)
                if outcome is None:
                    continue  # another run got there first
                spec, rule = self._rule_of(stored)
                self._commit(session, stored, spec, rule, outcome, stored.request.version)
                expired.append(f"{stored.record.ref} ({stored.request.rule_name}, request {request_id})")
        return expired

    # --- shared ---------------------------------------------------------------------

    def _load(self, session: Session, request_id: str) -> tuple[StoredRequest, MappingSpec, RuleSpec]:
        stored = store.load(session, request_id)
        if stored is None:
            raise LookupError(request_id)
        spec, rule = self._rule_of(stored)
        return stored, spec, rule

    def _rule_of(self, stored: StoredRequest) -> tuple[MappingSpec, RuleSpec]:
        record = stored.record
        for spec in self.mappings.for_object(record.connection, record.object_type):
            for rule in spec.rules:
                if rule.name == stored.request.rule_name:
                    return spec, rule
        raise RuleGoneError(
            f"rule {stored.request.rule_name!r} for {record.connection}/{record.object_type} is no longer "
            "in the mapping files; restore it to act on this request"
        )

    def _commit(
        self,
        session: Session,
        stored: StoredRequest,
        spec: MappingSpec,
        rule: RuleSpec,
        outcome: Outcome,
        seen_version: int | None,
    ) -> StoredRequest:
        store.save(session, stored, outcome, seen_version)
        record = stored.record
        for t in outcome.transitions:
            kind = "step_opened" if t.kind == "entered" else "transition"
            audit.record(
                session,
                kind,
                **_where(record),
                request_id=t.request_id,
                actor=t.actor,
                mapping_hash=spec.content_hash,
                transition=t.kind,
                from_status=t.from_status,
                to_status=t.to_status,
                step_index=t.step_index,
                comment=t.comment,
            )
        for v in outcome.votes:
            audit.record(
                session,
                "vote",
                **_where(record),
                request_id=v.request_id,
                actor=v.approver,
                decision=v.decision,
                step_index=v.step_index,
                comment=v.comment,
                acting_admin=v.acting_admin,
            )
        now = self.clock()
        for n, action in enumerate(render_outcome_actions(outcome, rule, now.date(), now)):
            fields = {name: to_wire(value) for name, value in spec.to_api(action.values).items()}
            key = f"{outcome.request.id}:v{outcome.request.version}:{n}:{action.event}"
            enqueue_update(
                session,
                record.connection,
                record.object_type,
                record.record_id,
                fields,
                reason=f"request {outcome.request.id}: {action.event}",
                idempotency_key=key,
            )
            audit.record(
                session,
                "action_queued",
                **_where(record),
                request_id=outcome.request.id,
                event=action.event,
                fields=fields,
            )
        return StoredRequest(
            outcome.request, record, stored.mapping_path, stored.mapping_hash, stored.superseded_by
        )


def _where(record: RecordKey) -> dict[str, str]:
    return {"connection": record.connection, "object_type": record.object_type, "record_id": record.record_id}


def _still_approved(stored: StoredRequest, now: datetime) -> bool:
    request = stored.request
    if request.status != "approved" or stored.superseded_by is not None:
        return False
    return request.expires_at is None or request.expires_at > now


def _submitter(ctx: EvalContext) -> str:
    for name in SUBMITTER_FIELDS:
        value = ctx.values.get(name)
        if value not in (None, ""):
            return str(value)
    return "crm"


def to_wire(value: Any) -> Any:
    """Rendered values -> JSON the CRM accepts (the outbox stores JSON)."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {k: to_wire(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_wire(v) for v in value]
    return value
