"""Approval use cases over the database: open or restart requests from record changes,
votes, recall and expiry. The rules themselves live in the pure core
(connector.approvals); this module loads and saves state around them, queues the
write-back actions in the outbox and writes the audit log.

Votes, recalls and expiry render their write-back templates while no transaction is open:
the request is read in a short session, decided and rendered with nothing locked (on
SQLite every transaction holds the database's write lock from its start), then saved in
one short transaction if its version is still the one read; a request changed meanwhile
is read and decided again. Record changes run inside the worker's event transaction,
which also reads the record's last-seen values and active requests, so their templates
render there, within the template time budget (connector.rules.template_limits).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy.orm import Session, sessionmaker

from connector.approvals.actions import RenderedAction, render_outcome_actions
from connector.approvals.errors import ConflictError
from connector.approvals.lifecycle import (
    ApprovalRequest,
    Outcome,
    Transition,
    cast_vote,
    delegate_open_step,
    is_active,
    may_see,
    on_record_change,
    open_request,
    reassign,
    recall,
    restart_fields,
)
from connector.approvals.reapproval import carried_steps
from connector.approvals.spec import EvalContext, MappingSpec, RuleSpec
from connector.clock import utcnow
from connector.errors import CrmApprovalsError
from connector.logs import log_event
from connector.metrics import DECISION_SECONDS, REQUEST_EVENTS
from connector.rules import MappingSet
from connector.service.record_guard import guard_pending
from connector.storage import approval_store as store
from connector.storage import audit
from connector.storage.approval_store import RecordKey, StaleRequestError, StoredRequest
from connector.storage.db import after_commit, transaction
from connector.storage.outbox import enqueue_update

if TYPE_CHECKING:
    from connector.service.bulk_expiry import Expired

SUBMITTER_FIELDS = ("submitter", "owner")  # canonical fields naming who submitted, first found wins
SAVE_ATTEMPTS = 3  # a request changed between reading and saving is decided again, this often
# transition kind -> business event, each logged at INFO and counted once committed
BUSINESS_EVENTS = {
    "submitted": "opened",
    "restarted": "restarted",
    "approved": "approved",
    "rejected": "rejected",
    "recalled": "recalled",
    "expired": "expired",
}
log = logging.getLogger(__name__)

# Decides what happens to a request as read (None: nothing to do).
Decision = Callable[[ApprovalRequest, MappingSpec, RuleSpec], Outcome | None]


class RequestNotFoundError(CrmApprovalsError, LookupError):
    """No approval request with that id."""

    code = "not_found"


class RuleGoneError(ConflictError):
    """The request's rule is no longer in the mapping files."""

    code = "rule_gone"


class PeopleLookup(Protocol):
    """Names for ids (connector.directory.Directory), read in the caller's transaction."""

    def display_name(self, connection: str, user_id: str, *, session: Session | None = None) -> str: ...

    def canonical_id(self, connection: str, user_id: str, *, session: Session | None = None) -> str: ...


class RoutingProvider(Protocol):
    """The org chart, queues and deputies for approver resolution
    (connector.service.delegation.RoutingSource)."""

    def context(
        self,
        connection: str,
        roles: Mapping[str, tuple[str, ...]],
        today: date,
        *,
        session: Session | None = None,
    ) -> Mapping[str, tuple[str, ...]]: ...


class OutcomeListener(Protocol):
    """Told of every committed change, in its transaction (connector.notify queues messages)."""

    def on_outcome(
        self,
        session: Session,
        *,
        connection: str,
        outcome: Outcome,
        roles: Mapping[str, tuple[str, ...]],
        step_labels: Mapping[int, str],
        step_count: int,
    ) -> int: ...


class TimerSchedule(Protocol):
    """Keeps each open step's next due moment (connector.service.timers.StepTimers), in the
    transaction that saves the request."""

    def schedule(self, session: Session, stored: StoredRequest, rule: RuleSpec, outcome: Outcome) -> None: ...


@dataclass
class ApprovalService:
    mappings: MappingSet
    clock: Callable[[], datetime] = utcnow
    # issue 10: names in write-back templates, who submitted, and notifications
    people: PeopleLookup | None = None
    notifications: OutcomeListener | None = None
    public_base_url: str = ""
    # CRM user ids who may edit locked fields of a pending record (ADMIN_USERS)
    admins: frozenset[str] = frozenset()
    # issue 11: manager_of / queue approvers and deputies; None = the mapping's roles only
    routing: RoutingProvider | None = None

    def _roles(
        self, connection: str, spec: MappingSpec, session: Session | None = None
    ) -> Mapping[str, tuple[str, ...]]:
        if self.routing is None:
            return spec.roles
        return self.routing.context(connection, spec.roles, self.clock().date(), session=session)

    timers: TimerSchedule | None = None  # issue 11: reminders, escalation, time-outs

    # issue 12: the dependency gate (connector.service.dependencies) and hooks told of every
    # saved outcome in its transaction (dependents released, service step jobs queued, and the
    # approval sheet regenerated after each vote: docs' engineer hooks in here)
    gate: Any = None
    after_save: list[Callable[[Session, StoredRequest, MappingSpec, RuleSpec, Outcome], None]] = field(
        default_factory=list
    )

    # --- record changes (called by the worker, inside the event's transaction) -------

    def on_record_change(
        self,
        session: Session,
        record: RecordKey,
        spec: MappingSpec,
        ctx: EvalContext,
        *,
        replay_since: datetime | None = None,
        modified_by: str | None = None,
        related: Mapping[tuple[str, str], Mapping[str, Any]] | None = None,
    ) -> list[str]:
        """Open, restart or leave requests for the rules the change matches.

        `replay_since` (an event ops re-ran: when it first arrived) leaves alone every rule
        that has a request submitted since then, so a replay never opens anything twice.
        `modified_by` (the CRM user who made the change) casts votes from the CRM and judges
        edits of locked fields (connector.service.record_guard)."""
        matched = [rule for rule in spec.rules if rule.when(ctx)]
        if spec.match == "first":
            matched = matched[:1]
        summaries = []
        for rule in matched:
            if replay_since is not None:
                latest = store.find_latest(session, record, rule.name)
                if latest is not None and latest.request.submitted_at >= replay_since:
                    summaries.append(
                        f"{rule.name}: {latest.request.id} opened since the event; left as it is"
                    )
                    continue
            audit.record(
                session,
                "rule_matched",
                **_where(record),
                mapping_hash=spec.content_hash,
                rule=rule.name,
                mapping=spec.source_path,
            )
            # A replayed event's vote or locked-field edit was judged when it first came.
            judged_by = modified_by if replay_since is None else None
            guard = replay_since is None
            done = self._apply_rule(session, record, spec, rule, ctx, judged_by, related or {}, guard=guard)
            summaries.append(f"{rule.name}: {done}")
        if replay_since is None:
            unmatched = [r for r in spec.rules if r not in matched]
            summaries += self._guard_unmatched(session, record, spec, unmatched, ctx, modified_by)
        return summaries

    def _guard_unmatched(
        self,
        session: Session,
        record: RecordKey,
        spec: MappingSpec,
        rules: list[RuleSpec],
        ctx: EvalContext,
        modified_by: str | None,
    ) -> list[str]:
        """A pending request's locked fields and decision field count even when the edit makes
        the record stop matching its rule (a locked stage moved to one the rule leaves out)."""
        summaries = []
        for rule in rules:
            if rule.crm_vote is None and rule.lock is None:
                continue
            active = store.find_active(session, record, rule.name)
            if active is not None:
                _, notes = guard_pending(self, session, record, spec, rule, active, ctx, modified_by)
                summaries += [f"{rule.name}: {note}" for note in notes]
        return summaries

    def _apply_rule(
        self,
        session: Session,
        record: RecordKey,
        spec: MappingSpec,
        rule: RuleSpec,
        ctx: EvalContext,
        modified_by: str | None = None,
        related: Mapping[tuple[str, str], Mapping[str, Any]] | None = None,
        *,
        guard: bool = True,
    ) -> str:
        now = self.clock()
        active = store.find_active(session, record, rule.name)
        if active is not None:
            roles = self._roles(record.connection, spec, session)
            notes: list[str] = []
            if guard:
                active, notes = guard_pending(self, session, record, spec, rule, active, ctx, modified_by)
            before = active.request
            outcome = on_record_change(
                before,
                rule,
                roles,
                ctx,
                now,
                carried=lambda c: carried_steps(rule, before, c.values, roles),
            )
            if outcome is None:
                done = "; ".join(notes)
                if not is_active(before):
                    return f"{done}: {before.id} is {before.status}"
                return f"{done}; still pending as {before.id}" if done else f"already pending as {before.id}"
            actions = self.render_actions(outcome, rule, record, session)
            self._commit(session, active, spec, rule, outcome, active.request.version, actions)
            return f"restarted {active.request.id}"
        latest = store.find_latest(session, record, rule.name)
        approved = latest is not None and _still_approved(latest, now)
        if latest is not None and approved and not restart_fields(latest.request, rule, ctx):
            until = latest.request.expires_at or "no expiry"
            return f"already approved by {latest.request.id} until {until}"
        gate = None
        if self.gate is not None and rule.requires:
            gate = self.gate.check(session, record, spec, rule, ctx, related or {})
        stored = self.open_for(
            session, record, spec, rule, ctx, hold=gate.hold or gate.reject if gate else None, latest=latest
        )
        status = stored.request.status
        if gate is not None and (gate.hold or gate.reject):
            self.gate.after_open(session, stored, gate, spec, rule)
            reloaded = store.load(session, stored.request.id)  # the gate may have decided it
            status = reloaded.request.status if reloaded else status
        if latest is not None and approved:
            store.supersede(session, latest.request.id, stored.request.id)
        return f"opened {stored.request.id} ({status})"

    def open_for(
        self,
        session: Session,
        record: RecordKey,
        spec: MappingSpec,
        rule: RuleSpec,
        ctx: EvalContext,
        hold: str | None = None,
        latest: StoredRequest | None = None,
    ) -> StoredRequest:
        """Open a request of `rule` for the record, in the caller's transaction (`hold`: waiting;
        `latest`: the record's previous request of the rule, for smart re-approval)."""
        submitter = _submitter(ctx)
        if self.people is not None:  # e.g. HubSpot's hs_updated_by_user_id is a user id, not an owner id
            submitter = self.people.canonical_id(record.connection, submitter, session=session)
        roles = self._roles(record.connection, spec, session)
        # Smart re-approval: a resubmitted rejected record keeps the approvals of unchanged steps.
        carried = (
            carried_steps(rule, latest.request, ctx.values, roles)
            if latest is not None and latest.request.status == "rejected"
            else None
        )
        outcome = open_request(
            rule,
            roles,
            ctx,
            record_ref=record.ref,
            submitter=submitter,
            now=self.clock(),
            carried=carried,
            hold=hold,
        )
        stored = StoredRequest(outcome.request, record, spec.source_path, spec.content_hash)
        return self._commit(
            session, stored, spec, rule, outcome, None, self.render_actions(outcome, rule, record, session)
        )

    def save_outcome(
        self, session: Session, stored: StoredRequest, spec: MappingSpec, rule: RuleSpec, outcome: Outcome
    ) -> StoredRequest:
        """Save an outcome decided on `stored` in the caller's transaction (rendered there)."""
        actions = self.render_actions(outcome, rule, stored.record, session)
        return self._commit(session, stored, spec, rule, outcome, stored.request.version, actions)

    # --- people acting on a request (called by the API) -------------------------------

    def vote(
        self,
        sessions: sessionmaker[Session],
        request_id: str,
        *,
        user: str,
        decision: str,
        step_index: int | None = None,
        comment: str | None = None,
        is_admin: bool = False,
        also: Callable[[Session], None] | None = None,
    ) -> StoredRequest:
        """A vote on the step `step_index` (None: the request's current step), saved in its own
        transaction, with `also(session)` in it (e.g. spending a one-click link, so a refused
        vote leaves the link usable). Raises RequestNotFoundError for an unknown id,
        ApprovalError when refused."""

        def decide(request: ApprovalRequest, spec: MappingSpec, rule: RuleSpec) -> Outcome:
            _require_visible(request, user, is_admin)
            index = request.current_step if step_index is None else step_index
            return cast_vote(
                request,
                rule,
                self._roles(spec.connection, spec),
                approver=user,
                decision=decision,
                step_index=-1 if index is None else index,  # closed: the engine says so
                now=self.clock(),
                comment=comment,
                is_admin=is_admin,
            )

        return _decided(self.decide_and_save(sessions, request_id, decide, also))

    def recall(
        self,
        sessions: sessionmaker[Session],
        request_id: str,
        *,
        user: str,
        comment: str | None,
        is_admin: bool,
    ) -> StoredRequest:
        """Withdraw a request, saved in its own transaction (errors as for `vote`)."""

        def decide(request: ApprovalRequest, _spec: MappingSpec, _rule: RuleSpec) -> Outcome:
            _require_visible(request, user, is_admin)
            return recall(request, actor=user, comment=comment, now=self.clock(), is_admin=is_admin)

        return _decided(self.decide_and_save(sessions, request_id, decide))

    def reassign(
        self,
        sessions: sessionmaker[Session],
        request_id: str,
        *,
        user: str,
        step_index: int,
        old: str,
        new: str,
        comment: str | None,
        is_admin: bool,
    ) -> StoredRequest:
        """Give a step's approver `old`'s place to `new` (admins), saved like a vote."""

        def decide(request: ApprovalRequest, _spec: MappingSpec, _rule: RuleSpec) -> Outcome:
            return reassign(
                request,
                step_index=step_index,
                old=old,
                new=new,
                actor=user,
                now=self.clock(),
                comment=comment,
                is_admin=is_admin,
            )

        return _decided(self.decide_and_save(sessions, request_id, decide))

    def delegate(self, sessions: sessionmaker[Session], request_id: str) -> StoredRequest | None:
        """Hand places on the open step to deputies of approvers away today (None: nothing to
        hand over), saved like a vote (connector.service.delegation)."""

        def decide(request: ApprovalRequest, spec: MappingSpec, rule: RuleSpec) -> Outcome | None:
            roles = self._roles(spec.connection, spec)
            return delegate_open_step(request, rule, roles, self.clock())

        return self.decide_and_save(sessions, request_id, decide)

    # --- expiry (periodic job and `crm-approvals sync expire`) -------------------------

    def expire_due(
        self,
        sessions: sessionmaker[Session],
        on_expired: Callable[[Expired], None] | None = None,
    ) -> int:
        """Expire every approved request past its expiry, set-based (connector.service.bulk_expiry);
        safe to run at any time. Returns how many expired; `on_expired` hears of each one."""
        from connector.service.bulk_expiry import expire_due

        return expire_due(self, sessions, on_expired=on_expired).expired

    # --- shared ---------------------------------------------------------------------

    # for use cases that save outcomes in their own transactions (step timers)

    def commit_outcome(
        self,
        session: Session,
        stored: StoredRequest,
        spec: MappingSpec,
        rule: RuleSpec,
        outcome: Outcome,
        actions: list[RenderedAction],
    ) -> StoredRequest:
        """Save an outcome decided on `stored` as a vote's is saved (history, audit, write-back,
        notifications, next timer), in the caller's transaction; StaleRequestError when the
        request changed since it was read."""
        return self._commit(session, stored, spec, rule, outcome, stored.request.version, actions)

    def load(self, session: Session, request_id: str) -> tuple[StoredRequest, MappingSpec, RuleSpec]:
        stored = store.load(session, request_id)
        if stored is None:
            raise RequestNotFoundError(request_id)
        spec, rule = self.rule_of(stored)
        return stored, spec, rule

    def rule_of(self, stored: StoredRequest) -> tuple[MappingSpec, RuleSpec]:
        """The request's mapping and rule (RuleGoneError when the rule is no longer loaded)."""
        record = stored.record
        return self.rule_named(record.connection, record.object_type, stored.request.rule_name)

    def rule_named(self, connection: str, object_type: str, rule_name: str) -> tuple[MappingSpec, RuleSpec]:
        """The mapping and rule a request of this connection, object and rule name follows
        (RuleGoneError when the rule is no longer loaded)."""
        for spec in self.mappings.for_object(connection, object_type):
            for rule in spec.rules:
                if rule.name == rule_name:
                    return spec, rule
        raise RuleGoneError(
            f"rule {rule_name!r} for {connection}/{object_type} is no longer "
            "in the mapping files; restore it to act on this request"
        )

    def decide_and_save(
        self,
        sessions: sessionmaker[Session],
        request_id: str,
        decide: Decision,
        also: Callable[[Session], None] | None = None,
    ) -> StoredRequest | None:
        """Read, decide and render with no transaction open, then save in a short one (module
        docstring); None when `decide` finds nothing to do."""
        for attempt in range(1, SAVE_ATTEMPTS + 1):
            # a read, ended with COMMIT: at the ROLLBACK of a plain close psycopg forgets
            # every statement it prepared on the connection (and sends DEALLOCATE ALL)
            with transaction(sessions) as session:
                stored, spec, rule = self.load(session, request_id)
            outcome = decide(stored.request, spec, rule)
            if outcome is None:
                return None
            actions = self.render_actions(outcome, rule, stored.record)
            try:
                with transaction(sessions) as session:
                    if also is not None:
                        also(session)
                    return self._commit(session, stored, spec, rule, outcome, stored.request.version, actions)
            except StaleRequestError:
                if attempt == SAVE_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def render_actions(
        self, outcome: Outcome, rule: RuleSpec, record: RecordKey, session: Session | None = None
    ) -> list[RenderedAction]:
        """The outcome's actions, rendered; `session` is the caller's open one, if any (names of
        approvers are read through it), else the directory reads with its own."""
        now = self.clock()
        people = self.people
        names = (
            (lambda user: people.display_name(record.connection, user, session=session))
            if people is not None
            else None
        )
        url = f"{self.public_base_url}/app/requests/{outcome.request.id}" if self.public_base_url else None
        return render_outcome_actions(outcome, rule, now.date(), now, names=names, request_url=url)

    def _commit(
        self,
        session: Session,
        stored: StoredRequest,
        spec: MappingSpec,
        rule: RuleSpec,
        outcome: Outcome,
        seen_version: int | None,
        actions: list[RenderedAction],
    ) -> StoredRequest:
        store.save(session, stored, outcome, seen_version)
        record = stored.record
        if self.timers is not None:
            self.timers.schedule(session, stored, rule, outcome)
        for t in outcome.transitions:
            if t.kind in BUSINESS_EVENTS:
                after_commit(session, partial(_announce, outcome.request, record, t))
            audit_transition(session, record, spec, t)
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
                on_behalf_of=v.on_behalf_of,
                auto_reason=v.auto_reason,
            )
        for n, action in enumerate(actions):
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
                later=seen_version is None,  # a new request's row may join its batch's INSERT
            )
            audit.record(
                session,
                "action_queued",
                **_where(record),
                request_id=outcome.request.id,
                event=action.event,
                fields=fields,
            )
        if self.notifications is not None:
            self.notifications.on_outcome(
                session,
                connection=record.connection,
                outcome=outcome,
                roles=spec.roles,
                step_labels={i: step.title for i, step in enumerate(rule.steps)},
                step_count=len(rule.steps),
            )
        saved = StoredRequest(
            outcome.request, record, stored.mapping_path, stored.mapping_hash, stored.superseded_by
        )
        for hook in self.after_save:
            hook(session, saved, spec, rule, outcome)
        return saved


def _announce(request: ApprovalRequest, record: RecordKey, t: Transition) -> None:
    """One INFO line and the metrics per business event, once it is committed."""
    event = BUSINESS_EVENTS[t.kind]
    REQUEST_EVENTS.labels(event, request.rule_name).inc()
    if event in ("approved", "rejected"):
        seconds = max((t.at - request.submitted_at).total_seconds(), 0.0)
        DECISION_SECONDS.labels(event, request.rule_name).observe(seconds)
    by = f" by {t.actor}" if t.actor else ""
    log_event(
        log,
        logging.INFO,
        f"request_{event}",
        "request %s %s%s: %s rule %s (status %s)",
        request.id,
        event,
        by,
        record.ref,
        request.rule_name,
        request.status,
        request_id=request.id,
        record=record.ref,
        rule=request.rule_name,
        actor=t.actor,
        status=request.status,
    )


def _decided(saved: StoredRequest | None) -> StoredRequest:
    if saved is None:  # votes and recalls always decide something, or raise
        raise AssertionError("a vote or recall decided nothing")
    return saved


def audit_transition(session: Session, record: RecordKey, spec: MappingSpec, t: Transition) -> None:
    """The audit entry of one history row (a step opening is its own kind)."""
    audit.record(
        session,
        "step_opened" if t.kind == "entered" else "transition",
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


def _require_visible(request: ApprovalRequest, user: str, is_admin: bool) -> None:
    """A request the actor may not see is "not found" for every action, as for reading it (no
    403 that would confirm it exists and name its submitter)."""
    if not may_see(request, user, is_admin):
        raise RequestNotFoundError(request.id)
