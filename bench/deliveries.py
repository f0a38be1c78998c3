"""Signed webhook deliveries of record changes, for the benches: Standard Webhooks in the
sandbox CRM's format (one change each), and HubSpot's (up to 100 changes each)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence

from webhooks.hubspot import sign_v3
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


HUBSPOT_SECRET = "5a7c1e93-2f4b-4d8e-9c61-0b3a8e7d2f45"  # HUBSPOT_CLIENT_SECRET of the bench server
HUBSPOT_BATCH = 100  # events per HubSpot webhook request, at most


def hubspot_delivery(
    uri: str, changes: Sequence[tuple[str, int]], first_event_id: int
) -> tuple[bytes, dict[str, str]]:
    """One HubSpot webhook request: a JSON array of `deal.propertyChange` events of the deals'
    amounts ((record id, amount) each), signed v3 over POST + `uri` + body + timestamp as
    HubSpot signs it (webhooks/hubspot.py; format: docs/crms/hubspot.md, legacy webhooks guide)."""
    if len(changes) > HUBSPOT_BATCH:
        raise ValueError(f"HubSpot sends at most {HUBSPOT_BATCH} events per request, not {len(changes)}")
    now_ms = int(time.time() * 1000)
    body = json.dumps(
        [
            {
                "eventId": first_event_id + n,
                "subscriptionId": 2538662,
                "portalId": 62515,
                "appId": 4567890,
                "occurredAt": now_ms - 1000,
                "subscriptionType": "deal.propertyChange",
                "attemptNumber": 0,
                "objectId": int(record_id),
                "propertyName": "amount",
                "propertyValue": str(amount),
                "changeSource": "CRM_UI",
                "sourceId": "userId:882761034",
            }
            for n, (record_id, amount) in enumerate(changes)
        ]
    ).encode()
    timestamp = str(now_ms)
    headers = {
        "Content-Type": "application/json",
        "X-HubSpot-Signature-v3": sign_v3(HUBSPOT_SECRET, "POST", uri, body, timestamp),
        "X-HubSpot-Request-Timestamp": timestamp,
        "X-HubSpot-Signature-Version": "v3",
    }
    return body, headers
