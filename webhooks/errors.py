"""Refusals, and the one place HTTP statuses are chosen.

Every bad delivery or API call gets a JSON body saying what was wrong, where, and how to fix
it. Code outside the web layer raises errors of the root in connector/errors.py without any
HTTP status; `ERROR_STATUS` below chooses one for each class the web layer answers, and
`refusal` turns an error into the `WebhookError` that is sent. A 500 is kept for bugs.
"""

from __future__ import annotations

import logging

from connector.approvals.errors import (
    ActionRenderError,
    ChainError,
    ConflictError,
    DelegationNotFoundError,
    InvalidDecisionError,
    InvalidDelegationError,
    PermissionDeniedError,
    RuleMismatchError,
)
from connector.config import ConfigError
from connector.errors import CrmApprovalsError

log = logging.getLogger("webhooks")


class WebhookError(CrmApprovalsError):
    """A refusal the web layer sends as it is: its own status, code, message and hint."""

    code: str

    def __init__(self, status: int, code: str, message: str, hint: str | None = None) -> None:
        super().__init__(message, code=code, hint=hint)
        self.status = status

    def to_json(self) -> dict[str, object]:
        body: dict[str, object] = {"code": self.code, "message": self.message}
        if self.hint:
            body["hint"] = self.hint
        return {"error": body}


def bad_request(code: str, message: str, hint: str | None = None) -> WebhookError:
    return WebhookError(400, code, message, hint)


def unauthorized(code: str, message: str, hint: str | None = None) -> WebhookError:
    return WebhookError(401, code, message, hint)


# The status of each error class the web layer answers, the first matching class wins
# (docs/api.md lists them). 4xx: the caller can fix it; 503: the server's configuration
# (a mapping file, a setting) stops it until an admin fixes it, the message says what.
ERROR_STATUS: tuple[tuple[type[CrmApprovalsError], int], ...] = (
    (InvalidDecisionError, 400),
    (InvalidDelegationError, 400),  # with DelegationCycleError
    (DelegationNotFoundError, 404),
    (PermissionDeniedError, 403),
    (ConflictError, 409),  # with StaleRequestError and RuleGoneError
    (RuleMismatchError, 409),
    (ChainError, 422),
    (ActionRenderError, 503),  # an admin's template failed at vote time: not the voter's fault
    (ConfigError, 503),
)


def http_status(error: CrmApprovalsError) -> int | None:
    """The status chosen for `error`; None when none is (a class missing from ERROR_STATUS)."""
    if isinstance(error, WebhookError):
        return error.status
    return next((status for cls, status in ERROR_STATUS if isinstance(error, cls)), None)


def refusal(error: CrmApprovalsError, hint: str | None = None) -> WebhookError:
    """The answer to send for `error`; `hint` overrides the error's own. An error whose class
    has no status is a bug: logged with its stack and answered as a bare 500."""
    if isinstance(error, WebhookError):
        return error
    status = http_status(error)
    if status is None:
        log.error(
            "no HTTP status is chosen for %s (webhooks/errors.py)", type(error).__name__, exc_info=error
        )
        return WebhookError(500, "internal_error", "internal error")
    return WebhookError(status, error.code or "error", str(error), hint or error.hint)
