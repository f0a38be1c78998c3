"""One retry policy for every adapter (tenacity): retriable errors only (connector.errors.RetriableError,
which every CRM retriable error is), honouring Retry-After."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from tenacity import (
    RetryCallState,
    Retrying,
    nap,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from connector.crm.errors import InDoubtError
from connector.errors import RetriableError
from connector.logs import log_event
from connector.metrics import CRM_RETRIES

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    initial_wait: float = 1.0
    max_wait: float = 60.0
    # Injected so tests run without real sleeping; production uses time.sleep.
    sleep: Callable[[float], None] | None = None

    def wait_seconds(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        hinted = getattr(exc, "retry_after", None)
        if hinted is not None:
            return min(float(hinted), self.max_wait)
        return wait_random_exponential(multiplier=self.initial_wait, max=self.max_wait)(state)

    def call(self, fn: Callable[[], T], *, crm: str = "crm", idempotent: bool = True) -> T:
        """Run `fn`, retrying retriable errors; `crm` (the connection name) labels the log and
        metrics. A call that is not idempotent (a write) is not repeated when it is in doubt:
        the CRM may have applied it (docs/outbox.md)."""

        def retriable(exc: BaseException) -> bool:
            return isinstance(exc, RetriableError) and (idempotent or not isinstance(exc, InDoubtError))

        retrying = Retrying(
            retry=retry_if_exception(retriable),
            stop=stop_after_attempt(self.attempts),
            wait=self.wait_seconds,
            reraise=True,
            before_sleep=lambda state: self._log_retry(crm, state),
            sleep=self.sleep if self.sleep is not None else nap.sleep,
        )
        return retrying(fn)

    def _log_retry(self, crm: str, state: RetryCallState) -> None:
        # The CRM's status and code only: an error's text may carry a URL with a token in it.
        exc = state.outcome.exception() if state.outcome else None
        status = getattr(exc, "status", None)
        code = getattr(exc, "code", None)
        wait = state.next_action.sleep if state.next_action else 0.0
        CRM_RETRIES.labels(crm).inc()
        log_event(
            log,
            logging.WARNING,
            "crm_retry",
            "%s: CRM call failed (%s), retrying in %.1f s (attempt %d of %d)",
            crm,
            ", ".join(str(p) for p in (f"HTTP {status}" if status else None, code) if p)
            or type(exc).__name__,
            wait,
            state.attempt_number + 1,
            self.attempts,
            connection=crm,
            status=status,
            code=code,
            wait_seconds=round(wait, 3),
            attempt=state.attempt_number + 1,
        )


NO_WAIT = RetryPolicy(sleep=lambda _seconds: None)
