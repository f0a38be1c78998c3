"""SOAP 1.1 plumbing for XML webhooks: safe parsing, the fault envelope, and the
Salesforce Outbound Message acknowledgement.

Parsing goes through defusedxml only, with DTDs forbidden outright: no document we
accept needs one, and refusing them stops entity expansion ("billion laughs") and
external entity (XXE) tricks before they start.
"""

from __future__ import annotations

from xml.etree.ElementTree import Element, ParseError
from xml.sax.saxutils import escape

import defusedxml.ElementTree as SafeET
from defusedxml.common import DefusedXmlException

from webhooks.errors import WebhookError, bad_request

SOAP_ENV_NS = "http://schemas.xmlsoap.org/soap/envelope/"
XSI_NS = "http://www.w3.org/2001/XMLSchema-instance"
ERROR_NS = "urn:crm-approvals:webhooks"

# Salesforce retries an Outbound Message for up to 24 h unless it gets exactly this back.
OUTBOUND_ACK = (
    '<?xml version="1.0" encoding="UTF-8"?>'
    '<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/">'
    "<soapenv:Body>"
    '<notificationsResponse xmlns="http://soap.sforce.com/2005/09/outbound">'
    "<Ack>true</Ack>"
    "</notificationsResponse>"
    "</soapenv:Body>"
    "</soapenv:Envelope>"
)


def qname(namespace: str, local: str) -> str:
    """ElementTree's `{namespace}local` spelling."""
    return f"{{{namespace}}}{local}"


def parse_xml(body: bytes) -> Element:
    """The document's root element; a clear 400 for anything malformed or unsafe."""
    try:
        return SafeET.fromstring(body, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except DefusedXmlException as exc:
        raise bad_request(
            "unsafe_xml",
            f"the XML declares a DTD or entities, which are refused ({type(exc).__name__})",
            "send the SOAP envelope without a <!DOCTYPE>",
        ) from None
    except ParseError as exc:
        line, column = exc.position
        raise bad_request(
            "malformed_xml",
            f"the body is not well-formed XML: {_parse_reason(exc)} at line {line} column {column}",
            "send the SOAP 1.1 envelope exactly as Salesforce produces it",
        ) from None


def soap_body_child(root: Element, namespace: str, local: str) -> Element:
    """The `<local>` element in namespace `namespace` directly inside `<soapenv:Body>`."""
    if root.tag != qname(SOAP_ENV_NS, "Envelope"):
        raise bad_request(
            "not_soap",
            f"the root element is {_short(root.tag)!r}, not a SOAP 1.1 soapenv:Envelope",
            f"wrap the message in <soapenv:Envelope xmlns:soapenv={SOAP_ENV_NS!r}>",
        )
    body = root.find(qname(SOAP_ENV_NS, "Body"))
    found = body.find(qname(namespace, local)) if body is not None else None
    if found is None:
        raise bad_request(
            "not_soap",
            f"soapenv:Body has no <{local}> element in namespace {namespace}",
            "send an unmodified Salesforce Outbound Message",
        )
    return found


def is_nil(element: Element) -> bool:
    return element.get(qname(XSI_NS, "nil"), "").strip().lower() in ("true", "1")


def fault(error: WebhookError) -> str:
    """A SOAP 1.1 Client fault: the reason and how to fix it, plus our error code as detail."""
    reason = error.message if not error.hint else f"{error.message}. Fix: {error.hint}"
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f'<soapenv:Envelope xmlns:soapenv="{SOAP_ENV_NS}">'
        "<soapenv:Body><soapenv:Fault>"
        f"<faultcode>soapenv:{'Client' if error.status < 500 else 'Server'}</faultcode>"
        f"<faultstring>{escape(reason)}</faultstring>"
        f'<detail><err:error xmlns:err="{ERROR_NS}">'
        f"<err:code>{escape(error.code)}</err:code><err:status>{error.status}</err:status>"
        "</err:error></detail>"
        "</soapenv:Fault></soapenv:Body></soapenv:Envelope>"
    )


def _parse_reason(exc: ParseError) -> str:
    # "mismatched tag: line 1, column 8" -> "mismatched tag" (we add the position ourselves)
    return str(exc).split(":")[0]


def _short(tag: str) -> str:
    return tag.rpartition("}")[2]
