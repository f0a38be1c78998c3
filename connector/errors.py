"""The one root of every error this project raises on purpose, split the Singer SDK way.

* :class:`CrmApprovalsError` -- the root: a human ``message``, a machine-readable ``code``
  and, where we know how to fix it, a ``hint``. Every exception class in ``connector/``
  and ``webhooks/`` derives from it (tests/test_errors.py walks the modules to check).
* :class:`RetriableError` -- trying again later may succeed (a CRM rate limit or outage,
  a concurrent change). The inbox and outbox back off and retry, honouring ``retry_after``.
* :class:`FatalError` -- retrying cannot help until a person fixes something (a CRM
  validation error, nobody to approve a step, a broken template or setting). The inbox
  and outbox dead-letter it at once with its message.

Anything else under the root is neither: a refusal of one request (a conflict, a
permission) that the web layer answers with the status in ``webhooks/errors.py``. An
exception outside the root reaching the inbox is a bug: logged, retried, then dead-lettered.

Pure Python on purpose: the domain core (``connector/rules``, ``connector/approvals``)
imports it, and HTTP statuses are chosen in the web layer, never here.
"""

from __future__ import annotations


class CrmApprovalsError(Exception):
    """Base of every error raised on purpose. ``str(error)`` is the human message."""

    # A stable machine-readable code (dead letters, API error bodies). Classes set a default;
    # a CRM error carries the CRM's own code instead, or None when the CRM gave none.
    code: str | None = None
    hint: str | None = None  # how to fix it, when we know

    def __init__(self, message: str, *, code: str | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if hint is not None:
            self.hint = hint


class RetriableError(CrmApprovalsError):
    """Try again later; ``retry_after`` is the server's own hint in seconds, when it gave one."""

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        code: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, code=code, hint=hint)
        self.retry_after = retry_after


class FatalError(CrmApprovalsError):
    """Retrying cannot help: a person must fix the data, the mapping or the configuration."""
