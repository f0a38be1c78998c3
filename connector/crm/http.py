"""HTTP for the requests-based adapters: a time-out on every call, and one place that
turns responses into our retriable/fatal errors (cf. simple-salesforce's status map)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import requests
from urllib3.exceptions import NameResolutionError, NewConnectionError

from connector.crm.errors import (
    AuthExpiredError,
    CRMError,
    FatalError,
    InDoubtError,
    NotFoundError,
    RateLimitedError,
    RetriableError,
    parse_retry_after,
)

# How to read an error body into (code, message): each CRM module supplies its own.
ErrorReader = Callable[[requests.Response], tuple[str | None, str]]

STATUS_ERRORS: dict[int, type[CRMError]] = {
    401: AuthExpiredError,
    404: NotFoundError,
    408: RetriableError,
    429: RateLimitedError,
    504: InDoubtError,  # a gateway gave up waiting; the CRM behind it may still apply the call
}


def raise_for_status(response: requests.Response, read_error: ErrorReader) -> None:
    """Raise the error class for a non-2xx response, with the CRM's own code and message."""
    if response.status_code < 400:
        return
    code, message = read_error(response)
    status = response.status_code
    if status in STATUS_ERRORS:
        cls = STATUS_ERRORS[status]
    elif status >= 500:
        cls = RetriableError
    else:
        cls = FatalError
    kwargs: dict[str, Any] = {"code": code, "status": status}
    if issubclass(cls, RetriableError):
        kwargs["retry_after"] = parse_retry_after(response.headers)
    raise cls(message, **kwargs)


def send(
    session: requests.Session, method: str, url: str, timeout: float, **kwargs: Any
) -> requests.Response:
    """One request with a time-out; network failures become retriable errors."""
    try:
        return session.request(method, url, timeout=timeout, **kwargs)
    except (requests.Timeout, requests.ConnectionError) as exc:
        raise network_error(exc, f"{method} {url}") from exc


def network_error(exc: requests.RequestException, what: str) -> RetriableError:
    """A time-out or lost connection as our error: in doubt unless the request never left."""
    cls = RetriableError if never_sent(exc) else InDoubtError
    return cls(f"{what}: {type(exc).__name__}: {exc}")


def never_sent(exc: requests.RequestException) -> bool:
    """True when the connection could not even be opened (connect time-out, refused, DNS)."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return isinstance(reason, NewConnectionError | NameResolutionError)


def json_error_reader(response: requests.Response) -> tuple[str | None, str]:
    """Fallback reader: a JSON body's code/message, else the start of the text."""
    try:
        body = response.json()
    except ValueError:
        return None, (response.text or response.reason or "")[:500]
    if isinstance(body, dict):
        code = body.get("code") or body.get("errorCode") or body.get("error")
        message = body.get("message") or body.get("error_description") or str(body)[:500]
        return (str(code) if code is not None else None), str(message)
    return None, str(body)[:500]
