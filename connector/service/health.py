"""What /healthz and /metrics report about the system, read at request time from sources
every process shares, so every gunicorn worker tells the same truth:

* the database: reachable; inbox events and outbox updates waiting (count, oldest);
  open dead letters (count, oldest); approval requests by status;
* the queue (huey's storage): reachable;
* the mapping files on disk: compared by content hash with what this process loaded,
  reloaded when they differ, and their errors reported (the last good set stays active).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from connector.clock import utcnow
from connector.rules.loader import load_mapping_dir
from connector.runtime import Runtime
from connector.storage import dead_letters
from connector.storage.models import PENDING, SENDING, ApprovalRequestRow, InboxEvent, OutboxUpdate


@dataclass(frozen=True)
class Backlog:
    count: int
    oldest: datetime | None

    def age_seconds(self, now: datetime) -> float:
        return max((now - self.oldest).total_seconds(), 0.0) if self.oldest is not None else 0.0

    def to_json(self, now: datetime) -> dict[str, Any]:
        return {
            "count": self.count,
            "oldest_at": self.oldest.isoformat() if self.oldest is not None else None,
            "oldest_age_seconds": round(self.age_seconds(now), 1) if self.oldest is not None else None,
        }


@dataclass
class Health:
    checked_at: datetime
    mapping_errors: list[str] = field(default_factory=list)
    database_error: str | None = None
    queue_error: str | None = None
    inbox: Backlog | None = None  # pending events; None when the database did not answer
    outbox: Backlog | None = None  # pending and in-flight updates
    outbox_sending: int = 0
    dead_letters: Backlog | None = None  # unresolved
    requests: dict[str, int] = field(default_factory=dict)  # status -> count

    @property
    def ready(self) -> bool:
        """Whether this process can take webhooks: they are stored in the database."""
        return self.database_error is None

    def warnings(self) -> list[str]:
        found = []
        if self.database_error is not None:
            found.append(f"database unreachable: {self.database_error}")
        if self.queue_error is not None:
            found.append(
                f"queue unreachable: {self.queue_error} (webhooks are still stored; "
                "the worker's sweep picks them up every minute)"
            )
        if self.mapping_errors:
            found.append(
                f"{len(self.mapping_errors)} mapping error(s): the last good set of mapping files is "
                "active; run `crm-approvals validate`"
            )
        if self.dead_letters is not None and self.dead_letters.count:
            found.append(
                f"{self.dead_letters.count} open dead letter(s): see `crm-approvals dead-letters list`"
            )
        return found

    def to_json(self) -> dict[str, Any]:
        now = self.checked_at

        def backlog(value: Backlog | None) -> dict[str, Any] | None:
            return value.to_json(now) if value is not None else None

        outbox = backlog(self.outbox)
        if outbox is not None:
            outbox["sending"] = self.outbox_sending
        return {
            "status": "ok" if self.ready else "unavailable",
            "checked_at": now.isoformat(),
            "database": {"ok": self.database_error is None, "error": self.database_error},
            "queue": {"ok": self.queue_error is None, "error": self.queue_error},
            "mapping_errors": self.mapping_errors,
            "inbox_pending": backlog(self.inbox),
            "outbox_pending": outbox,
            "dead_letters": backlog(self.dead_letters),
            "warnings": self.warnings(),
        }


def check(runtime: Runtime, queue_probe: Callable[[], object] | None = None) -> Health:
    """Look at everything now. Never raises: what failed is in the result."""
    health = Health(checked_at=utcnow(), mapping_errors=mapping_errors(runtime))
    try:
        with runtime.sessions() as session:
            session.execute(text("SELECT 1"))
            _read_database(session, health)
    except Exception as exc:  # any driver error: the database is what is broken
        health.database_error = _one_line(exc)
    if queue_probe is not None:
        try:
            queue_probe()
        except Exception as exc:
            health.queue_error = _one_line(exc)
    return health


def mapping_errors(runtime: Runtime) -> list[str]:
    """Errors of the mapping files as they are on disk now (by content, not modification time)."""
    from connector.service.pipeline import refresh_mappings

    if runtime.mappings is not None:
        refresh_mappings(runtime.mappings, min_interval=0)  # reloads only when the content changed
        return [str(e) for e in runtime.mappings.errors]
    return [str(e) for e in load_mapping_dir(runtime.settings.mappings_dir).errors]


def _read_database(session: Session, health: Health) -> None:
    count, oldest = session.execute(
        select(func.count(), func.min(InboxEvent.received_at)).where(InboxEvent.status == PENDING)
    ).one()
    health.inbox = Backlog(int(count or 0), oldest)
    waiting = {
        status: (int(n or 0), first)
        for status, n, first in session.execute(
            select(OutboxUpdate.status, func.count(), func.min(OutboxUpdate.created_at))
            .where(OutboxUpdate.status.in_((PENDING, SENDING)))
            .group_by(OutboxUpdate.status)
        )
    }
    firsts = [first for _n, first in waiting.values() if first is not None]
    health.outbox = Backlog(sum(n for n, _first in waiting.values()), min(firsts) if firsts else None)
    health.outbox_sending = waiting.get(SENDING, (0, None))[0]
    health.dead_letters = Backlog(*dead_letters.open_summary(session))
    health.requests = {
        status: int(n)
        for status, n in session.execute(
            select(ApprovalRequestRow.status, func.count()).group_by(ApprovalRequestRow.status)
        )
    }


def _one_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


class HealthCollector(Collector):
    """The gauges of /metrics, computed from `read()` at each scrape."""

    def __init__(self, read: Callable[[], Health]) -> None:
        self.read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        health = self.read()
        now = health.checked_at
        yield _gauge("crm_approvals_database_up", "1 when the database answered.", health.ready)
        yield _gauge("crm_approvals_queue_up", "1 when the queue answered.", health.queue_error is None)
        yield _gauge(
            "crm_approvals_mapping_errors",
            "Errors in the mapping files on disk (the last good set stays active meanwhile).",
            len(health.mapping_errors),
        )
        if health.inbox is not None:
            yield _gauge(
                "crm_approvals_inbox_pending", "Inbox events waiting to be processed.", health.inbox.count
            )
            yield _gauge(
                "crm_approvals_inbox_oldest_pending_age_seconds",
                "Age of the oldest inbox event waiting (0 when none).",
                health.inbox.age_seconds(now),
            )
        if health.outbox is not None:
            pending = GaugeMetricFamily(
                "crm_approvals_outbox_pending",
                "Write-backs waiting (pending) or in flight (sending).",
                labels=["status"],
            )
            pending.add_metric(["pending"], health.outbox.count - health.outbox_sending)
            pending.add_metric(["sending"], health.outbox_sending)
            yield pending
            yield _gauge(
                "crm_approvals_outbox_oldest_pending_age_seconds",
                "Age of the oldest write-back waiting or in flight (0 when none).",
                health.outbox.age_seconds(now),
            )
        if health.dead_letters is not None:
            yield _gauge(
                "crm_approvals_dead_letters_open", "Unresolved dead letters.", health.dead_letters.count
            )
            yield _gauge(
                "crm_approvals_dead_letters_oldest_age_seconds",
                "Age of the oldest unresolved dead letter (0 when none).",
                health.dead_letters.age_seconds(now),
            )
        requests = GaugeMetricFamily(
            "crm_approvals_requests", "Approval requests by status.", labels=["status"]
        )
        for status, count in sorted(health.requests.items()):
            requests.add_metric([status], count)
        yield requests


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=float(value))
