"""Signature checks shared by every intake: HMAC compared in constant time, inside a
timestamp window. The secret never appears in an error or a log line."""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import re
import time
from typing import Any

from connector.config import ConfigError
from webhooks.errors import unauthorized

# Whole or fractional seconds (or milliseconds), ASCII digits only: float() would also take
# "inf", "1e400" or "nan", and int() takes "²"; 16 digits is past any real time in milliseconds.
UNIX_TIME = re.compile(r"[0-9]{1,16}(?:\.[0-9]{1,9})?")


def hmac_sha256(key: bytes, message: bytes) -> bytes:
    """HMAC-SHA256 (RFC 2104) from the key's padded inner and outer SHA-256 states, hashed once
    per key and copied per message: about 1.7 µs a delivery against 5 µs for OpenSSL's one-shot
    `hmac.digest`, which sets up the key's pads and a digest context anew on every call. The
    result is the same bytes (tests/webhooks/test_signatures.py compares it with `hmac.new`);
    comparing it stays constant-time (`constant_time_equals`)."""
    inner, outer = _hmac_states(key)
    inner = inner.copy()
    inner.update(message)
    outer = outer.copy()
    outer.update(inner.digest())
    return outer.digest()


_BLOCK = 64  # SHA-256's block size in bytes
_IPAD = bytes(x ^ 0x36 for x in range(256))  # translate tables, as the stdlib's hmac module has
_OPAD = bytes(x ^ 0x5C for x in range(256))


# Keyed by the key's bytes (a few configured secrets; bounded for processes that see many, such
# as tests). The cache holds keys in memory only, as the settings do; nothing here logs them.
@functools.lru_cache(maxsize=128)
def _hmac_states(key: bytes) -> tuple[Any, Any]:
    """SHA-256 states that have absorbed the key XOR ipad and XOR opad; only ever copied, never
    updated, so threads share them safely."""
    if len(key) > _BLOCK:
        key = hashlib.sha256(key).digest()
    key = key.ljust(_BLOCK, b"\0")
    return hashlib.sha256(key.translate(_IPAD)), hashlib.sha256(key.translate(_OPAD))


def constant_time_equals(a: str | bytes, b: str | bytes) -> bool:
    a_bytes = a.encode() if isinstance(a, str) else a
    b_bytes = b.encode() if isinstance(b, str) else b
    return hmac.compare_digest(a_bytes, b_bytes)


def check_timestamp(raw: str | None, tolerance: int, now: float | None = None, *, header: str) -> int:
    """Seconds since the epoch, within `tolerance` of now in both directions."""
    if not raw:
        raise unauthorized(
            "missing_timestamp", f"the {header} header is missing", f"send {header} with every delivery"
        )
    if not UNIX_TIME.fullmatch(raw):
        raise unauthorized(
            "bad_timestamp",
            f"{header} is not a Unix timestamp: {raw[:40]!r}",
            "send whole seconds since the epoch in ASCII digits",
        )
    value = int(float(raw))
    if value > 10**11:  # milliseconds (HubSpot sends those)
        value //= 1000
    skew = (time.time() if now is None else now) - value
    if abs(skew) > tolerance:
        direction = "old" if skew > 0 else "in the future"
        raise unauthorized(
            "stale_timestamp",
            f"{header} is {abs(int(skew))} s {direction}; deliveries are accepted within {tolerance} s",
            "check the sender's clock; a replayed delivery is refused this way",
        )
    return value


@functools.lru_cache(maxsize=64)  # a few configured secrets, decoded once instead of per delivery
def decode_standard_secret(secret: str) -> bytes:
    """Standard Webhooks secrets are `whsec_` + base64 of the key bytes. A malformed one is a
    ConfigError; the intake checks configured secrets with `standard_secret_problem` first,
    which names the variable (webhooks/intake.py SecretSetting.check)."""
    problem = standard_secret_problem(secret)
    if problem is not None:
        raise ConfigError(f"a Standard Webhooks secret is malformed: {problem}")
    return base64.b64decode(secret.removeprefix("whsec_"), validate=True)


def standard_secret_problem(secret: str) -> str | None:
    """What is wrong with a Standard Webhooks secret, or None. Never includes the secret."""
    try:
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError):
        return "it is not whsec_ followed by base64"
    return None if key else "it holds no key bytes after whsec_"


def sign_standard(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value for a delivery (used by the sandbox and the tests)."""
    return "v1," + _standard_digest(secret, msg_id, timestamp, body)


def _standard_digest(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The base64 HMAC of `id.timestamp.body` under the secret's key."""
    digest = hmac_sha256(decode_standard_secret(secret), f"{msg_id}.{timestamp}.".encode() + body)
    return base64.b64encode(digest).decode()


def verify_standard(
    secrets: list[str],
    msg_id: str | None,
    timestamp: str | None,
    signature_header: str | None,
    body: bytes,
    tolerance: int,
    now: float | None = None,
) -> None:
    """Standard Webhooks (standardwebhooks.com): HMAC-SHA256 over `id.timestamp.body`.

    The header may carry several space-separated `v1,<base64>` signatures (secret
    rotation); any one matching any configured secret is enough.
    """
    if not msg_id:
        raise unauthorized("missing_id", "the webhook-id header is missing")
    if not signature_header:
        raise unauthorized("missing_signature", "the webhook-signature header is missing")
    ts = check_timestamp(timestamp, tolerance, now, header="webhook-timestamp")
    offered = [part.partition(",")[2] for part in signature_header.split() if part.startswith("v1,")]
    if not offered:
        raise unauthorized("bad_signature", "webhook-signature has no v1,<base64> signature")
    for secret in secrets:
        expected = _standard_digest(secret, msg_id, ts, body)
        if any(constant_time_equals(expected, candidate) for candidate in offered):
            return
    raise unauthorized(
        "bad_signature",
        "webhook-signature does not match the body",
        "the sender must sign id.timestamp.body with the connection's whsec_ secret",
    )


def sign_timestamped_hmac(secret: str, timestamp: int, body: bytes) -> str:
    """`t=<unix>,v1=<hex>` over `t.body`: our header for senders without a standard of their own."""
    digest = hmac_sha256(secret.encode(), f"{timestamp}.".encode() + body).hex()
    return f"t={timestamp},v1={digest}"


def verify_timestamped_hmac(
    secret: str,
    header_value: str | None,
    body: bytes,
    tolerance: int,
    *,
    header: str,
    now: float | None = None,
) -> None:
    if not header_value:
        raise unauthorized(
            "missing_signature", f"the {header} header is missing", f"sign as {header}: t=<unix>,v1=<hex>"
        )
    parts = dict(p.strip().partition("=")[::2] for p in header_value.split(","))
    ts = check_timestamp(parts.get("t"), tolerance, now, header=f"{header} t=")
    expected = sign_timestamped_hmac(secret, ts, body).partition(",v1=")[2]
    if not constant_time_equals(expected, parts.get("v1", "")):
        raise unauthorized(
            "bad_signature",
            f"{header} does not match the body",
            "sign HMAC-SHA256(secret, '<t>.<raw body>') as hex, with the connection's EVENTS_SECRET",
        )
