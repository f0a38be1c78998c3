"""CRM errors, split the way the Singer SDK splits them: retriable vs fatal.

Retriable (429, 5xx, time-outs, the CRM's own "slow down" codes) are retried with backoff
that honours Retry-After. Fatal ones (validation, bad field, missing record) are never
retried: they go to the dead-letter table with the CRM's own message. A call that timed out
or lost its connection after it was sent is *in doubt* (InDoubtError): the CRM may have
applied it, may still apply it, or not. Reads are retried; writes are not, the outbox
reads the records back first (docs/outbox.md). The two bases here
are the CRM kind of the project-wide ones in connector/errors.py, which the inbox and the
outbox branch on.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from connector import errors


class CRMError(errors.CrmApprovalsError):
    """A CRM refused or failed a call. ``code`` is the CRM's own error code (None when it gave
    none), ``status`` the HTTP status the CRM answered, ``fields`` the fields it named."""

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        fields: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message, code=code)
        self.status = status
        self.fields = fields

    def __str__(self) -> str:
        parts = [f"HTTP {self.status}" if self.status else None, self.code, self.message]
        return ": ".join(p for p in parts if p)


class RetriableError(CRMError, errors.RetriableError):
    """Try again later; `retry_after` is the CRM's own hint in seconds, when it gave one."""

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        code: str | None = None,
        status: int | None = None,
        fields: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message, code=code, status=status, fields=fields)
        self.retry_after = retry_after


class RateLimitedError(RetriableError):
    pass


class InDoubtError(RetriableError):
    """The call went out and no answer came back (read time-out, connection lost, gateway
    time-out): the CRM may apply it, now or later. Safe to repeat only for reads."""


class FatalError(CRMError, errors.FatalError):
    """The CRM refused the request itself; retrying cannot help."""


class NotFoundError(FatalError):
    pass


class AuthError(FatalError):
    """Credentials are wrong or cannot be refreshed: fix the configuration."""


class AuthExpiredError(RetriableError):
    """The session/access token expired; the adapter refreshes it and retries once."""


def parse_retry_after(headers: Mapping[str, str], now: datetime | None = None) -> float | None:
    """Retry-After as seconds (it may be a number or an HTTP date, RFC 9110 §10.2.3)."""
    raw = headers.get("Retry-After") or headers.get("retry-after")
    if not raw:
        return None
    raw = raw.strip()
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
