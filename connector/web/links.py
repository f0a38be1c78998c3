"""Signed links: sign-in links and one-click decision links (docs/web.md).

A link carries a signed, timestamped payload (itsdangerous, keyed by SECRET_KEY) with a random
nonce. It is valid for a limited time and works once: using it records the nonce in
web_used_links in the same transaction as what it does, so a failure leaves it usable and a
second use is refused. Opening a link (GET) never acts: mail scanners follow links.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlencode

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer
from sqlalchemy.orm import Session

from connector.approvals.lifecycle import DECISIONS
from connector.config import ConfigError, Settings
from connector.errors import CrmApprovalsError
from connector.web.models import UsedLinkRow

Purpose = Literal["sign_in", "decision"]
SIGN_IN: Purpose = "sign_in"
DECISION: Purpose = "decision"
_SALTS: dict[Purpose, str] = {SIGN_IN: "crm-approvals/sign-in", DECISION: "crm-approvals/decision"}
LinkProblem = Literal["expired", "invalid", "used"]


class LinkError(CrmApprovalsError):
    def __init__(self, problem: LinkProblem) -> None:
        super().__init__(problem, code=f"link_{problem}")
        self.problem = problem


@dataclass(frozen=True)
class SignInClaim:
    user_id: str
    nonce: str


@dataclass(frozen=True)
class DecisionClaim:
    request_id: str
    approver_id: str
    decision: str
    step_index: int | None
    nonce: str


def require_secret(settings: Settings) -> str:
    if not settings.secret_key:
        raise ConfigError(
            "SECRET_KEY is not set; the web app signs sessions and links with it. "
            "Run `crm-approvals init` on a new machine, or set SECRET_KEY to a long random value"
        )
    return settings.secret_key


def sign(settings: Settings, purpose: Purpose, payload: dict[str, Any]) -> str:
    return URLSafeTimedSerializer(require_secret(settings), salt=_SALTS[purpose]).dumps(payload)


def _read(settings: Settings, purpose: Purpose, token: str, max_age_seconds: int) -> dict[str, Any]:
    serializer = URLSafeTimedSerializer(require_secret(settings), salt=_SALTS[purpose])
    try:
        payload = serializer.loads(token, max_age=max_age_seconds)
    except SignatureExpired:
        raise LinkError("expired") from None
    except BadSignature:
        raise LinkError("invalid") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("n"), str):
        raise LinkError("invalid")
    return payload


def sign_in_link(settings: Settings, user_id: str) -> str:
    token = sign(settings, SIGN_IN, {"u": user_id, "n": secrets.token_urlsafe(24)})
    return f"{settings.public_base_url}/app/sign-in/link?{urlencode({'token': token})}"


def read_sign_in(settings: Settings, token: str) -> SignInClaim:
    payload = _read(settings, SIGN_IN, token, settings.sign_in_link_minutes * 60)
    if not isinstance(payload.get("u"), str):
        raise LinkError("invalid")
    return SignInClaim(payload["u"], payload["n"])


def decision_links(
    request_id: str, approver_id: str, *, step_index: int | None = None, settings: Settings | None = None
) -> dict[str, str]:
    """{"approve": url, "reject": url}: links for e-mail or chat that open a confirmation page.

    Both share one nonce, so deciding through one voids the other. With ``step_index`` the
    links only decide that step; otherwise whichever step is open when they are used.
    """
    settings = settings or Settings.from_env()
    nonce = secrets.token_urlsafe(24)
    links: dict[str, str] = {}
    for decision in DECISIONS:
        payload = {"r": request_id, "u": approver_id, "d": decision, "s": step_index, "n": nonce}
        token = sign(settings, DECISION, payload)
        links[decision] = f"{settings.public_base_url}/app/decide?{urlencode({'token': token})}"
    return links


def decision_link_provider(settings: Settings) -> Callable[[str, str, int | None], dict[str, str]]:
    """Decision links for "a step opens for you" messages, as the notification sender asks
    for them (Runtime.link_providers, set by connector/wiring.py)."""

    def provide(request_id: str, approver_id: str, step_index: int | None) -> dict[str, str]:
        return decision_links(request_id, approver_id, step_index=step_index, settings=settings)

    return provide


def read_decision(settings: Settings, token: str) -> DecisionClaim:
    payload = _read(settings, DECISION, token, settings.decision_link_hours * 3600)
    step = payload.get("s")
    if (
        not all(isinstance(payload.get(key), str) for key in ("r", "u", "d"))
        or payload["d"] not in DECISIONS
        or not (step is None or (isinstance(step, int) and not isinstance(step, bool)))
    ):
        raise LinkError("invalid")
    return DecisionClaim(payload["r"], payload["u"], payload["d"], step, payload["n"])


def is_used(session: Session, nonce: str) -> bool:
    return session.get(UsedLinkRow, nonce) is not None


def use(session: Session, nonce: str, purpose: Purpose, user_id: str) -> None:
    """Spend a link in the caller's transaction; LinkError("used") when it was spent before.
    (Two uses at the same moment: the primary key makes the second transaction fail.)"""
    if is_used(session, nonce):
        raise LinkError("used")
    session.add(UsedLinkRow(nonce=nonce, purpose=purpose, user_id=user_id))
    session.flush()
