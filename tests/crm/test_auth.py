"""The shared OAuth refresh helper (connector/crm/auth.py) as HubSpot, Zoho and Bitrix24 configure
it: caching within the expiry margin, renewal near expiry and after a refused token (then one
retry), rotation of refresh tokens, one renewal for concurrent callers, and no secret in an error
or a log line. Each token endpoint is mocked with `responses` in its CRM's documented format
(docs/crms/{hubspot,zoho,bitrix24}.md)."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import responses

from connector.config import Settings, parse_connections
from connector.crm.auth import OAuthTokens, mask
from connector.crm.base import CRMAdapter, RecordUpdate
from connector.crm.bitrix24 import Bitrix24Adapter
from connector.crm.errors import AuthError, RateLimitedError, RetriableError
from connector.crm.hubspot import HubSpotAdapter
from connector.crm.retry import RetryPolicy
from connector.crm.zoho import ZohoAdapter
from tests.contract import harness_bitrix24 as bitrix
from tests.contract import harness_hubspot as hubspot
from tests.contract import harness_zoho as zoho

NO_WAIT = RetryPolicy(attempts=3, sleep=lambda _seconds: None)


# --- each CRM's token endpoint, as its docs describe it -------------------------------------


@dataclass(frozen=True)
class Crm:
    kind: str
    env: dict[str, str]
    token_method: str
    token_url: str
    lifetime: float  # the expires_in the documented answer carries
    rotates: bool  # whether the documented answer carries a new refresh token
    refusal: tuple[int, dict[str, Any]]  # the documented answer to a bad refresh token
    refusal_words: str  # the CRM's own words that must reach the error
    adapter_class: type[CRMAdapter]
    answer: Callable[[str, str], dict[str, Any]]  # (access token, refresh token) -> success body
    secrets: tuple[str, ...] = field(default=())

    @property
    def prefix(self) -> str:
        return self.kind.upper() + "_"

    def make_adapter(self, env: dict[str, str] | None = None) -> CRMAdapter:
        connection = parse_connections(env or self.env)[self.kind]
        settings = Settings(connections={self.kind: connection}, http_timeout_seconds=5)
        adapter = self.adapter_class.from_config(connection, settings)
        adapter.retry = NO_WAIT
        return adapter

    def tokens(self, adapter: CRMAdapter) -> OAuthTokens:
        auth = getattr(adapter, "auth", None)  # Bitrix24 keeps them in its auth mode
        found = getattr(auth, "tokens", None) or getattr(adapter, "oauth_tokens", None)
        assert isinstance(found, OAuthTokens)
        return found


def hubspot_answer(access: str, refresh: str) -> dict[str, Any]:
    return {"token_type": "bearer", "refresh_token": refresh, "access_token": access, "expires_in": 1800}


def zoho_answer(access: str, _refresh: str) -> dict[str, Any]:
    # A refresh answer carries no refresh token: Zoho's do not rotate.
    return zoho.token_body(access)


def bitrix_answer(access: str, refresh: str) -> dict[str, Any]:
    return {
        "access_token": access,
        "client_endpoint": bitrix.REST,
        "domain": "oauth.bitrix.info",
        "expires_in": 3600,
        "member_id": bitrix.MEMBER_ID,
        "refresh_token": refresh,
        "scope": "app",
        "server_endpoint": "https://oauth.bitrix.info/rest/",
        "status": "L",
    }


HUBSPOT = Crm(
    kind="hubspot",
    env=dict(hubspot.OAUTH_ENV),
    token_method="POST",
    token_url=f"{hubspot.API}/oauth/v1/token",
    lifetime=1800,
    rotates=True,
    refusal=(
        400,
        {
            "status": "BAD_REFRESH_TOKEN",
            "message": "missing or unknown refresh token",
            "correlationId": "b7f5b5a1-8f3e-4c63-9d6b-3c1f0e2a9d11",
        },
    ),
    refusal_words="missing or unknown refresh token",
    adapter_class=HubSpotAdapter,
    answer=hubspot_answer,
    secrets=(hubspot.CLIENT_SECRET, hubspot.REFRESH_TOKEN, hubspot.OAUTH_ACCESS_TOKEN),
)
ZOHO = Crm(
    kind="zoho",
    env=dict(zoho.ADAPTER_ENV),
    token_method="POST",
    token_url=zoho.TOKEN_URL,
    lifetime=3600,
    rotates=False,
    refusal=(200, {"error": "invalid_code"}),  # Zoho Accounts refuses with HTTP 200
    refusal_words="invalid_code",
    adapter_class=ZohoAdapter,
    answer=zoho_answer,
    secrets=(zoho.ADAPTER_ENV["ZOHO_CLIENT_SECRET"], zoho.ADAPTER_ENV["ZOHO_REFRESH_TOKEN"]),
)
BITRIX24 = Crm(
    kind="bitrix24",
    env=dict(bitrix.OAUTH_ENV),
    token_method="GET",
    token_url=bitrix.TOKEN_URL,
    lifetime=3600,
    rotates=True,
    refusal=(400, {"error": "invalid_grant", "error_description": "Invalid refresh token"}),
    refusal_words="Invalid refresh token",
    adapter_class=Bitrix24Adapter,
    answer=bitrix_answer,
    secrets=(bitrix.CLIENT_SECRET, bitrix.REFRESH_TOKEN, bitrix.ACCESS_TOKEN),
)
CRMS = [HUBSPOT, ZOHO, BITRIX24]


@pytest.fixture(params=CRMS, ids=lambda crm: crm.kind)
def crm(request: pytest.FixtureRequest) -> Crm:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def rsps() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock() as mock:
        yield mock


class TokenServer:
    """The CRM's token endpoint: grants access-1, access-2, ... with refresh-1, refresh-2, ...
    (where the CRM rotates), and records the grant fields of every request."""

    def __init__(self, crm: Crm, rsps: responses.RequestsMock, delay: float = 0.0) -> None:
        self.crm = crm
        self.delay = delay
        self.grants: list[dict[str, str]] = []
        self._lock = threading.Lock()
        rsps.add_callback(crm.token_method, crm.token_url, callback=self.respond)

    def respond(self, request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        raw = request.body if self.crm.token_method == "POST" else urlsplit(request.url or "").query
        text = raw.decode() if isinstance(raw, bytes) else str(raw or "")
        with self._lock:
            self.grants.append({k: v[0] for k, v in parse_qs(text).items()})
            number = len(self.grants)
        time.sleep(self.delay)  # widens the window in which concurrent callers could pile up
        body = self.crm.answer(f"access-{number}", f"refresh-{number}")
        return 200, {"Content-Type": "application/json"}, json.dumps(body)


def without_access_token(crm: Crm) -> dict[str, str]:
    return {k: v for k, v in crm.env.items() if k != f"{crm.prefix}ACCESS_TOKEN"}


def fresh_tokens(crm: Crm, clock: Callable[[], float] = time.monotonic) -> OAuthTokens:
    """The connection's OAuthTokens as the adapter builds it, without a first access token."""
    tokens = crm.tokens(crm.make_adapter(without_access_token(crm)))
    tokens.clock = clock
    return tokens


# --- caching and renewal before expiry --------------------------------------------------------


def test_the_grant_goes_to_the_documented_endpoint_in_the_documented_form(
    crm: Crm, rsps: responses.RequestsMock
) -> None:
    server = TokenServer(crm, rsps)
    assert fresh_tokens(crm).current().value == "access-1"
    [call] = rsps.calls
    assert call.request.method == crm.token_method
    assert (call.request.url or "").split("?")[0] == crm.token_url
    assert server.grants == [
        {
            "grant_type": "refresh_token",
            "client_id": crm.env[f"{crm.prefix}CLIENT_ID"],
            "client_secret": crm.env[f"{crm.prefix}CLIENT_SECRET"],
            "refresh_token": crm.env[f"{crm.prefix}REFRESH_TOKEN"],
        }
    ]


def test_the_token_is_cached_until_the_margin_before_expiry(crm: Crm, rsps: responses.RequestsMock) -> None:
    now = [1000.0]
    server = TokenServer(crm, rsps)
    tokens = fresh_tokens(crm, clock=lambda: now[0])
    assert tokens.current().value == "access-1"
    now[0] += crm.lifetime - tokens.margin - 1  # one second before the margin starts
    assert tokens.current().value == "access-1"
    assert len(server.grants) == 1


def test_the_token_is_renewed_inside_the_margin(crm: Crm, rsps: responses.RequestsMock) -> None:
    now = [1000.0]
    server = TokenServer(crm, rsps)
    tokens = fresh_tokens(crm, clock=lambda: now[0])
    tokens.current()
    now[0] += crm.lifetime - tokens.margin  # the margin starts: renew now, not after a refused call
    assert tokens.current().value == "access-2"
    assert len(server.grants) == 2


@pytest.mark.parametrize("crm", [HUBSPOT, BITRIX24], ids=lambda crm: crm.kind)  # Zoho takes none
def test_a_configured_access_token_of_unknown_age_is_used_until_refused(
    crm: Crm, rsps: responses.RequestsMock
) -> None:
    env = {**crm.env, f"{crm.prefix}ACCESS_TOKEN": "configured-access"}
    tokens = crm.tokens(crm.make_adapter(env))
    tokens.clock = lambda: 1e12  # however late it is: only a refusal says it is dead
    assert tokens.current().value == "configured-access"
    assert len(rsps.calls) == 0


# --- rotation ---------------------------------------------------------------------------------


def test_a_rotated_refresh_token_is_kept_and_used_for_the_next_renewal(
    crm: Crm, rsps: responses.RequestsMock
) -> None:
    server = TokenServer(crm, rsps)
    tokens = fresh_tokens(crm)
    tokens.current()
    tokens.renew()
    tokens.renew()
    configured = crm.env[f"{crm.prefix}REFRESH_TOKEN"]
    used = [grant["refresh_token"] for grant in server.grants]
    if crm.rotates:
        assert used == [configured, "refresh-1", "refresh-2"]
    else:  # no new refresh token in the answer: the configured one stays
        assert used == [configured, configured, configured]


# --- renewal after a refused token, then one retry --------------------------------------------


SeenTokens = Callable[[], list[str]]  # the access tokens the API calls carried, in order


def hubspot_refused_once(rsps: responses.RequestsMock, code: str) -> SeenTokens:
    """The first batch update is refused with 401 and `code`; the next ones succeed."""
    seen: list[str] = []

    def respond(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        seen.append(request.headers["Authorization"].removeprefix("Bearer "))
        if len(seen) == 1:
            message = "The OAuth token used to make this call expired 2 minute(s) ago."
            return 401, {}, json.dumps(hubspot.error_body(code, message))
        return 200, {}, json.dumps(hubspot.batch_response([hubspot.simple_object("1", {})]))

    rsps.add_callback(responses.POST, f"{hubspot.API}/crm/v3/objects/deals/batch/update", callback=respond)
    return lambda: seen


def zoho_refused_once(rsps: responses.RequestsMock, code: str) -> SeenTokens:
    seen: list[str] = []

    def respond(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        seen.append(request.headers["Authorization"].removeprefix("Zoho-oauthtoken "))
        if len(seen) == 1:
            return 401, {}, json.dumps(zoho.error_body(code, "invalid oauth token"))
        return zoho.updates_reply([zoho.record_success("1")])

    rsps.add_callback(responses.PUT, f"{zoho.API}/Deals", callback=respond)
    return lambda: seen


BITRIX_DEAD_TOKEN = {
    "expired_token": "The access token provided has expired",
    "invalid_token": "Token expired or invalid",
}


def bitrix_refused_once(rsps: responses.RequestsMock, code: str) -> SeenTokens:
    refused = {"error": code, "error_description": BITRIX_DEAD_TOKEN[code]}
    portal = bitrix.FakePortal(outages=[(401, refused)])
    portal.register(rsps)
    return lambda: [form.get("auth", "") for form in portal.forms]


REFUSALS = [
    (HUBSPOT, "EXPIRED_AUTHENTICATION", hubspot_refused_once, "deals"),
    (ZOHO, "INVALID_TOKEN", zoho_refused_once, "Deals"),
    (ZOHO, "AUTHENTICATION_FAILURE", zoho_refused_once, "Deals"),
    (BITRIX24, "expired_token", bitrix_refused_once, "deal"),
    (BITRIX24, "invalid_token", bitrix_refused_once, "deal"),
]


@pytest.mark.parametrize(
    ("crm", "code", "refuse_once", "object_type"),
    REFUSALS,
    ids=[f"{crm.kind}-{code}" for crm, code, *_ in REFUSALS],
)
def test_a_refused_token_is_renewed_once_and_the_call_repeated_with_the_new_one(
    rsps: responses.RequestsMock,
    crm: Crm,
    code: str,
    refuse_once: Callable[[responses.RequestsMock, str], SeenTokens],
    object_type: str,
) -> None:
    server = TokenServer(crm, rsps)
    seen = refuse_once(rsps, code)
    adapter = crm.make_adapter(without_access_token(crm))
    assert adapter.update_records(object_type, [RecordUpdate("1", {"A": "1"})])[0].ok
    assert seen() == ["access-1", "access-2"]
    assert len(server.grants) == 2  # the first token, and one renewal


# --- one renewal at a time --------------------------------------------------------------------


def run_together(count: int, work: Callable[[], str]) -> list[str]:
    barrier = threading.Barrier(count)
    results: list[str] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            barrier.wait(timeout=5)
            results.append(work())
        except BaseException as exc:  # reported below, in the test's own thread
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert not errors, errors
    return results


def test_concurrent_callers_without_a_token_share_one_renewal(crm: Crm, rsps: responses.RequestsMock) -> None:
    server = TokenServer(crm, rsps, delay=0.05)
    tokens = fresh_tokens(crm)
    results = run_together(8, lambda: tokens.current().value)
    assert results == ["access-1"] * 8
    assert len(server.grants) == 1


def test_concurrent_callers_refused_the_same_token_share_one_renewal(
    crm: Crm, rsps: responses.RequestsMock
) -> None:
    server = TokenServer(crm, rsps, delay=0.05)
    tokens = fresh_tokens(crm)
    tokens.current()

    def refused_then_renew() -> str:
        assert tokens.current().value == "access-1"  # the call this thread makes with it is refused
        return tokens.renew().value

    results = run_together(8, refused_then_renew)
    assert results == ["access-2"] * 8
    assert len(server.grants) == 2  # the first token, and one renewal for all eight
    if crm.rotates:  # that renewal used the refresh token granted with access-1: each is single-use
        assert server.grants[1]["refresh_token"] == "refresh-1"


# --- secrets stay out of errors and logs ------------------------------------------------------


def assert_hidden(secrets: tuple[str, ...], *texts: str) -> None:
    for text in texts:
        for secret in secrets:
            assert secret not in text


def test_a_refused_refresh_token_is_an_auth_error_naming_the_variables_without_secrets(
    crm: Crm, rsps: responses.RequestsMock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    status, body = crm.refusal
    rsps.add(crm.token_method, crm.token_url, json=body, status=status)
    with pytest.raises(AuthError) as caught:
        fresh_tokens(crm).current()
    text = str(caught.value)
    assert crm.refusal_words in text
    for name in ("CLIENT_ID", "CLIENT_SECRET", "REFRESH_TOKEN"):
        assert f"{crm.prefix}{name}" in text
    assert caught.value.status == status
    assert_hidden(crm.secrets, text, repr(caught.value.args), caplog.text)
    assert caught.value.__cause__ is None and caught.value.__context__ is None


def test_network_errors_of_the_token_request_hide_every_secret(
    crm: Crm, rsps: responses.RequestsMock
) -> None:
    # What requests says when the connection fails: the full URL, query string included.
    query = "&".join(f"x={secret}" for secret in crm.secrets)
    failure = requests.ConnectionError(f"Max retries exceeded with url: {crm.token_url}?{query}")
    rsps.add(crm.token_method, crm.token_url, body=failure)
    with pytest.raises(RetriableError) as caught:
        crm.tokens(crm.make_adapter()).renew()
    assert "***" in str(caught.value)
    assert_hidden(crm.secrets, str(caught.value), repr(caught.value.args))
    assert caught.value.__cause__ is None and caught.value.__context__ is None


def test_renewed_and_rotated_tokens_never_reach_the_logs(
    crm: Crm, rsps: responses.RequestsMock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    TokenServer(crm, rsps)
    tokens = fresh_tokens(crm)
    tokens.current()
    tokens.renew()
    assert f"{crm.kind} connection {crm.kind!r}: OAuth access token renewed" in caplog.text
    renewed = ("access-1", "access-2", "refresh-1", "refresh-2") if crm.rotates else ("access-1", "access-2")
    assert_hidden(crm.secrets + renewed, caplog.text, repr(tokens), repr(tokens.cached))


def test_a_server_error_of_the_token_endpoint_is_retried(crm: Crm, rsps: responses.RequestsMock) -> None:
    rsps.add(crm.token_method, crm.token_url, status=503, json={"error": "unavailable"})
    with pytest.raises(RetriableError):
        fresh_tokens(crm).current()
    assert len(rsps.calls) == 1  # the helper does not retry by itself: the adapter's policy does


def test_zoho_accounts_throttling_is_a_rate_limit_with_its_wait(rsps: responses.RequestsMock) -> None:
    throttled = {
        "error_description": "You have made too many requests continuously. Please try again after "
        "some time.",
        "error": "Access Denied",
        "status": "failure",
    }
    rsps.add(responses.POST, zoho.TOKEN_URL, json=throttled, status=400)
    with pytest.raises(RateLimitedError) as caught:
        fresh_tokens(ZOHO).current()
    assert caught.value.retry_after == 60.0


def test_mask_covers_url_spellings() -> None:
    secret = "a+b/c=d e"
    text = f"raw {secret} quoted a%2Bb%2Fc%3Dd%20e plus a%2Bb%2Fc%3Dd+e"
    assert mask(text, {secret}) == "raw *** quoted *** plus ***"
