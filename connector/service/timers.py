"""Step timers over the database: keeping each open step's next due moment, and the worker's
sweep that acts on the due ones (reminders, escalation, time-outs).

Never in-memory timers: `schedule` writes the next due moment (connector/storage/timers.py) in
every transaction that saves a request, and `sweep` (a job of the worker's periodic sweep)
claims the due rows, decides with the pure core (connector/approvals/timers.py) and saves each
outcome like any decision (history, audit, write-back through the outbox, notifications through
the notification outbox) in one transaction that also releases its claim. Exactly once per due
moment: see connector/storage/timers.py and connector/approvals/timers.py.
"""

from __future__ import annotations

import json
import logging
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple, cast

from sqlalchemy import Table, select
from sqlalchemy.orm import Session, sessionmaker

from connector.approvals.actions import RenderedAction
from connector.approvals.business_time import WorkingCalendar
from connector.approvals.errors import ActionRenderError, ChainError
from connector.approvals.lifecycle import ApprovalRequest, Outcome
from connector.approvals.routing import Org
from connector.approvals.spec import MappingSpec, RuleSpec
from connector.approvals.timers import (
    DueTimer,
    Reminder,
    TimerResult,
    decide_step,
    fire_due,
    next_timer,
    step_next_timer,
)
from connector.clock import utcnow
from connector.config import ConfigError
from connector.notify.models import Notification
from connector.notify.queue import NotificationQueue
from connector.notify.timer_notices import notice_facts, queue_timer_notices, reminder_notices
from connector.service.approval_service import ApprovalService, RuleGoneError
from connector.service.escalation import target_resolver
from connector.service.timer_calendars import CalendarLookup
from connector.storage import approval_store as store
from connector.storage import audit, bulk, timer_reads
from connector.storage import timers as timer_rows
from connector.storage.approval_store import StaleRequestError, StoredRequest
from connector.storage.db import collector_paused, sweep_sessions, transaction
from connector.storage.models import ApprovalRequestRow, ApprovalTransitionRow

log = logging.getLogger(__name__)

# rows claimed per round trip, and reminders saved per transaction: 100,000 reminders take
# 9.7 s in batches of 5,000 against 11.2 s in 2,000 (SQLite writes each touched index page
# once per commit); a batch's save holds SQLite's writer lock for about 0.3 s
BATCH = 5000
LEASE = timedelta(minutes=5)  # a claimed row another worker may take over after this


@dataclass
class SweepReport:
    reminded: int = 0
    escalated: int = 0
    timed_out: int = 0
    rescheduled: int = 0  # nothing was due after all (e.g. the mapping changed): next moment written
    lost: int = 0  # the request changed meanwhile, or another worker holds it: the next sweep looks
    failed: int = 0
    notices: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass
class StepTimers:
    """Attached to the ApprovalService (its `timers`): it schedules, the worker sweeps."""

    calendars: CalendarLookup
    orgs: Callable[[str], Org]  # a connection's org chart (connector.directory.org.DirectoryOrg)
    notifications: NotificationQueue | None = None
    clock: Callable[[], datetime] = utcnow
    batch: int = BATCH
    lease: timedelta = LEASE
    # the mapping files' content hashes the open requests' due moments were last computed for
    _computed_for: tuple[str, ...] | None = field(default=None, init=False, repr=False)

    # --- keeping the next due moment (called by ApprovalService._commit) -------------------

    def schedule(self, session: Session, stored: StoredRequest, rule: RuleSpec, outcome: Outcome) -> None:
        if not has_timing(rule):
            # No row to keep (a stale one, left by a mapping change, is dropped by the sweep).
            return
        timer_rows.schedule(session, outcome.request.id, self._next_due(stored, outcome.request, rule))

    def _next_due(self, stored: StoredRequest, request: ApprovalRequest, rule: RuleSpec) -> DueTimer | None:
        if not has_timing(rule):
            return None
        try:
            return next_timer(request, rule, self.calendars(stored.record.connection))
        except ConfigError as exc:  # a half-set business calendar: say so, fall back to no timer
            log.error("step timers of connection %s are off: %s", stored.record.connection, exc)
            return None

    # --- the sweep -------------------------------------------------------------------------

    def sweep(self, service: ApprovalService, sessions: sessionmaker[Session]) -> SweepReport:
        """Act on every timer due now; safe to run in any number of workers at once.

        Per claimed batch: the requests are read in one go and decided (and any write-back
        rendered) with no transaction open, then saved in ONE transaction, each request in its
        own savepoint, so a request changed meanwhile is skipped without undoing the others."""
        now = self.clock()
        report = SweepReport()
        report.rescheduled += self.reschedule_after_mapping_change(service, sessions)
        with sweep_sessions(sessions) as batch_sessions:
            while True:
                with transaction(batch_sessions) as session:
                    claim_id, ids = timer_rows.claim_due(session, now, limit=self.batch, lease=self.lease)
                if ids:
                    with collector_paused():
                        self._fire_batch(service, batch_sessions, ids, claim_id, now, report)
                if len(ids) < self.batch:
                    return report

    def reschedule_after_mapping_change(
        self, service: ApprovalService, sessions: sessionmaker[Session]
    ) -> int:
        """When the mapping files changed (and at the worker's first sweep), compute the next due
        moment afresh for every open request of a rule with step timing: a step that gained
        `remind_every`, or whose interval changed, acts on the new setting. Returns how many."""
        specs = service.mappings.mappings
        key = tuple(sorted(spec.content_hash for spec in specs))
        if key == self._computed_for:
            return 0
        timed = {
            (spec.connection, spec.object_type, rule.name)
            for spec in specs
            for rule in spec.rules
            if has_timing(rule)
        }
        ids: list[str] = []
        if timed:
            with sessions() as session:
                ids = list(
                    session.scalars(
                        select(ApprovalRequestRow.id)
                        .where(ApprovalRequestRow.active_key.is_not(None))
                        .where(ApprovalRequestRow.rule_name.in_({name for _c, _o, name in timed}))
                    )
                )
        count = 0
        for start in range(0, len(ids), self.batch):
            with transaction(sessions) as session:
                dues: dict[str, DueTimer | None] = {}
                for read in timer_reads.load_timer_steps(session, ids[start : start + self.batch]):
                    if (read.connection, read.object_type, read.rule_name) not in timed:
                        continue
                    try:
                        _spec, rule = service.rule_named(read.connection, read.object_type, read.rule_name)
                        dues[read.id] = step_next_timer(read.step, rule, self.calendars(read.connection))
                    except (RuleGoneError, ConfigError):
                        continue
                timer_rows.schedule_many(session, timer_rows.changed(session, dues))
                count += len(dues)
        self._computed_for = key
        return count

    def _fire_batch(
        self,
        service: ApprovalService,
        sessions: sessionmaker[Session],
        ids: list[str],
        claim_id: str,
        now: datetime,
        report: SweepReport,
    ) -> None:
        # Decide on the open steps alone (reminders are saved from them); only escalations
        # and time-outs are read whole. Rules and calendars are looked up once per batch.
        with sessions() as session:
            reads = {read.id: read for read in timer_reads.load_timer_steps(session, ids)}
        rules: dict[tuple[str, str, str], tuple[MappingSpec, RuleSpec] | None] = {}
        calendars: dict[str, WorkingCalendar] = {}
        reminders: list[_Reminded] = []
        decided: list[_Decided] = []
        idle: list[tuple[str, DueTimer | None]] = []  # nothing due: the next due moment to write
        whole: list[str] = []
        for request_id in ids:
            read = reads.get(request_id)
            if read is None:
                idle.append((request_id, None))  # the request is gone
                continue
            key = (read.connection, read.object_type, read.rule_name)
            if key not in rules:
                try:
                    rules[key] = service.rule_named(*key)
                except RuleGoneError:
                    rules[key] = None
            found = rules[key]
            if found is None:
                idle.append((request_id, None))  # its rule is gone
                continue
            spec, rule = found
            try:
                calendar = calendars.get(spec.connection)
                if calendar is None:
                    calendar = calendars[spec.connection] = self.calendars(spec.connection)
                decision = decide_step(read.step, rule, calendar, now)
            except ConfigError as exc:
                self._failed(sessions, request_id, claim_id, now, report, str(exc))
                continue
            if decision.due is None:
                idle.append((request_id, decision.next))
            elif decision.reminder is None:
                whole.append(request_id)
            else:
                reminders.append(_Reminded(read, spec, rule, decision.due, decision.reminder, decision.next))
        if whole:
            self._decide_whole(service, sessions, whole, claim_id, now, report, decided, idle)
        with transaction(sessions) as session:
            self._save_reminders(session, reminders, claim_id, now, report)
            for item in decided:
                self._save(session, service, item, claim_id, report)
            for request_id, due in idle:
                try:
                    with session.begin_nested():
                        timer_rows.release(session, request_id, claim_id)
                        timer_rows.schedule(session, request_id, due)
                    report.rescheduled += 1
                except timer_rows.LostClaimError:
                    report.lost += 1

    def _decide_whole(
        self,
        service: ApprovalService,
        sessions: sessionmaker[Session],
        ids: list[str],
        claim_id: str,
        now: datetime,
        report: SweepReport,
        decided: list[_Decided],
        idle: list[tuple[str, DueTimer | None]],
    ) -> None:
        """Escalations and time-outs: the request read whole, decided and its write-back rendered."""
        with sessions() as session:
            loaded = {stored.request.id: stored for stored in store.load_many(session, ids)}
        for request_id in ids:
            stored = loaded.get(request_id)
            if stored is None:
                idle.append((request_id, None))
                continue
            try:
                spec, rule = service.rule_of(stored)
            except RuleGoneError:
                idle.append((request_id, None))
                continue
            try:
                resolver = target_resolver(self.orgs(spec.connection), spec.roles)
                calendar = self.calendars(spec.connection)
                result = fire_due(stored.request, rule, spec.roles, calendar, now, resolver)
                if result is None:
                    idle.append((request_id, self._next_due(stored, stored.request, rule)))
                    continue
                actions = service.render_actions(result.outcome, rule, stored.record)
            except (ChainError, ActionRenderError, ConfigError) as exc:
                self._failed(sessions, request_id, claim_id, now, report, str(exc))
                continue
            decided.append(_Decided(stored, spec, rule, result, actions))

    def _save_reminders(
        self, session: Session, items: list[_Reminded], claim_id: str, now: datetime, report: SweepReport
    ) -> None:
        """Reminders in bulk: they change nothing but the request's version and history, so
        what `ApprovalService.commit_outcome` writes for them (version-checked request row,
        history row; no write-back, no business event) is written with one statement per table
        and 500 rows, as plain tuples built from the open step alone: the version bumps and the
        next due moments as `UPDATE ... FROM (VALUES ...)`, the history rows, the reminder
        notices and one `timer_fired` audit entry per reminder (docs/decisions.md, "Step
        timers") as multi-row INSERTs. Requests changed since they were read (a vote) or whose
        claim was taken over are left out, as `_save` would."""
        if not items:
            return
        ids = [item.read.id for item in items]
        # lock the rows (PostgreSQL; SQLite's write transaction already holds the database)
        seen = {
            request_id: (version, claim)
            for request_id, version, claim in session.execute(
                select(REQUESTS.c.id, REQUESTS.c.version, TIMERS.c.claim_id)
                .join(TIMERS, TIMERS.c.request_id == REQUESTS.c.id)
                .where(REQUESTS.c.id.in_(ids))
                .with_for_update()
            ).all()
        }
        fresh = [item for item in items if seen.get(item.read.id) == (item.read.version, claim_id)]
        report.lost += len(items) - len(fresh)
        if not fresh:
            return
        # in request id order: the history rows, notices and the audit entries' request index
        # are keyed by request id, so each statement walks those B-trees in key order rather
        # than at random (about a tenth off the INSERTs' time at 100,000 on SQLite)
        fresh.sort(key=lambda item: item.read.id)
        bumped = bulk.update_rows(  # the versions were checked under the lock above; again here
            session,
            REQUESTS,
            ("id", "version"),
            ("version", "updated_at"),
            ((i.read.id, i.read.version, i.read.version + 1, now) for i in fresh),
        )
        if bumped != len(fresh):  # cannot happen under the lock: save nothing of the batch
            raise StaleRequestError(f"{len(fresh) - bumped} of {len(fresh)} reminded requests changed")
        # the history row the pure core's reminder adds (lifecycle._Txn.transition), after the
        # request's last one
        bulk.insert_rows(
            session,
            TRANSITIONS,
            _REMINDED_COLUMNS,
            (
                (
                    r.id,
                    r.last_seq + 1,
                    "reminded",
                    r.status,
                    "pending",
                    i.due.step_index,
                    None,
                    i.reminder.note,
                    now,
                    False,
                )
                for i in fresh
                for r in (i.read,)
            ),  # fmt: skip
        )
        # the notices: a shared chat channel is told once per reminder (its rows share a dedupe
        # key); the key names the new history row, so nothing can be queued under it already
        notices: dict[str, tuple[Any, ...]] = {}
        told: dict[str, int] = {}
        if self.notifications is not None:
            labels: dict[int, dict[int, str]] = {}
            facts_of: dict[tuple[Any, ...], tuple[dict[str, Any], str]] = {}
            for item in fresh:
                read, due, rule = item.read, item.due, item.rule
                step_labels = labels.get(id(rule))
                if step_labels is None:
                    step_labels = labels[id(rule)] = _step_labels(rule)
                fact_key = (id(rule), due.step_index, due.round, item.reminder.sent)
                known = facts_of.get(fact_key)
                if known is None:
                    facts = notice_facts(due, step_labels, len(rule.steps), item.reminder.sent)
                    known = facts_of[fact_key] = (facts, json.dumps(facts))
                facts, context = known
                for user, event, event_key, _facts in reminder_notices(
                    read.id, read.last_seq + 1, item.reminder.waiting, facts
                ):
                    for row in self.notifications.event_rows(
                        read.connection, user, event, event_key, facts, item.spec.roles, read.id
                    ):
                        if row["dedupe_key"] not in notices:
                            row["context"] = context  # the facts, serialised once
                            notices[row["dedupe_key"]] = _notification_values(row)
                            told[read.id] = told.get(read.id, 0) + 1
            bulk.insert_rows(
                session,
                NOTIFICATIONS,
                _NOTIFICATION_COLUMNS,
                notices.values(),
                json_text=("context",),
                ignore_conflicts_on="dedupe_key",
            )
        report.notices += len(notices)
        at = utcnow()
        entries: list[dict[str, Any]] = []
        for item in fresh:
            read, due, reminder = item.read, item.due, item.reminder
            detail = _fired_detail(due, told.get(read.id, 0), waiting=reminder.waiting)
            detail["seq"], detail["comment"] = read.last_seq + 1, reminder.note  # the history row
            entries.append(
                {
                    "at": at,
                    "kind": "timer_fired",
                    "connection": read.connection,
                    "object_type": read.object_type,
                    "record_id": read.record_id,
                    "request_id": read.id,
                    "actor": None,
                    "mapping_hash": item.spec.content_hash,
                    "detail": detail,
                }
            )
        timer_rows.move_many(session, {i.read.id: i.next for i in fresh})  # the claimed rows: they exist
        audit.append_many(session, entries)  # last: it holds the chain head until the commit
        report.reminded += len(fresh)

    def _save(
        self, session: Session, service: ApprovalService, item: _Decided, claim_id: str, report: SweepReport
    ) -> None:
        request_id = item.stored.request.id
        try:
            with session.begin_nested():
                timer_rows.release(session, request_id, claim_id)
                service.commit_outcome(
                    session, item.stored, item.spec, item.rule, item.result.outcome, item.actions
                )
                self._record(session, item, report)
        except (timer_rows.LostClaimError, StaleRequestError):
            report.lost += 1  # changed meanwhile (a vote): its save wrote the next due moment
            return
        except Exception as exc:  # one request must not undo the batch; its lease retries it later
            log.exception("step timer of request %s failed", request_id)
            report.failed += 1
            report.errors.append(f"{request_id}: {exc}")
            return
        result = item.result
        if result.due.kind == "remind":
            report.reminded += 1
        elif result.due.kind == "escalate" or result.action == "escalate":
            report.escalated += 1
        else:
            report.timed_out += 1

    def _record(self, session: Session, item: _Decided, report: SweepReport) -> None:
        result, record, spec, rule = item.result, item.stored.record, item.spec, item.rule
        notices = 0
        if self.notifications is not None:
            notices = queue_timer_notices(
                self.notifications,
                session,
                connection=record.connection,
                result=result,
                roles=spec.roles,
                step_labels={i: step.title for i, step in enumerate(rule.steps)},
                step_count=len(rule.steps),
            )
        report.notices += notices
        self._audit_fired(session, item, notices)

    def _audit_fired(self, session: Session, item: _Decided, notices: int) -> None:
        record = item.stored.record
        audit.record(
            session,
            "timer_fired",
            connection=record.connection,
            object_type=record.object_type,
            record_id=record.record_id,
            request_id=item.result.outcome.request.id,
            mapping_hash=item.spec.content_hash,
            **_result_detail(item.result, notices),
        )

    def _failed(
        self,
        sessions: sessionmaker[Session],
        request_id: str,
        claim_id: str,
        now: datetime,
        report: SweepReport,
        error: str,
    ) -> None:
        """Keep the row, leased for an hour, so the sweep does not retry it every minute."""
        report.failed += 1
        report.errors.append(f"{request_id}: {error}")
        log.error("step timer of request %s cannot act: %s", request_id, error)
        with transaction(sessions) as session:
            row = session.get(timer_rows.ApprovalTimerRow, request_id)
            if row is not None and row.claim_id == claim_id:
                row.lease_until = now + timedelta(hours=1)


class _Reminded(NamedTuple):
    """A reminder decided on a request's open step alone."""

    read: timer_reads.TimerRead
    spec: MappingSpec
    rule: RuleSpec
    due: DueTimer
    reminder: Reminder
    next: DueTimer | None  # the step's next due moment after it


@dataclass(frozen=True)
class _Decided:
    stored: StoredRequest
    spec: MappingSpec
    rule: RuleSpec
    result: TimerResult
    actions: list[RenderedAction]


_REMINDED_COLUMNS = (
    "request_id", "seq", "kind", "from_status", "to_status", "step_index", "actor", "comment", "at",
    "acting_admin",
)  # fmt: skip
_NOTIFICATION_COLUMNS = (
    "dedupe_key", "event", "template", "channel", "connection", "user_id", "email", "target",
    "request_id", "context", "status", "attempts", "created_at",
)  # fmt: skip
_notification_values = operator.itemgetter(*_NOTIFICATION_COLUMNS)  # a row dict's values, in that order
REQUESTS = cast(Table, ApprovalRequestRow.__table__)
TRANSITIONS = cast(Table, ApprovalTransitionRow.__table__)
TIMERS = cast(Table, timer_rows.ApprovalTimerRow.__table__)
NOTIFICATIONS = cast(Table, Notification.__table__)


def _step_labels(rule: RuleSpec) -> dict[int, str]:
    return {n: step.title for n, step in enumerate(rule.steps)}


def _fired_detail(
    due: DueTimer,
    notices: int,
    *,
    waiting: tuple[str, ...] = (),
    added: tuple[str, ...] = (),
    removed: tuple[str, ...] = (),
    action: str | None = None,
    reason: str | None = None,
) -> dict[str, Any]:
    """The `timer_fired` audit entry's detail."""
    return {
        "timer": due.kind,
        "due_at": due.at.isoformat(),
        "step_index": due.step_index,
        "round": due.round,
        "action": action,
        "reason": reason,
        "added": list(added),
        "removed": list(removed),
        "waiting": list(waiting),
        "notices": notices,
    }


def _result_detail(result: TimerResult, notices: int) -> dict[str, Any]:
    return _fired_detail(
        result.due,
        notices,
        waiting=result.waiting,
        added=result.added,
        removed=result.removed,
        action=result.action,
        reason=result.reason,
    )


def summary(report: SweepReport) -> dict[str, Any]:
    return {k: v for k, v in vars(report).items() if v}


def has_timing(rule: RuleSpec) -> bool:
    """Whether any step of the rule reminds, escalates or times out."""
    return any(step.timing is not None for step in rule.steps)
