"""Set-based expiry: thousands of due approvals per statement, memory flat at any count.

Per rule and per chunk of due approvals, in one short transaction:

1. `UPDATE approval_requests ... WHERE id IN (due chunk) RETURNING ...` flips them to
   expired (on PostgreSQL the chunk is picked `FOR UPDATE SKIP LOCKED`, so two sweeps
   running at once split the work instead of colliding);
2. `INSERT INTO approval_transitions ... SELECT` adds their `expired` transition;
3. the rule's `expire` action goes to the outbox with `INSERT ... SELECT` when its values
   do not depend on the request (literals, or templates reading only `today`, `now`,
   `rule`): rendered once per rule. Otherwise each request of the chunk is loaded and
   rendered, and the rows are inserted in one multi-row statement;
4. the submitters' notifications, one multi-row insert;
5. the audit entries (the `expired` transition and the queued action, per request),
   hash-chained in Python and appended with `audit.append_many`, last, as every writer does.

The chunk's rows travel as plain tuples, never ORM objects, and nothing is kept across
chunks but counters. What this writes is what `lifecycle.expire` plus
`ApprovalService._commit` write for one request: the same transition, version bump,
outbox row and idempotency key, notification and audit entries. The write-back then goes
out through the outbox's flush, at the CRM's batch limit.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from jinja2 import meta
from sqlalchemy import String, Table, any_, bindparam, cast, func, insert, literal, select, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Row
from sqlalchemy.orm import Session, sessionmaker

from connector.approvals.actions import render_action, template_variables
from connector.approvals.spec import ActionSpec, MappingSpec, RuleSpec
from connector.clock import utcnow
from connector.logs import log_event
from connector.metrics import REQUEST_EVENTS
from connector.notify.models import PENDING as NOTIFY_PENDING
from connector.notify.models import Notification
from connector.notify.queue import NotificationQueue
from connector.rules.templating import ENVIRONMENT, LiteralValue, TemplateValue
from connector.storage import approval_store as store
from connector.storage import audit
from connector.storage.bulk import insert_rows
from connector.storage.db import sweep_sessions, transaction
from connector.storage.models import (
    PENDING,
    ApprovalRequestRow,
    ApprovalTransitionRow,
    OutboxUpdate,
)
from connector.storage.outbox import lock_records

if TYPE_CHECKING:
    from connector.service.approval_service import ApprovalService

CHUNK = 2000  # approvals per transaction: big enough for few round trips, small enough to stay flat
# variables that are the same for every request of a rule during one sweep
PER_SWEEP_VARIABLES = frozenset({"today", "now", "rule"})
# the request events' logger (connector.service.approval_service): one place to watch them
log = logging.getLogger("connector.service.approval_service")


def cast_table(table: Any) -> Table:
    """A mapped class's __table__ is a Table; the ORM types it as FromClause."""
    assert isinstance(table, Table)
    return table


# the mapped classes' Tables
REQUESTS = cast_table(ApprovalRequestRow.__table__)
TRANSITIONS = cast_table(ApprovalTransitionRow.__table__)
OUTBOX = cast_table(OutboxUpdate.__table__)
NOTIFICATIONS = cast_table(Notification.__table__)
NOTIFICATION_COLUMNS = (
    "dedupe_key", "event", "template", "channel", "connection", "user_id", "target", "request_id",
    "context", "status", "attempts", "created_at",
)  # fmt: skip


@dataclass(frozen=True)
class Expired:
    """One request the sweep expired, as `sync expire` prints it."""

    request_id: str
    ref: str
    rule_name: str


@dataclass
class ExpiryReport:
    expired: int = 0
    by_rule: dict[str, int] = field(default_factory=dict)


def expire_due(
    service: ApprovalService,
    sessions: sessionmaker[Session],
    *,
    chunk: int | None = None,
    on_expired: Callable[[Expired], None] | None = None,
) -> ExpiryReport:
    """Expire every approved, not superseded request with `expires_at <= service.clock()`,
    rule by rule, a chunk per transaction. Requests whose rule is no longer in the mapping
    files are left alone (the sweep cannot render their actions); `sync expire --dry-run`
    lists them. Safe to run at any time and concurrently."""
    now = service.clock()
    chunk = chunk or CHUNK
    report = ExpiryReport()
    for spec, rule in _rules(service, sessions, now):
        expirer = _RuleExpiry(service, spec, rule, now)
        with sweep_sessions(sessions) as chunk_sessions:
            while True:
                with transaction(chunk_sessions) as session:
                    done = expirer.chunk(session, chunk)
                if not done:
                    break
                _announce(rule, spec, done, on_expired)
                report.expired += len(done)
                report.by_rule[rule.name] = report.by_rule.get(rule.name, 0) + len(done)
                if len(done) < chunk:
                    break
    return report


def _rules(
    service: ApprovalService, sessions: sessionmaker[Session], now: datetime
) -> Iterator[tuple[MappingSpec, RuleSpec]]:
    """The rules of the mapping files that have due approvals (one grouped query)."""
    with sessions() as session:
        groups = session.execute(
            select(REQUESTS.c.connection, REQUESTS.c.object_type, REQUESTS.c.rule_name)
            .where(*_due_filter(now))
            .group_by(REQUESTS.c.connection, REQUESTS.c.object_type, REQUESTS.c.rule_name)
        ).all()
    for connection, object_type, rule_name in groups:
        for spec in service.mappings.for_object(connection, object_type):
            rule = next((r for r in spec.rules if r.name == rule_name), None)
            if rule is not None:
                yield spec, rule
                break
        else:
            log.warning(
                "approvals of rule %r on %s/%s are due but the rule is no longer in the mapping files: "
                "restore it so they can expire",
                rule_name,
                connection,
                object_type,
            )


def _due_filter(now: datetime) -> tuple[Any, ...]:
    return (
        REQUESTS.c.status == "approved",
        REQUESTS.c.expires_at <= now,
        REQUESTS.c.superseded_by.is_(None),
    )


class _RuleExpiry:
    """Expires the due approvals of one rule, a chunk at a time."""

    def __init__(self, service: ApprovalService, spec: MappingSpec, rule: RuleSpec, now: datetime) -> None:
        self.service = service
        self.spec = spec
        self.rule = rule
        self.now = now
        self.action = rule.actions.get("expire")
        self.fixed_fields = _fixed_fields(self.action, spec, rule, now)
        self.step_count = len(rule.steps)
        # the queue's own channel choice; another listener has no bulk path to feed
        notify = service.notifications
        self.notify = notify if isinstance(notify, NotificationQueue) else None
        self._channels: dict[tuple[str, str], list[tuple[str, str]]] = {}
        # one detail object for every entry that says the same: audit.append_many hashes it once
        self.transition_detail = {
            "transition": "expired",
            "from_status": "approved",
            "to_status": "expired",
            "step_index": None,
            "comment": None,
        }
        self.fixed_detail = {"event": "expire", "fields": self.fixed_fields} if self.fixed_fields else None

    def chunk(self, session: Session, size: int) -> list[Row[Any, Any, Any, Any, Any, Any]]:
        """Expire up to `size` due approvals in the caller's transaction; their rows
        (id, connection, object_type, record_id, version, submitter)."""
        dialect = session.get_bind().dialect.name
        due = (
            select(REQUESTS.c.id)
            .where(*_due_filter(self.now))
            .where(REQUESTS.c.connection == self.spec.connection)
            .where(REQUESTS.c.object_type == self.spec.object_type)
            .where(REQUESTS.c.rule_name == self.rule.name)
            .order_by(REQUESTS.c.expires_at)  # index order; by id too would sort every tie, each chunk
            .limit(size)
        )
        if dialect == "postgresql":
            due = due.with_for_update(skip_locked=True)
        done = list(
            session.execute(
                update(REQUESTS)
                .where(REQUESTS.c.id.in_(due.scalar_subquery()))
                .values(
                    status="expired",
                    expired_at=self.now,
                    updated_at=self.now,
                    version=REQUESTS.c.version + 1,
                    active_key=None,
                )
                .returning(
                    REQUESTS.c.id,
                    REQUESTS.c.connection,
                    REQUESTS.c.object_type,
                    REQUESTS.c.record_id,
                    REQUESTS.c.version,
                    REQUESTS.c.submitter,
                )
            ).all()
        )
        if not done:
            return []
        done.sort(key=lambda row: row[0])
        ids = [row[0] for row in done]
        seqs = self._transitions(session, ids)
        queued = self._queue_actions(session, done)
        self._notifications(session, done, seqs)
        audit.append_many(session, self._audit_entries(done, queued))
        return done

    def _transitions(self, session: Session, ids: list[str]) -> dict[str, int]:
        """INSERT ... SELECT of each request's `expired` transition; request id -> its seq."""
        previous = (
            select(func.coalesce(func.max(TRANSITIONS.c.seq), 0))
            .where(TRANSITIONS.c.request_id == REQUESTS.c.id)
            .scalar_subquery()
        )
        source = select(
            REQUESTS.c.id,
            previous + 1,
            literal("expired"),
            literal("approved"),
            literal("expired"),
            bindparam("at", self.now, type_=TRANSITIONS.c.at.type),
            literal(False),
        ).where(_among_ids(session))
        rows = session.execute(
            insert(TRANSITIONS)
            .from_select(
                ["request_id", "seq", "kind", "from_status", "to_status", "at", "acting_admin"], source
            )
            .returning(TRANSITIONS.c.request_id, TRANSITIONS.c.seq),
            {"ids": _ids_value(session, ids)},
        ).all()
        return {request_id: seq for request_id, seq in rows}

    def _queue_actions(self, session: Session, done: list[Any]) -> dict[str, dict[str, Any]]:
        """The outbox rows of the rule's `expire` action; request id -> the fields queued."""
        if self.action is None or not self.action.set:
            return {}
        # the per-record lock every outbox writer takes (PostgreSQL), all in one statement
        lock_records(session, ((row[1], row[2], row[3]) for row in done))
        ids = [row[0] for row in done]
        if self.fixed_fields is not None:
            fields = self.fixed_fields
            source = select(
                REQUESTS.c.connection,
                REQUESTS.c.object_type,
                REQUESTS.c.record_id,
                bindparam("fields", fields, type_=OUTBOX.c.fields.type),
                literal("request ") + REQUESTS.c.id + literal(": expire"),
                REQUESTS.c.id + literal(":v") + cast(REQUESTS.c.version, String) + literal(":0:expire"),
                literal(PENDING),
                literal(0),
                bindparam("created", utcnow(), type_=OUTBOX.c.created_at.type),
            ).where(_among_ids(session))
            session.execute(
                insert(OUTBOX).from_select(
                    [
                        "connection",
                        "object_type",
                        "record_id",
                        "fields",
                        "reason",
                        "idempotency_key",
                        "status",
                        "attempts",
                        "created_at",
                    ],
                    source,
                ),
                {"ids": _ids_value(session, ids)},
            )
            return dict.fromkeys(ids, fields)
        return self._render_each(session, ids)

    def _render_each(self, session: Session, ids: list[str]) -> dict[str, dict[str, Any]]:
        """Templates that read the request: load the chunk's requests and render each."""
        from connector.service.approval_service import to_wire

        rows = list(session.scalars(select(ApprovalRequestRow).where(ApprovalRequestRow.id.in_(ids))))
        created = utcnow()
        queued: dict[str, dict[str, Any]] = {}
        values = []
        for stored in store.load_rows(session, rows):
            request = stored.request
            url = (
                f"{self.service.public_base_url}/app/requests/{request.id}"
                if self.service.public_base_url
                else None
            )
            variables = template_variables(request, self.rule, self.now.date(), self.now, request_url=url)
            rendered = render_action(self.action, variables)
            fields = {name: to_wire(value) for name, value in self.spec.to_api(rendered).items()}
            queued[request.id] = fields
            values.append(
                {
                    "connection": stored.record.connection,
                    "object_type": stored.record.object_type,
                    "record_id": stored.record.record_id,
                    "fields": fields,
                    "reason": f"request {request.id}: expire",
                    "idempotency_key": f"{request.id}:v{request.version}:0:expire",
                    "status": PENDING,
                    "attempts": 0,
                    "created_at": created,
                }
            )
        session.expunge_all()
        if values:
            session.execute(insert(OUTBOX), values)
        return queued

    def _notifications(self, session: Session, done: list[Any], seqs: dict[str, int]) -> None:
        """The submitter is told, as `NotificationQueue.on_outcome` tells them."""
        if self.notify is None:
            return
        at = self.now.isoformat()
        facts = {
            "actor": None,
            "comment": None,
            "step_index": None,
            "step_label": None,
            "step_count": self.step_count,
            "at": at,
        }
        context = json.dumps(facts)
        created = utcnow()
        rows = []
        for request_id, connection, _object_type, _record_id, _version, submitter in done:
            key = f"{request_id}:expired:{seqs[request_id]}"
            for channel, target in self._channels_for(connection, submitter):
                recipient = (
                    target if channel == "chat" and not target.startswith("user:") else f"user:{submitter}"
                )
                rows.append(
                    (
                        f"{key}:{recipient}:{channel}"[:400],
                        "expired",
                        "expired",
                        channel,
                        connection,
                        submitter,
                        target or None,
                        request_id,
                        context,
                        NOTIFY_PENDING,
                        0,
                        created,
                    )  # fmt: skip
                )
        # new transitions make new keys: nothing can be queued already
        insert_rows(session, NOTIFICATIONS, NOTIFICATION_COLUMNS, rows, json_text=("context",))

    def _channels_for(self, connection: str, user_id: str) -> list[tuple[str, str]]:
        key = (connection, user_id)
        found = self._channels.get(key)
        if found is None:
            assert self.notify is not None
            found = self._channels[key] = self.notify.channels_for(connection, user_id, self.spec.roles)
        return found

    def _audit_entries(self, done: list[Any], queued: dict[str, dict[str, Any]]) -> Iterator[dict[str, Any]]:
        at = utcnow()
        for request_id, connection, object_type, record_id, _version, _submitter in done:
            yield {
                "at": at,
                "kind": "transition",
                "connection": connection,
                "object_type": object_type,
                "record_id": record_id,
                "request_id": request_id,
                "mapping_hash": self.spec.content_hash,
                "detail": self.transition_detail,
            }
            fields = queued.get(request_id)
            if fields is not None:
                yield {
                    "at": at,
                    "kind": "action_queued",
                    "connection": connection,
                    "object_type": object_type,
                    "record_id": record_id,
                    "request_id": request_id,
                    "detail": self.fixed_detail
                    if fields is self.fixed_fields
                    else {"event": "expire", "fields": fields},
                }


def _among_ids(session: Session) -> Any:
    """`approval_requests.id` is one of the chunk's ids, passed as one parameter `ids`
    (`_ids_value`): a JSON array read by `json_each` on SQLite, an array on PostgreSQL. An IN
    list would be 2,000 parameters for SQLAlchemy to expand and the database to parse, twice
    a chunk."""
    if session.get_bind().dialect.name == "postgresql":
        return REQUESTS.c.id == any_(bindparam("ids", type_=ARRAY(String)))
    listed = func.json_each(bindparam("ids", type_=String)).table_valued("value")
    return REQUESTS.c.id.in_(select(listed.c.value))


def _ids_value(session: Session, ids: list[str]) -> Any:
    return ids if session.get_bind().dialect.name == "postgresql" else json.dumps(ids)


def _fixed_fields(
    action: ActionSpec | None, spec: MappingSpec, rule: RuleSpec, now: datetime
) -> dict[str, Any] | None:
    """The API fields of an action whose values are the same for every request of the rule
    in this sweep, rendered once; None when a value reads the request or the record."""
    from connector.service.approval_service import to_wire

    if action is None:
        return {}
    for renderer in action.set.values():
        if isinstance(renderer, LiteralValue):
            continue
        if not isinstance(renderer, TemplateValue):
            return None  # a renderer we cannot see into: render per request
        read = meta.find_undeclared_variables(ENVIRONMENT.parse(renderer.source)) - set(ENVIRONMENT.globals)
        if not read <= PER_SWEEP_VARIABLES:
            return None
    variables = {
        "today": now.date(),
        "now": now,
        "rule": {
            "name": rule.name,
            "steps": tuple(step.name for step in rule.steps),
            "expires_after": rule.expires_after,
        },
    }
    rendered = render_action(action, variables)
    return {name: to_wire(value) for name, value in spec.to_api(rendered).items()}


def _announce(
    rule: RuleSpec,
    spec: MappingSpec,
    done: list[Row[Any, Any, Any, Any, Any, Any]],
    on_expired: Callable[[Expired], None] | None,
) -> None:
    """Metrics, the INFO line per request (as every request event has) and the caller's
    callback, once the chunk is committed."""
    REQUEST_EVENTS.labels("expired", rule.name).inc(len(done))
    logging_on = log.isEnabledFor(logging.INFO)
    for request_id, connection, object_type, record_id, _version, _submitter in done:
        ref = f"{connection}:{object_type}:{record_id}"
        if logging_on:
            log_event(
                log,
                logging.INFO,
                "request_expired",
                "request %s %s%s: %s rule %s (status %s)",
                request_id,
                "expired",
                "",
                ref,
                rule.name,
                "expired",
                request_id=request_id,
                record=ref,
                rule=rule.name,
                actor=None,
                status="expired",
            )
        if on_expired is not None:
            on_expired(Expired(request_id, ref, rule.name))


__all__ = ["CHUNK", "Expired", "ExpiryReport", "expire_due"]
