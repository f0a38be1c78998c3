"""Signed Standard Webhooks deliveries of the sandbox CRM's record changes, for the benches."""

from __future__ import annotations

import json
import time
import uuid

from webhooks.signatures import sign_standard

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # SANDBOX_WEBHOOK_SECRET of every bench server


def signed_delivery(record_id: str, amount: int, stage: str) -> tuple[bytes, dict[str, str]]:
    """The body and headers of one `record.updated` delivery of a deal's amount change."""
    body = json.dumps(
        {
            "type": "record.updated",
            "timestamp": "2026-11-23T10:00:00Z",
            "data": {
                "object": "deal",
                "id": record_id,
                "changed_fields": ["amount"],
                "values": {"amount": amount, "stage": stage},
            },
        }
    ).encode()
    msg_id, ts = f"msg_{uuid.uuid4().hex}", int(time.time())
    headers = {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign_standard(SECRET, msg_id, ts, body),
    }
    return body, headers
