"""OAuth refresh-token auth shared by the HubSpot, Zoho and Bitrix24 adapters.

`OAuthTokens` keeps one connection's access token and renews it with the refresh token:
before it expires (inside a margin), when it is missing, and when the adapter calls
`renew()` after the CRM answered that the token is dead (its error mapping raises
`AuthExpiredError`; `CRMAdapter._call` then calls `refresh_auth()` and repeats the call once).
One renewal runs at a time per connection, and callers whose failed call used a token that
another caller has already replaced do not renew again. A refresh token the CRM rotates is
kept (in memory). No secret reaches an exception text or a log line: the errors name the
variables to check instead.

A CRM supplies only its token endpoint, as a small `TokenEndpoint`: where to send the
standard refresh_token grant (RFC 6749 §6) and how to read the answer.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import ClassVar
from urllib.parse import quote, quote_plus

import requests

from connector.config import ConnectionConfig
from connector.crm.errors import AuthError, CRMError
from connector.crm.http import send
from connector.errors import CrmApprovalsError

log = logging.getLogger(__name__)

EXPIRY_MARGIN_SECONDS = 60.0  # renew this early, so that no call starts with a dying token
MASK = "***"
CREDENTIAL_VARIABLES = ("CLIENT_ID", "CLIENT_SECRET", "REFRESH_TOKEN")


@dataclass(frozen=True)
class TokenAnswer:
    """What a token endpoint granted."""

    access_token: str = field(repr=False)
    expires_in: float | None  # seconds; None = the CRM did not say (renewed only when refused)
    refresh_token: str | None = field(default=None, repr=False)  # set where the CRM rotates it
    api_domain: str | None = None  # the API host the token belongs to, where the CRM names one (Zoho)


@dataclass(frozen=True)
class AccessToken:
    value: str = field(repr=False)
    expires_at: float | None  # on the OAuthTokens clock; None = unknown (e.g. given in the environment)
    api_domain: str | None = None


class TokenRefused(CrmApprovalsError):
    """Raised by `TokenEndpoint.parse` when the CRM refuses the grant itself (bad refresh
    token, uninstalled app, unpaid plan): renewing again cannot help. OAuthTokens turns it
    into an AuthError that names the variables to check."""

    def __init__(self, code: str | None, message: str, status: int) -> None:
        super().__init__(message, code=code)
        self.status = status


class TokenEndpoint(ABC):
    """One CRM's token endpoint. `parse` raises TokenRefused for a refusal, and a
    RetriableError (e.g. through `raise_for_status`) for throttling or a server error."""

    method: ClassVar[str] = "POST"  # POST: the fields go in a form body; GET: in the query string
    issuer: str  # who answers, for error text
    url: str
    hint: str  # what to do when the refresh token is refused
    extra_variables: tuple[str, ...] = ()  # other connection variables a refusal may come from

    def fields(self, client_id: str, client_secret: str, refresh_token: str) -> dict[str, str]:
        return {
            "grant_type": "refresh_token",
            "client_id": client_id,
            "client_secret": client_secret,
            "refresh_token": refresh_token,
        }

    @abstractmethod
    def parse(self, response: requests.Response) -> TokenAnswer: ...


class OAuthTokens:
    """The OAuth tokens of one connection (see the module docstring)."""

    def __init__(
        self,
        endpoint: TokenEndpoint,
        connection: ConnectionConfig,
        *,
        client_id: str,
        client_secret: str,
        refresh_token: str,
        access_token: str | None = None,
        session: requests.Session,
        timeout: float,
        clock: Callable[[], float] = time.monotonic,
        margin: float = EXPIRY_MARGIN_SECONDS,
    ) -> None:
        self.endpoint = endpoint
        self.connection = connection
        self.client_id = client_id
        self._client_secret = client_secret
        self._refresh_token = refresh_token
        self.session = session
        self.timeout = timeout
        self.clock = clock
        self.margin = margin
        self.cached: AccessToken | None = AccessToken(access_token, None) if access_token else None
        # The configured secrets stay masked after a rotation replaced them; of later ones,
        # the current and the previous generation are enough (older tokens are long dead).
        self._configured = frozenset(s for s in (client_secret, refresh_token, access_token) if s)
        self._previous: frozenset[str] = frozenset()
        self._lock = threading.Lock()
        self._seen = threading.local()  # the token value this thread last used

    def __repr__(self) -> str:
        return f"OAuthTokens(connection={self.connection.name!r}, issuer={self.endpoint.issuer!r})"

    # --- what the adapters call ----------------------------------------------------------

    def current(self) -> AccessToken:
        """The access token to send now: the cached one unless it is missing or expires
        within the margin, else a renewed one."""
        token = self.cached
        if token is None or not self._fresh(token):
            with self._lock:
                token = self.cached  # another thread may have renewed while this one waited
                if token is None or not self._fresh(token):
                    token = self._renew()
        self._seen.value = token.value
        return token

    def renew(self) -> AccessToken:
        """Renew after the CRM refused the access token this thread last used; when another
        thread has replaced that token meanwhile, the replacement is used instead."""
        seen = getattr(self._seen, "value", None)
        with self._lock:
            token = self.cached
            if seen is None or token is None or token.value == seen:
                token = self._renew()
        self._seen.value = token.value
        return token

    def secrets(self) -> frozenset[str]:
        current = {self._refresh_token, self.cached.value if self.cached else ""}
        return self._configured | self._previous | {s for s in current if s}

    def mask(self, text: str) -> str:
        return mask(text, self.secrets())

    # --- renewal ---------------------------------------------------------------------------

    def _fresh(self, token: AccessToken) -> bool:
        return token.expires_at is None or self.clock() < token.expires_at - self.margin

    def _renew(self) -> AccessToken:
        """One call to the token endpoint; the caller holds the lock."""
        fields = self.endpoint.fields(self.client_id, self._client_secret, self._refresh_token)
        body = {"data": fields} if self.endpoint.method == "POST" else {"params": fields}
        refused: TokenRefused | None = None
        try:
            response = send(self.session, self.endpoint.method, self.endpoint.url, self.timeout, **body)
            answer = self.endpoint.parse(response)
        except TokenRefused as exc:
            refused = exc
        except CRMError as exc:  # throttled, server error, network: retriable, with no secret in it
            raise self._masked(exc) from None
        if refused is not None:  # raised here, outside the handler, so nothing unmasked is chained
            raise self._refused(refused)
        retiring = {self._refresh_token, self.cached.value if self.cached else ""}
        expires_at = self.clock() + answer.expires_in if answer.expires_in is not None else None
        rotated = bool(answer.refresh_token) and answer.refresh_token != self._refresh_token
        if answer.refresh_token:
            self._refresh_token = answer.refresh_token
        self.cached = AccessToken(answer.access_token, expires_at, answer.api_domain)
        self._previous = frozenset(s for s in retiring if s) - self._configured
        log.info(
            "%s connection %r: OAuth access token renewed%s",
            self.connection.kind,
            self.connection.name,
            " and the rotated refresh token kept" if rotated else "",
        )
        return self.cached

    def _refused(self, refused: TokenRefused) -> AuthError:
        prefix = self.connection.env_prefix
        names = [prefix + name for name in (*CREDENTIAL_VARIABLES, *self.endpoint.extra_variables)]
        reason = ": ".join(part for part in (refused.code, refused.message) if part) or "no reason given"
        message = self.mask(
            f"{self.connection.kind} connection {self.connection.name!r}: {self.endpoint.issuer} refused "
            f"the refresh token ({reason}); check {', '.join(names[:-1])} and {names[-1]}; "
            f"{self.endpoint.hint}"
        )
        return AuthError(message, code=refused.code, status=refused.status)

    def _masked(self, exc: CRMError) -> CRMError:
        """The same error with every secret replaced; the caller drops the chained cause
        (a requests error whose text may hold a URL with the credentials in its query)."""
        exc.message = self.mask(exc.message)
        exc.args = (exc.message,)
        exc.__context__ = None
        return exc


def mask(text: str, secrets: Iterable[str]) -> str:
    """`text` with every secret replaced by ***, also as it is spelled inside a URL."""
    for secret in sorted(secrets, key=len, reverse=True):
        for spelling in {secret, quote(secret, safe=""), quote_plus(secret)}:
            text = text.replace(spelling, MASK)
    return text
