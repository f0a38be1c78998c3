"""OpenID Connect single sign-on against a fake issuer (discovery, token and JWKS mocked with
`responses` in the format the OpenID Connect specs give)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import responses
from joserfc import jwt
from joserfc.jwk import RSAKey

from connector.config import Settings
from connector.runtime import Runtime
from tests.web.helpers import text, web_world
from tests.webhooks.test_api import World

ISSUER = "https://login.example.com/realms/acme"
CLIENT_ID = "crm-approvals"
KEY = RSAKey.generate_key(2048, parameters={"kid": "k1"})


@pytest.fixture
def world(
    tmp_path: Path, settings_factory: Callable[..., Settings], runtime_factory: Callable[[Settings], Runtime]
) -> World:
    return web_world(
        tmp_path,
        settings_factory,
        runtime_factory,
        oidc_issuer=ISSUER,
        oidc_client_id=CLIENT_ID,
        oidc_client_secret="s3cret",
    )


@pytest.fixture
def issuer() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.get(
            f"{ISSUER}/.well-known/openid-configuration",
            json={
                "issuer": ISSUER,
                "authorization_endpoint": f"{ISSUER}/protocol/openid-connect/auth",
                "token_endpoint": f"{ISSUER}/protocol/openid-connect/token",
                "userinfo_endpoint": f"{ISSUER}/protocol/openid-connect/userinfo",
                "jwks_uri": f"{ISSUER}/protocol/openid-connect/certs",
                "response_types_supported": ["code"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
            },
        )
        rsps.get(f"{ISSUER}/protocol/openid-connect/certs", json={"keys": [KEY.as_dict(private=False)]})
        yield rsps


def id_token(nonce: str, **claims: Any) -> str:
    now = int(time.time())
    payload = {
        "iss": ISSUER,
        "sub": "abc-123",
        "aud": CLIENT_ID,
        "iat": now,
        "exp": now + 300,
        "nonce": nonce,
        **claims,
    }
    return jwt.encode({"alg": "RS256", "kid": "k1"}, payload, KEY)


def start(client: Any) -> tuple[str, str]:
    answer = client.get("/app/sign-in/sso?next=/app/mine")
    assert answer.status_code == 302
    location = urlsplit(answer.headers["Location"])
    assert f"{location.scheme}://{location.netloc}{location.path}" == f"{ISSUER}/protocol/openid-connect/auth"
    query = parse_qs(location.query)
    assert query["client_id"] == [CLIENT_ID] and query["redirect_uri"] == [
        "http://127.0.0.1:8000/app/sign-in/sso/callback"
    ]
    assert "openid" in query["scope"][0].split()
    return query["state"][0], query["nonce"][0]


def answer_token(issuer: responses.RequestsMock, token: str) -> None:
    issuer.upsert(
        responses.POST,
        f"{ISSUER}/protocol/openid-connect/token",
        json={"access_token": "at-1", "token_type": "Bearer", "expires_in": 300, "id_token": token},
    )


def test_sign_in_page_offers_sso_only_when_configured(
    world: World,
    tmp_path: Path,
    settings_factory: Callable[..., Settings],
    runtime_factory: Callable[[Settings], Runtime],
) -> None:
    assert "Sign in with your company account" in text(world.app.test_client().get("/app/sign-in"))
    (tmp_path / "plain").mkdir()
    plain = web_world(tmp_path / "plain", settings_factory, runtime_factory)
    client = plain.app.test_client()
    assert "company account" not in text(client.get("/app/sign-in"))
    assert client.get("/app/sign-in/sso").status_code == 404


def test_sso_signs_in_a_known_user(world: World, issuer: responses.RequestsMock) -> None:
    world.submit()
    client = world.app.test_client()
    state, nonce = start(client)
    answer_token(issuer, id_token(nonce, email="u-mgr@example.com", email_verified=True))
    answer = client.get(f"/app/sign-in/sso/callback?code=c0de&state={state}")
    assert answer.status_code == 303 and answer.headers["Location"].endswith("/app/mine")
    assert client.get("/app/inbox").status_code == 200
    token_call = [c for c in issuer.calls if (c.request.url or "").endswith("/token")][0]
    assert "code=c0de" in str(token_call.request.body)


def test_sso_refuses_unknown_and_unverified_addresses(world: World, issuer: responses.RequestsMock) -> None:
    world.submit()
    for claims, reason in (
        ({"email": "someone@acme.example"}, "is not a user of this approval service"),
        ({"email": "u-mgr@example.com", "email_verified": False}, "verified e-mail address"),
        ({}, "verified e-mail address"),
    ):
        client = world.app.test_client()
        state, nonce = start(client)
        answer_token(issuer, id_token(nonce, **claims))
        answer = client.get(f"/app/sign-in/sso/callback?code=c0de&state={state}")
        assert answer.status_code == 401 and reason in text(answer), claims
        assert client.get("/app/inbox").status_code == 302


def test_sso_refuses_a_wrong_state_a_wrong_nonce_and_the_providers_error(
    world: World, issuer: responses.RequestsMock
) -> None:
    world.submit()
    client = world.app.test_client()
    _state, nonce = start(client)
    answer = client.get("/app/sign-in/sso/callback?code=c0de&state=forged")
    assert answer.status_code == 401 and "Single sign-on did not work" in text(answer)

    client = world.app.test_client()
    state, _nonce = start(client)
    answer_token(issuer, id_token("another-nonce", email="u-mgr@example.com"))
    answer = client.get(f"/app/sign-in/sso/callback?code=c0de&state={state}")
    assert answer.status_code == 401 and client.get("/app/inbox").status_code == 302

    answer = client.get("/app/sign-in/sso/callback?error=access_denied&error_description=User+cancelled")
    assert answer.status_code == 401 and "User cancelled" in text(answer)
