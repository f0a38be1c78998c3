"""SOAP 1.1 plumbing for XML webhooks: safe parsing, the fault envelope, and the
Salesforce Outbound Message acknowledgement.

Parsing goes through defusedxml only, with DTDs forbidden outright: no document we
accept needs one, and refusing them stops entity expansion ("billion laughs") and
external entity (XXE) tricks before they start.
"""

from __future__ import annotations

import re
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


# The encoding named in an XML declaration (the declaration must come first, after a BOM).
DECLARED_ENCODING = re.compile(rb"""(?:\xef\xbb\xbf)?<\?xml\s[^>]*?\bencoding\s*=\s*["']([^"']*)["']""")
UTF8_NAMES = (b"utf-8", b"utf8")


def qname(namespace: str, local: str) -> str:
    """ElementTree's `{namespace}local` spelling."""
    return f"{{{namespace}}}{local}"


def parse_xml(body: bytes) -> Element:
    """The document's root element; a clear 400 for anything malformed or unsafe, or not UTF-8."""
    check_utf8_declared(body)
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
    except (ValueError, LookupError) as exc:  # expat on encodings it cannot read, should one get past
        raise bad_request(
            "unsupported_encoding", f"the XML cannot be read: {exc}", "send the envelope in UTF-8"
        ) from None


def check_utf8_declared(body: bytes) -> None:
    """Salesforce sends UTF-8: a declaration naming another encoding is refused before parsing.
    expat reads some other encodings and fails on others with errors that are not parse errors
    (shift_jis, utf-7, utf-32, unknown names); the fault must still be the sender's (Client).
    Without a declaration expat itself tells UTF-8 from UTF-16 by the byte order mark."""
    declared = DECLARED_ENCODING.match(body[:200])
    name = declared.group(1) if declared else None
    if name is not None and name.strip().lower() not in UTF8_NAMES:
        raise bad_request(
            "unsupported_encoding",
            f"the XML declares encoding {name.decode('ascii', 'replace')[:40]!r}; only UTF-8 is accepted",
            'send the envelope in UTF-8 with <?xml version="1.0" encoding="UTF-8"?>, as Salesforce does',
        )


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
