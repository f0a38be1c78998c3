"""One retry policy for every adapter (tenacity): retriable errors only, honouring Retry-After."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from connector.crm.errors import InDoubtError, RetriableError

T = TypeVar("T")


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

    def call(self, fn: Callable[[], T], *, idempotent: bool = True) -> T:
        """Run `fn`, retrying retriable errors; a call that is not idempotent (a write) is not
        repeated when it is in doubt: the CRM may have applied it (docs/outbox.md)."""
        kwargs = {"sleep": self.sleep} if self.sleep is not None else {}

        def retriable(exc: BaseException) -> bool:
            return isinstance(exc, RetriableError) and (idempotent or not isinstance(exc, InDoubtError))

        retrying = Retrying(
            retry=retry_if_exception(retriable),
            stop=stop_after_attempt(self.attempts),
            wait=self.wait_seconds,
            reraise=True,
            **kwargs,
        )
        return retrying(fn)


NO_WAIT = RetryPolicy(sleep=lambda _seconds: None)
