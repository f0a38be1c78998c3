"""API tokens: who is calling the approvals API, and whether they are an admin.

A token is "cra_" + 43 random URL-safe characters (256 bits). Only its sha256 is stored,
so a copy of the database lets nobody call the API. Looking a token up by its hash is
safe against timing attacks: what an index lookup's timing could reveal is how much of
the *hash* matched, and an attacker cannot choose inputs whose sha256 shares a prefix
with the real one, so it tells them nothing about the token. The final equality check
is constant-time anyway.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session

from connector.clock import utcnow
from connector.storage.models import ApiToken

TOKEN_PREFIX = "cra_"
# last_used_at is for ops ("is this token still in use?"): minute precision is enough,
# and skipping the write keeps read requests from taking the database write lock.
LAST_USED_PRECISION = timedelta(minutes=1)


@dataclass(frozen=True)
class TokenInfo:
    """A token as the API and the CLI see it: never the secret, never its hash."""

    id: int
    user_id: str
    label: str
    is_admin: bool
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


def generate_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_token(
    session: Session, user_id: str, label: str = "", is_admin: bool = False
) -> tuple[TokenInfo, str]:
    """Store a new token's hash; returns the token itself, which nobody can see again."""
    user_id = user_id.strip()
    if not user_id:
        raise ValueError("a token needs the user id it acts as (the CRM user id approvers are named by)")
    token = generate_token()
    row = ApiToken(user_id=user_id, label=label, is_admin=is_admin, token_hash=hash_token(token))
    session.add(row)
    session.flush()
    return _info(row), token


def list_tokens(session: Session) -> list[TokenInfo]:
    return [_info(row) for row in session.scalars(select(ApiToken).order_by(ApiToken.id))]


def revoke_token(session: Session, token_id: int) -> TokenInfo | None:
    """Revoke a token (idempotent: an already revoked one keeps its revocation time)."""
    row = session.get(ApiToken, token_id)
    if row is None:
        return None
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.flush()
    return _info(row)


def find_token(session: Session, presented: str) -> TokenInfo | None:
    """The token (revoked or not) matching what a caller presented, and note its use.

    Read and noted as plain rows on the session's connection (one prebuilt statement, no ORM
    object): every API call runs this first."""
    digest = hash_token(presented)
    conn = session.connection()
    row = conn.execute(_BY_HASH, {"digest": digest}).first()
    if row is None or not hmac.compare_digest(row.token_hash, digest):
        return None
    info = _info(row)
    now = utcnow()
    if row.revoked_at is None and (row.last_used_at is None or now - row.last_used_at >= LAST_USED_PRECISION):
        conn.execute(_NOTE_USE, {"token_id": row.id, "now": now})
        info = replace(info, last_used_at=now)
    return info


_TOKENS = ApiToken.__table__
_BY_HASH = select(*_TOKENS.c).where(_TOKENS.c.token_hash == bindparam("digest"))
_NOTE_USE = (
    update(ApiToken)
    .where(ApiToken.id == bindparam("token_id"))
    .values(last_used_at=bindparam("now", type_=_TOKENS.c.last_used_at.type))
)


def _info(row: Any) -> TokenInfo:
    """Of an ORM row or a plain row of api_tokens."""
    return TokenInfo(
        id=row.id,
        user_id=row.user_id,
        label=row.label,
        is_admin=bool(row.is_admin),
        created_at=row.created_at,
        last_used_at=row.last_used_at,
        revoked_at=row.revoked_at,
    )
