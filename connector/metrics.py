"""Prometheus metrics (prometheus-client), correct across processes.

`crm-approvals serve` (every gunicorn worker) and `crm-approvals worker` keep their
counters and histograms in files in PROMETHEUS_MULTIPROC_DIR (prometheus-client's
multiprocess mode, set up by `connector.server.prepare_metrics_dir` before this module is
imported); `/metrics` adds every process's files up. Gauges (queue depths and ages, open
dead letters, ...) are not kept per process at all: they are read from the database at
scrape time (connector/service/health.py), so every process reports the same values.

Without PROMETHEUS_MULTIPROC_DIR (tests, one-off commands) the values live in this process.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from connector.crm.errors import (
    AuthError,
    AuthExpiredError,
    CRMError,
    NotFoundError,
    RateLimitedError,
    RetriableError,
)

T = TypeVar("T")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CRM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
HOUR, DAY = 3600.0, 86400.0
DECISION_BUCKETS = (
    300.0,
    900.0,
    HOUR,
    4 * HOUR,
    8 * HOUR,
    DAY,
    2 * DAY,
    3 * DAY,
    7 * DAY,
    14 * DAY,
    30 * DAY,
)

# registry=None: /metrics builds its registry per scrape (render below).
WEBHOOK_EVENTS = Counter(
    "crm_approvals_webhook_events",
    "Record-change events in accepted webhook deliveries; outcome stored, or duplicate (a redelivery).",
    ["connection", "outcome"],
    registry=None,
)
WEBHOOKS_REJECTED = Counter(
    "crm_approvals_webhooks_rejected",
    "Webhook deliveries refused with a 4xx; reason is the error code of the answer.",
    ["connection", "reason"],
    registry=None,
)
CRM_CALLS = Histogram(
    "crm_approvals_crm_call_seconds",
    "Each call to a CRM API (each attempt); outcome ok, rate_limited, retriable, auth, not_found, fatal.",
    ["connection", "outcome"],
    buckets=CRM_BUCKETS,
    registry=None,
)
CRM_RETRIES = Counter(
    "crm_approvals_crm_retries",
    "CRM calls retried after a retriable error (429, 5xx, time-out, rate-limit codes).",
    ["connection"],
    registry=None,
)
INBOX_EVENTS = Counter(
    "crm_approvals_inbox_events_processed",
    "Inbox events the worker took up; outcome done, retried (back off) or dead (dead-lettered).",
    ["outcome"],
    registry=None,
)
OUTBOX_UPDATES = Counter(
    "crm_approvals_outbox_updates",
    "Write-backs settled; outcome done, retried, dead, or confirmed (an in-doubt one found landed).",
    ["connection", "outcome"],
    registry=None,
)
DEAD_LETTERS = Counter(
    "crm_approvals_dead_letters_created",
    "Dead letters created; kind outbox (a refused write-back) or inbox (an event that cannot be processed).",
    ["kind", "connection"],
    registry=None,
)
REQUEST_EVENTS = Counter(
    "crm_approvals_request_events",
    "Approval requests opened, restarted, approved, rejected, recalled and expired, by rule.",
    ["event", "rule"],
    registry=None,
)
DECISION_SECONDS = Histogram(
    "crm_approvals_decision_seconds",
    "Time from a request's submission to its approval or rejection.",
    ["outcome", "rule"],
    buckets=DECISION_BUCKETS,
    registry=None,
)
PROCESS_METRICS = (
    WEBHOOK_EVENTS,
    WEBHOOKS_REJECTED,
    CRM_CALLS,
    CRM_RETRIES,
    INBOX_EVENTS,
    OUTBOX_UPDATES,
    DEAD_LETTERS,
    REQUEST_EVENTS,
    DECISION_SECONDS,
)

# Most specific first.
_OUTCOMES: tuple[tuple[type[CRMError], str], ...] = (
    (RateLimitedError, "rate_limited"),
    (AuthExpiredError, "auth"),
    (RetriableError, "retriable"),
    (AuthError, "auth"),
    (NotFoundError, "not_found"),
    (CRMError, "fatal"),
)


def crm_outcome(exc: BaseException | None) -> str:
    if exc is None:
        return "ok"
    return next((name for cls, name in _OUTCOMES if isinstance(exc, cls)), "error")


def timed_crm_call(connection: str, fn: Callable[[], T]) -> T:
    """Run one CRM call, observing its duration and outcome."""
    started = time.perf_counter()
    outcome = "error"
    try:
        result = fn()
        outcome = "ok"
        return result
    except BaseException as exc:
        outcome = crm_outcome(exc)
        raise
    finally:
        CRM_CALLS.labels(connection, outcome).observe(time.perf_counter() - started)


def count_outcomes(metric: Counter, counts: dict[str, int], **labels: str) -> None:
    for outcome, n in counts.items():
        if n:
            metric.labels(outcome=outcome, **labels).inc(n)


def render(extra: Iterable[Collector] = ()) -> tuple[bytes, str]:
    """The /metrics body and its content type: every process's counters plus `extra`."""
    registry = CollectorRegistry(auto_describe=False)  # collectors run once per scrape
    if os.environ.get(MULTIPROC_ENV):
        MultiProcessCollector(registry)
    else:
        for metric in PROCESS_METRICS:
            registry.register(metric)
    for collector in extra:
        registry.register(collector)
    return generate_latest(registry), CONTENT_TYPE_LATEST
