"""Salesforce intake for the contract suite: the Outbound Message endpoint.

The adapter harness lives in harness_salesforce.py; this module defines INTAKE_HARNESS only.
`outbound_message()` builds a message in Salesforce's documented SOAP format (Outbound
Messaging WSDL, notifications()) and is shared with tests/webhooks/test_intake_salesforce.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from xml.sax.saxutils import escape

from tests.contract.harness import Delivery, IntakeHarness
from webhooks.soap import OUTBOUND_ACK

ORG_ID = "00D5e000000AbCdEAK"
OTHER_ORG_ID = "00D5e000000XyZwEAK"
OUTBOUND_TOKEN = "obm-url-token-5c1e9a7d3f"  # SALESFORCE_OUTBOUND_TOKEN, required by default
INSTANCE = "https://acme.my.salesforce.com"


@dataclass(frozen=True)
class Notification:
    notification_id: str  # <Id>: stays the same when Salesforce retries
    record_id: str  # <sf:Id>
    fields: Mapping[str, str | None] = field(default_factory=dict)  # None -> xsi:nil="true"
    object_type: str = "Opportunity"


def outbound_message(notifications: Sequence[Notification], org_id: str = ORG_ID) -> bytes:
    """A SOAP 1.1 Outbound Message exactly as Salesforce sends one (SessionId not sent)."""
    org15 = org_id[:15]
    body = "".join(_notification_xml(n) for n in notifications)
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" '
        'xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">\n'
        " <soapenv:Body>\n"
        '  <notifications xmlns="http://soap.sforce.com/2005/09/outbound">\n'
        f"   <OrganizationId>{org_id}</OrganizationId>\n"
        "   <ActionId>04k5e000000CaRkAAK</ActionId>\n"
        '   <SessionId xsi:nil="true"/>\n'
        f"   <EnterpriseUrl>{INSTANCE}/services/Soap/c/62.0/{org15}</EnterpriseUrl>\n"
        f"   <PartnerUrl>{INSTANCE}/services/Soap/u/62.0/{org15}</PartnerUrl>\n"
        f"{body}"
        "  </notifications>\n"
        " </soapenv:Body>\n"
        "</soapenv:Envelope>\n"
    ).encode()


def _notification_xml(n: Notification) -> str:
    fields = "".join(_field_xml(name, value) for name, value in n.fields.items())
    return (
        "   <Notification>\n"
        f"    <Id>{n.notification_id}</Id>\n"
        f'    <sObject xsi:type="sf:{n.object_type}" xmlns:sf="urn:sobject.enterprise.soap.sforce.com">\n'
        f"     <sf:Id>{n.record_id}</sf:Id>\n"
        f"{fields}"
        "    </sObject>\n"
        "   </Notification>\n"
    )


def _field_xml(name: str, value: str | None) -> str:
    if value is None:
        return f'     <sf:{name} xsi:nil="true"/>\n'
    return f"     <sf:{name}>{escape(value)}</sf:{name}>\n"


MODIFIER = "0055e000001T7QxAAK"  # a user id; messages may carry the 15-character form


class SalesforceOutboundIntakeHarness(IntakeHarness):
    kind = "salesforce"
    env = {
        "CRM_CONNECTIONS": "salesforce",
        "SALESFORCE_ORG_IDS": ORG_ID,
        "SALESFORCE_OUTBOUND_TOKEN": OUTBOUND_TOKEN,
    }
    object_type = "Opportunity"
    modified_by = MODIFIER  # LastModifiedById, selected in the Outbound Message
    record_id = "0065e00000R1001AAB"  # 15 characters and their checksum suffix

    def signed_delivery(self, record_id: str, event_id: str, timestamp: int) -> Delivery:
        return self._delivery(record_id, event_id, ORG_ID)

    def forged_delivery(self, record_id: str, event_id: str, timestamp: int) -> Delivery:
        # Nothing is signed: a forgery is a message from an org that is not on the allow-list.
        return self._delivery(record_id, event_id, OTHER_ORG_ID)

    def stale_delivery(self, record_id: str, event_id: str, timestamp: int) -> Delivery | None:
        # Outbound Messages carry no signed timestamp (and are legitimately retried for 24 h),
        # so there is no window to be outside of; redeliveries are caught by the notification id.
        return None

    def accepted(self, status: int, body: bytes) -> bool:
        return status == 200 and body.decode() == OUTBOUND_ACK

    def _delivery(self, record_id: str, event_id: str, org_id: str) -> Delivery:
        message = outbound_message(
            [
                Notification(
                    event_id,
                    record_id,
                    {
                        "StageName": "Negotiation/Review",
                        "Amount": "150000.0",
                        "LastModifiedById": MODIFIER[:15],
                    },
                )
            ],
            org_id=org_id,
        )
        return Delivery(
            path=f"/webhooks/salesforce/outbound?connection=salesforce&token={OUTBOUND_TOKEN}",
            body=message,
            headers={"Content-Type": "text/xml; charset=utf-8", "SOAPAction": '""'},
        )


INTAKE_HARNESS = SalesforceOutboundIntakeHarness()
