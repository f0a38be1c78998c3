"""webhooks/signatures.py's HMAC from cached key states: the same bytes as the standard
library's HMAC for keys of every length (shorter, equal to and longer than SHA-256's 64-byte
block) and bodies of every size, and a wrong key or body is still refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import random
import time

import pytest

from webhooks.errors import WebhookError
from webhooks.signatures import (
    _hmac_states,
    hmac_sha256,
    sign_standard,
    sign_timestamped_hmac,
    verify_standard,
    verify_timestamped_hmac,
)


def test_hmac_sha256_equals_the_standard_library_for_many_keys_and_bodies() -> None:
    rng = random.Random(1201)
    key_sizes = [0, 1, 16, 32, 63, 64, 65, 100, 128, 200]
    body_sizes = [0, 1, 55, 56, 63, 64, 65, 300, 1000, 70_000]
    keys = [rng.randbytes(n) for n in key_sizes] + [os.urandom(rng.randrange(1, 150)) for _ in range(40)]
    for key in keys:
        for size in body_sizes:
            body = rng.randbytes(size)
            assert hmac_sha256(key, body) == hmac.new(key, body, hashlib.sha256).digest()
            # again, from the cached states: copying them must not have changed them
            assert hmac_sha256(key, body) == hmac.new(key, body, hashlib.sha256).digest()


def test_the_cached_states_are_bounded_and_keyed_by_the_whole_key() -> None:
    for n in range(500):
        hmac_sha256(f"key-{n}".encode(), b"body")
    assert _hmac_states.cache_info().currsize <= 128
    # keys that agree in their first 64 bytes (the block) are still different keys
    a, b = b"k" * 64 + b"a", b"k" * 64 + b"b"
    assert hmac_sha256(a, b"x") != hmac_sha256(b, b"x")
    # a key and the same key padded with NUL bytes give the same HMAC (RFC 2104 pads with zeros)
    assert hmac_sha256(b"short", b"x") == hmac.new(b"short\0\0", b"x", hashlib.sha256).digest()


def test_standard_webhooks_signature_matches_a_reference_and_refuses_a_wrong_key_or_body() -> None:
    secret = "whsec_" + base64.b64encode(b"0123456789abcdef0123").decode()
    other = "whsec_" + base64.b64encode(b"another key, same use").decode()
    ts = int(time.time())
    body = b'{"type": "record.updated"}'
    reference = base64.b64encode(
        hmac.new(b"0123456789abcdef0123", f"msg_1.{ts}.".encode() + body, hashlib.sha256).digest()
    ).decode()
    assert sign_standard(secret, "msg_1", ts, body) == "v1," + reference
    verify_standard([secret], "msg_1", str(ts), f"v1,{reference}", body, 300)
    verify_standard([other, secret], "msg_1", str(ts), f"v1,AAAA v1,{reference}", body, 300)
    for secrets, msg_id, signed_body in (
        ([other], "msg_1", body),  # wrong key
        ([secret], "msg_2", body),  # another id
        ([secret], "msg_1", body + b" "),  # another body
    ):
        with pytest.raises(WebhookError) as refused:
            verify_standard(secrets, msg_id, str(ts), f"v1,{reference}", signed_body, 300)
        assert refused.value.code == "bad_signature"


def test_timestamped_hmac_matches_a_reference_and_refuses_a_wrong_secret() -> None:
    ts = int(time.time())
    body = b"payload"
    expected = hmac.new(b"s3cret", f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    assert sign_timestamped_hmac("s3cret", ts, body) == f"t={ts},v1={expected}"
    verify_timestamped_hmac("s3cret", f"t={ts},v1={expected}", body, 300, header="X-Sig")
    with pytest.raises(WebhookError) as refused:
        verify_timestamped_hmac("other", f"t={ts},v1={expected}", body, 300, header="X-Sig")
    assert refused.value.code == "bad_signature"
