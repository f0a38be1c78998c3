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

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session, sessionmaker

from connector.approvals.errors import ChainError
from connector.approvals.lifecycle import ApprovalRequest, Outcome
from connector.approvals.spec import MappingSpec, RuleSpec
from connector.approvals.timers import TimerResult, fire_due, next_timer
from connector.clock import utcnow
from connector.config import ConfigError
from connector.notify.queue import NotificationQueue
from connector.notify.timer_notices import queue_timer_notices
from connector.service.escalation import ManagerDirectory, target_resolver
from connector.service.timer_calendars import CalendarLookup
from connector.storage import audit
from connector.storage import timers as timer_rows
from connector.storage.approval_store import StaleRequestError, StoredRequest
from connector.storage.db import transaction

if TYPE_CHECKING:
    from connector.service.approval_service import ApprovalService

log = logging.getLogger(__name__)

BATCH = 500  # rows claimed per round trip
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
    directory: ManagerDirectory
    notifications: NotificationQueue | None = None
    clock: Callable[[], datetime] = utcnow
    batch: int = BATCH
    lease: timedelta = LEASE

    # --- keeping the next due moment (called by ApprovalService._commit) -------------------

    def schedule(self, session: Session, stored: StoredRequest, rule: RuleSpec, outcome: Outcome) -> None:
        request = outcome.request
        try:
            due = next_timer(request, rule, self.calendars(stored.record.connection))
        except ConfigError as exc:  # a half-set business calendar: say so, fall back to no timer
            log.error("step timers of connection %s are off: %s", stored.record.connection, exc)
            due = None
        timer_rows.schedule(session, request.id, due)

    # --- the sweep -------------------------------------------------------------------------

    def sweep(self, service: ApprovalService, sessions: sessionmaker[Session]) -> SweepReport:
        """Act on every timer due now; safe to run in any number of workers at once."""
        now = self.clock()
        report = SweepReport()
        while True:
            with transaction(sessions) as session:
                claim_id, ids = timer_rows.claim_due(session, now, limit=self.batch, lease=self.lease)
            for request_id in ids:
                self._fire(service, sessions, request_id, claim_id, now, report)
            if len(ids) < self.batch:
                return report

    def _fire(
        self,
        service: ApprovalService,
        sessions: sessionmaker[Session],
        request_id: str,
        claim_id: str,
        now: datetime,
        report: SweepReport,
    ) -> None:
        fired: list[TimerResult] = []

        def decide(request: ApprovalRequest, spec: MappingSpec, rule: RuleSpec) -> Outcome | None:
            fired.clear()
            resolver = target_resolver(self.directory, spec.connection, spec.roles)
            result = fire_due(request, rule, spec.roles, self.calendars(spec.connection), now, resolver)
            if result is None:
                return None
            fired.append(result)
            return result.outcome

        def also(session: Session) -> None:
            timer_rows.release(session, request_id, claim_id)
            self._record(session, service, fired[0], report)

        try:
            stored = service.decide_and_save(sessions, request_id, decide, also)
        except (timer_rows.LostClaimError, StaleRequestError):
            report.lost += 1
            return
        except ChainError as exc:  # the time-out moved on to a step nobody can approve
            self._failed(sessions, request_id, claim_id, now, report, str(exc))
            return
        except Exception as exc:  # one request must not stop the sweep; its lease lets it retry later
            log.exception("step timer of request %s failed", request_id)
            report.failed += 1
            report.errors.append(f"{request_id}: {exc}")
            return
        if stored is None:
            self._reschedule(service, sessions, request_id, claim_id, report)
            return
        kind = fired[0].due.kind
        if kind == "remind":
            report.reminded += 1
        elif kind == "escalate" or fired[0].action == "escalate":
            report.escalated += 1
        else:
            report.timed_out += 1

    def _record(
        self, session: Session, service: ApprovalService, result: TimerResult, report: SweepReport
    ) -> None:
        request = result.outcome.request
        stored, spec, rule = service.load_with_rule(session, request.id)
        record = stored.record
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
        audit.record(
            session,
            "timer_fired",
            connection=record.connection,
            object_type=record.object_type,
            record_id=record.record_id,
            request_id=request.id,
            mapping_hash=spec.content_hash,
            timer=result.due.kind,
            due_at=result.due.at.isoformat(),
            step_index=result.due.step_index,
            round=result.due.round,
            action=result.action,
            reason=result.reason,
            added=list(result.added),
            removed=list(result.removed),
            waiting=list(result.waiting),
            notices=notices,
        )

    def _reschedule(
        self,
        service: ApprovalService,
        sessions: sessionmaker[Session],
        request_id: str,
        claim_id: str,
        report: SweepReport,
    ) -> None:
        """Nothing was due (the row was early, or the mapping changed): write the real next moment."""
        try:
            with transaction(sessions) as session:
                timer_rows.release(session, request_id, claim_id)
                stored, _spec, rule = service.load_with_rule(session, request_id)
                self.schedule(session, stored, rule, _as_outcome(stored.request))
        except timer_rows.LostClaimError:
            report.lost += 1
            return
        except Exception as exc:  # the rule is gone, the request is gone: nothing will ever be due
            with transaction(sessions) as session:
                timer_rows.release(session, request_id, claim_id)
                timer_rows.schedule(session, request_id, None)
            log.warning("step timer of request %s dropped: %s", request_id, exc)
        report.rescheduled += 1

    def _failed(
        self,
        sessions: sessionmaker[Session],
        request_id: str,
        claim_id: str,
        now: datetime,
        report: SweepReport,
        error: str,
    ) -> None:
        """Keep the row, leased for a while, so the sweep does not retry it every minute."""
        report.failed += 1
        report.errors.append(f"{request_id}: {error}")
        log.error("step timer of request %s cannot act: %s", request_id, error)
        with transaction(sessions) as session:
            row = session.get(timer_rows.ApprovalTimerRow, request_id)
            if row is not None and row.claim_id == claim_id:
                row.lease_until = now + timedelta(hours=1)


def _as_outcome(request: ApprovalRequest) -> Outcome:
    return Outcome(request=request, transitions=(), votes=(), steps=(), actions=())


def summary(report: SweepReport) -> dict[str, Any]:
    return {k: v for k, v in vars(report).items() if v}
