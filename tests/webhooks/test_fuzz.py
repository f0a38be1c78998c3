"""Property-based fuzzing of every webhook endpoint and every API route (issue 8), on SQLite and
PostgreSQL: whatever arrives, the answer is never a 5xx; a 4xx carries the JSON error shape (a
SOAP Client fault on the Outbound Message endpoint); and a refused request writes no row.

The routes are read from the app's URL map, so a new endpoint is fuzzed without being listed
here; the signed test of a new webhook endpoint fails until it has a builder in DELIVERIES.
Three kinds of request:

* random: any method the route allows, random query strings, headers and bodies (bytes,
  JSON with NaN or 1,000 brackets, XML with odd encodings, forms), unsigned;
* signed webhooks: deliveries in each CRM's documented format, correctly signed with the test
  secrets so that they get past verification, with hostile values in any field;
* API calls with real tokens and request ids, with hostile query values and bodies.

The example budget comes from the Hypothesis profile (tests/conftest.py): `ci` by default,
`--hypothesis-profile=long` for the long run recorded in docs/operations.md ("Fuzzing").
"""

from __future__ import annotations

import json
import re
import sys
import time
import xml.etree.ElementTree as StdET
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote
from xml.sax.saxutils import escape

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from connector.config import Settings
from connector.crm.salesforce_ids import normalize_salesforce_id
from connector.runtime import Runtime
from connector.storage.db import Base
from tests.conftest import SANDBOX_SECRET
from tests.webhooks.test_api import World, build_world
from webhooks.hubspot import decode_for_signature, sign_v3
from webhooks.signatures import sign_standard, sign_timestamped_hmac

ORG_ID = "00D5e000000AbCdEAK"
OUTBOUND_TOKEN = "obm-fuzz-token-5d1c"
EVENTS_SECRET = "sf-events-fuzz-secret"
HUBSPOT_SECRET = "hubspot-fuzz-client-secret"
ZOHO_NOTIFY_TOKEN = "zoho-fuzz-notify-token"
ZOHO_WORKFLOW_SECRET = "zoho-fuzz-workflow-secret"
BITRIX_TOKEN = "bitrix-fuzz-application-token"
FUZZ_ENV = {
    "CRM_CONNECTIONS": "sandbox,salesforce,hubspot,zoho,bitrix24",
    "SANDBOX_WEBHOOK_SECRET": SANDBOX_SECRET,
    "SALESFORCE_ORG_IDS": ORG_ID,
    "SALESFORCE_OUTBOUND_TOKEN": OUTBOUND_TOKEN,
    "SALESFORCE_EVENTS_SECRET": EVENTS_SECRET,
    "HUBSPOT_CLIENT_SECRET": HUBSPOT_SECRET,
    "ZOHO_NOTIFY_TOKEN": ZOHO_NOTIFY_TOKEN,
    "ZOHO_WORKFLOW_SECRET": ZOHO_WORKFLOW_SECRET,
    "BITRIX24_APPLICATION_TOKEN": BITRIX_TOKEN,
}
SOAP_PATHS = {"/webhooks/salesforce/outbound"}  # answers SOAP faults, not JSON
SOAP_ENV = "{http://schemas.xmlsoap.org/soap/envelope/}"
# A refusal that is audited on purpose: the code -> the tables it may add a row to.
AUDITED_REFUSALS = {"webhook_id_reused": {"audit_log", "audit_chain_head"}}
PLACEHOLDER = re.compile(r"<(?:(\w+)(?:\([^)]*\))?:)?(\w+)>")


# --- the app under test ---------------------------------------------------------------------


@dataclass
class Target:
    world: World
    request_ids: list[str]
    settings: Settings
    sent: int = 0  # requests sent, checked against the profile's budget
    callback_id: str = ""  # a check step awaiting its answer on /webhooks/checks/<id> (issue 12)

    def routes(self, prefix: str) -> list[tuple[str, str]]:
        """(rule, method) for every route under `prefix`, from the URL map."""
        return sorted(
            (rule.rule, method)
            for rule in self.world.app.url_map.iter_rules()
            if rule.rule.startswith(prefix)
            for method in rule.methods or ()
            if method not in ("HEAD", "OPTIONS")
        )


@pytest.fixture(params=["sqlite", "postgresql"])
def target(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    settings_factory: Callable[..., Settings],
    runtime_factory: Callable[[Settings], Runtime],
) -> Target:
    overrides = {"database_url": request.getfixturevalue("pg_url")} if request.param == "postgresql" else {}
    (tmp_path / "mappings").mkdir(exist_ok=True)
    (tmp_path / "mappings" / "company.yaml").write_text(CALLBACK_CHECK_MAPPING)
    world = build_world(
        tmp_path, settings_factory, runtime_factory, env=FUZZ_ENV, variables=CHECK_VARIABLES, **overrides
    )
    request_ids = [world.submit("D-1"), world.submit("D-2", amount=60000), world.submit("D-3")]
    world.vote("u-mgr", request_ids[2], comment="ok")
    return Target(world, request_ids, world.runtime.settings, callback_id=awaiting_check(world))


# A company approval whose first step waits for an external check's signed callback.
CHECK_CALLBACK_SECRET = "check-fuzz-callback-secret"
CHECK_VARIABLES = {"CHECK_CALLBACK_SECRET": CHECK_CALLBACK_SECRET}
CALLBACK_CHECK_MAPPING = """\
connection: sandbox
object: company
fields: {name: name, owner: {api: owner_id, type: user}}
roles: {cfo: [u-gm]}
rules:
  - name: company-approval
    when: {name: {eq: never}}
    steps:
      - name: security-check
        kind: check
        check:
          url: https://verify.example/v1/check
          answer: callback
          callback_secret_env: CHECK_CALLBACK_SECRET
          response: {verdict: verdict, score: {api: result.score, type: number}}
          routes:
            - {when: {verdict: clear}, then: continue}
            - {when: {score: {lt: 50}}, then: {back: security-check, message: "low {{ answer.score }}"}}
            - {when: {verdict: reject}, then: {reject: "{{ answer.reason }}"}}
          on_failure: reject
      - {name: cfo, mode: one, approvers: [{role: cfo}]}
"""


def awaiting_check(world: World) -> str:
    """Open the company approval and let the worker call the check (mocked): it awaits its answer."""
    import responses as mocked

    from connector.service import service_steps
    from connector.service.pipeline import build_context
    from connector.storage.approval_store import RecordKey
    from connector.storage.company_models import ServiceStepJob
    from connector.storage.db import transaction

    [spec] = world.runtime.mappings.for_object("sandbox", "company")
    values = {"name": "Acme", "owner_id": "u-rep"}
    with transaction(world.runtime.sessions) as session:
        context = build_context(spec, values, None, set(values))
        world.runtime.approvals.open_for(
            session, RecordKey("sandbox", "company", "C-1"), spec, spec.rules[0], context
        )
    with mocked.RequestsMock() as rsps:
        rsps.post("https://verify.example/v1/check", status=202, json={"queued": True})
        service_steps.run_due(world.runtime)
    with world.runtime.sessions() as session:
        [job] = session.scalars(select(ServiceStepJob)).all()
    assert job.status == "awaiting"
    return job.callback_id


def row_counts(runtime: Runtime) -> dict[str, int]:
    tables = Base.metadata.sorted_tables
    query = select(*(select(func.count()).select_from(t).scalar_subquery().label(t.name) for t in tables))
    with runtime.sessions() as session:
        return dict(session.execute(query).one()._mapping)


def send(target: Target, method: str, path: str, body: bytes, headers: Mapping[str, str]) -> int:
    """One request, and the three promises about its answer; returns its status."""
    target.sent += 1
    before = row_counts(target.world.runtime)
    response = target.world.client.open(path, method=method, data=body, headers=dict(headers))
    status = response.status_code
    shown = f"{method} {path[:200]} -> {status}: {response.get_data(as_text=True)[:300]}"
    assert status < 500, shown
    if status < 400:
        return status
    if path.partition("?")[0] in SOAP_PATHS and status != 405:  # 405 is answered before the route
        code = soap_client_fault_code(response.data, shown)
    else:
        assert response.is_json, shown
        error = response.get_json()["error"]
        assert isinstance(error["code"], str) and error["code"], shown
        assert isinstance(error["message"], str) and error["message"], shown
        code = error["code"]
    after = row_counts(target.world.runtime)
    allowed = AUDITED_REFUSALS.get(code, set())
    changed = {t: (before[t], after[t]) for t in before if before[t] != after[t] and t not in allowed}
    assert not changed, f"{shown}\nrows written by a refused request: {changed}"
    return status


def ran_the_budget(target: Target, record_property: Callable[[str, object], None]) -> None:
    """Every example of the profile was sent (none filtered away), and the count is recorded
    (`--junitxml` shows it as the property requests_sent)."""
    record_property("requests_sent", target.sent)
    assert target.sent >= settings().max_examples, (target.sent, settings().max_examples)


def soap_client_fault_code(body: bytes, shown: str) -> str:
    root = StdET.fromstring(body)
    fault = root.find(f"{SOAP_ENV}Body/{SOAP_ENV}Fault")
    assert fault is not None, shown
    assert fault.findtext("faultcode") == "soapenv:Client", shown
    assert fault.findtext("faultstring"), shown
    return fault.findtext("detail/{urn:crm-approvals:webhooks}error/{urn:crm-approvals:webhooks}code") or ""


# --- hostile values -------------------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """JSON text spliced in as it is: what json.dumps cannot write (4,400 digits, 1,000 brackets)."""

    text: str


NASTY_TEXT = st.sampled_from(
    [
        "",
        " ",
        "\x00",
        "a\x00b",
        "\ud800",
        "x\udfffy",
        "²",
        "١٢٣",
        "９",
        "9" * 30,
        "inf",
        "NaN",
        "1e400",
        "-1",
        "0",
        "x" * 129,
        "y" * 301,
        "z" * 5000,
        "'; DROP TABLE inbox_events; --",
        "' OR Name != '",
        "]]><!--",
        "{{ 7 * 7 }}",
        "0001-01-01T00:00:00+05:00",
        "9999-12-31T23:59:59-05:00",
        "2026-02-30T10:00:00Z",
        "\u202e\u200b",
        "%00",
        "\r\n",
        "t=inf,v1=00",
        "t=1e400,v1=00",
        "whsec_",
    ]
)
TEXT = st.one_of(NASTY_TEXT, st.text(max_size=40), st.text(st.characters(codec="utf-8"), max_size=20))
NUMBER = st.one_of(
    st.integers(),
    st.integers(min_value=2**63 - 2, max_value=2**64 + 2),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([Raw("1" * 4400), Raw("1e400"), Raw("-1e400"), Raw("NaN"), Raw("Infinity"), 10**300]),
)
SCALAR = st.one_of(TEXT, NUMBER, st.booleans(), st.none())
DEEP = st.integers(min_value=30, max_value=1200).map(lambda n: Raw("[" * n + "]" * n))
HOSTILE = st.one_of(
    SCALAR,
    DEEP,
    st.recursive(
        SCALAR,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
        max_leaves=6,
    ),
)


def to_json(value: Any) -> str:
    """JSON text, with NaN and Infinity as Python writes them, lone surrogates escaped, Raw spliced."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(str(k))}:{to_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(to_json(v) for v in value) + "]"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return json.dumps(value)


def utf8(text: str) -> bytes:
    """Bytes as a careless sender would encode them: lone surrogates too."""
    return text.encode("utf-8", "surrogatepass")


def header_text(max_size: int = 60) -> st.SearchStrategy[str]:
    """What an HTTP header can carry (Latin-1 without control characters), nasty values first."""
    nasty = NASTY_TEXT.filter(
        lambda t: t.isprintable() and all(ord(c) <= 0xFF for c in t) and len(t) <= max_size
    )
    return nasty | st.text(
        st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=max_size
    )


HOSTILE_ODDS = 6  # one field in this many is hostile (0: none, to check the builders themselves)


def maybe(draw: st.DrawFn, valid: Any, hostile: st.SearchStrategy[Any] = HOSTILE) -> Any:
    """The valid value, or (one time in six) a hostile one in its place: most deliveries then
    carry one or two hostile fields and get past the first checks to the deeper ones."""
    # sampled_from, not integers(): Hypothesis favours the bounds of a range of integers.
    hostile_now = HOSTILE_ODDS and draw(st.sampled_from(range(HOSTILE_ODDS))) == HOSTILE_ODDS - 1
    return draw(hostile) if hostile_now else valid


@st.composite
def check_callback(draw: st.DrawFn, target: Target) -> Delivery:
    """An external check's signed answer (issue 12); after the first one decides, the others are
    verified redeliveries (200, nothing changes)."""
    from webhooks.checks import sign_callback

    answer = {
        "verdict": maybe(draw, draw(st.sampled_from(["clear", "reject", "more_documents"]))),
        "reason": maybe(draw, "no findings"),
        "result": maybe(draw, {"score": maybe(draw, 80)}),
    }
    raw = utf8(to_json(answer))
    timestamp = maybe(draw, int(time.time()), st.integers(min_value=-(2**40), max_value=2**40))
    secret = maybe(draw, CHECK_CALLBACK_SECRET, header_text(40))
    headers = {
        "Content-Type": "application/json",
        "X-Check-Timestamp": str(timestamp),
        "X-Check-Signature": maybe(draw, sign_callback(secret, int(timestamp), raw), header_text(100)),
    }
    callback_id = maybe(draw, target.callback_id, header_text(80).map(lambda t: quote(t, safe="")))
    path = f"/webhooks/checks/{callback_id}"
    return path, raw, headers


def form_body(pairs: list[tuple[str, Any]]) -> bytes:
    return b"&".join(
        quote(utf8(str(k)), safe="").encode() + b"=" + quote(utf8(str(v)), safe="").encode() for k, v in pairs
    )


def query_string(pairs: list[tuple[str, str]]) -> str:
    return ("?" + form_body(list(pairs)).decode()) if pairs else ""


# --- random requests to every route -------------------------------------------------------------

PARAMETER_NAMES = st.sampled_from(
    [
        "connection",
        "token",
        "limit",
        "cursor",
        "status",
        "all",
        "pending_for",
        "rule",
        "record",
        "object",
        "submitted_after",
        "submitted_before",
        "state",
        "kind",
        "code",
        "older_than",
        "newer_than",
        "offset",
    ]
)
CONTENT_TYPES = st.sampled_from(
    [
        "application/json",
        "text/xml; charset=utf-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "text/plain",
        "application/json; charset=shift_jis",
        "",
    ]
)
HEADER_NAMES = st.sampled_from(
    [
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
        "X-HubSpot-Signature-v3",
        "X-HubSpot-Request-Timestamp",
        "X-CRM-Approvals-Signature",
        "Authorization",
        "SOAPAction",
        "Origin",
    ]
)


@st.composite
def random_body(draw: st.DrawFn) -> bytes:
    encoding = draw(
        st.sampled_from(["UTF-8", "bogus", "shift_jis", "utf-7", "utf-32", "UTF-16", "latin-1", ""])
    )
    return draw(
        st.one_of(
            st.binary(max_size=300),
            HOSTILE.map(lambda v: utf8(to_json(v))),
            st.integers(min_value=1, max_value=3000).map(lambda n: b"[" * n),
            st.just(b"1" * 4400),
            st.just(f'<?xml version="1.0" encoding="{encoding}"?><a>\u00e9</a>'.encode("latin-1")),
            st.lists(st.tuples(TEXT, TEXT), max_size=4).map(form_body),
        )
    )


def fill_path(draw: st.DrawFn, rule: str, real_ids: list[str]) -> str:
    def value(match: re.Match[str]) -> str:
        converter, name = match.group(1), match.group(2)
        if converter == "int":
            return str(draw(st.one_of(st.integers(0, 2**31 + 5), st.sampled_from([1, 2**31 - 1]))))
        known = [*real_ids, "approve", "reject", "recall", "retry", "discard"] if name else []
        text = draw(st.one_of(st.sampled_from(known), TEXT.filter(lambda t: t not in ("", ".", ".."))))
        return quote(utf8(text), safe="")

    return PLACEHOLDER.sub(value, rule)


@st.composite
def random_request(draw: st.DrawFn, target: Target) -> tuple[str, str, bytes, dict[str, str]]:
    rule, method = draw(st.sampled_from(target.routes("/webhooks/") + target.routes("/api/")))
    path = fill_path(draw, rule, target.request_ids)
    query = draw(st.lists(st.tuples(st.one_of(PARAMETER_NAMES, TEXT), TEXT), max_size=3))
    headers = draw(st.dictionaries(HEADER_NAMES, header_text(), max_size=4))
    headers["Content-Type"] = draw(st.one_of(CONTENT_TYPES, header_text(30)))
    if draw(st.booleans()):
        user = draw(st.sampled_from(sorted(target.world.tokens)))
        headers["Authorization"] = f"Bearer {target.world.tokens[user]}"
    return method, path + query_string(query), draw(random_body()), headers


def test_random_requests_to_every_route(
    target: Target, record_property: Callable[[str, object], None]
) -> None:
    assert target.routes("/webhooks/") and target.routes("/api/")

    @given(request=random_request(target))
    def never_a_server_error(request: tuple[str, str, bytes, dict[str, str]]) -> None:
        send(target, *request)

    never_a_server_error()
    ran_the_budget(target, record_property)


# --- signed deliveries with hostile values --------------------------------------------------------

Delivery = tuple[str, bytes, dict[str, str]]  # path with query, body, headers


def now_ms() -> int:
    return int(time.time() * 1000)


@st.composite
def standard_delivery(draw: st.DrawFn, target: Target) -> Delivery:
    data = {
        "object": maybe(draw, "deal"),
        "id": maybe(draw, f"D-{draw(st.integers(1, 9))}"),
        "changed_fields": maybe(draw, ["amount"]),
        "values": maybe(draw, {"amount": maybe(draw, 150000), "stage": maybe(draw, "won")}),
        "origin": maybe(draw, "user"),
    }
    body = {
        "type": maybe(draw, "record.updated"),
        "timestamp": maybe(draw, "2026-11-23T10:00:00Z"),
        "data": maybe(draw, data),
    }
    raw = utf8(to_json(body))
    # A small pool of ids: the same id comes back with another body (409) or the same one (duplicate).
    pool = st.sampled_from(["msg_1", "msg_2", "msg_3"])
    msg_id = maybe(draw, f"msg_{draw(st.uuids()).hex}", st.one_of(pool, pool, header_text(400).filter(bool)))
    timestamp = int(time.time())
    headers = {
        "Content-Type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign_standard(SANDBOX_SECRET, msg_id, timestamp, raw),
    }
    return "/webhooks/standard", raw, headers


@st.composite
def hubspot_delivery(draw: st.DrawFn, target: Target) -> Delivery:
    def event() -> dict[str, Any]:
        return {
            "eventId": maybe(draw, draw(st.integers(1, 10**9))),
            "subscriptionId": 2281029,
            "portalId": 62515,
            "appId": 1160452,
            "occurredAt": maybe(draw, now_ms()),
            "subscriptionType": maybe(draw, draw(st.sampled_from(["deal.propertyChange", "deal.creation"]))),
            "attemptNumber": maybe(draw, 0),
            "objectId": maybe(draw, 1001),
            "propertyName": maybe(draw, "amount"),
            "propertyValue": maybe(draw, "150000"),
            "changeSource": maybe(draw, "CRM_UI"),
            "sourceId": maybe(draw, "userId:1"),
        }

    raw = utf8(to_json(maybe(draw, [event() for _ in range(draw(st.integers(1, 3)))])))
    path = "/webhooks/hubspot" + draw(st.sampled_from(["", "?connection=hubspot"]))
    timestamp = str(now_ms())
    uri = decode_for_signature(target.settings.public_base_url + path)
    headers = {
        "Content-Type": "application/json",
        "X-HubSpot-Request-Timestamp": timestamp,
        "X-HubSpot-Signature-v3": sign_v3(HUBSPOT_SECRET, "POST", uri, raw, timestamp),
    }
    return path, raw, headers


@st.composite
def outbound_delivery(draw: st.DrawFn, target: Target) -> Delivery:
    def text(valid: str) -> str:
        return escape(str(maybe(draw, valid, TEXT)), {'"': "&quot;"})

    def notification() -> str:
        valid = {
            "Amount": "150000.0",
            "StageName": "Negotiation/Review",
            "LastModifiedDate": "2026-11-23T10:00:00.000Z",
        }
        fields = {name: maybe(draw, value, TEXT) for name, value in valid.items() if draw(st.booleans())}
        record = normalize_salesforce_id(f"0065e00000R{draw(st.integers(0, 9999)):04d}")
        return (
            f"<Notification><Id>{text('04l5e00000Gx7QzAAJ')}</Id>"
            f'<sObject xsi:type="sf:{text("Opportunity")}" xmlns:sf="urn:sobject.enterprise.soap.sforce.com">'
            f"<sf:Id>{text(record)}</sf:Id>"
            + "".join(f"<sf:{name}>{escape(value)}</sf:{name}>" for name, value in fields.items())
            + "</sObject></Notification>"
        )

    encoding = maybe(
        draw, "UTF-8", st.sampled_from(["bogus", "shift_jis", "utf-7", "utf-32", "UTF-16", "latin-1"])
    )
    xml = (
        f'<?xml version="1.0" encoding="{encoding}"?>'
        '<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" '
        'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>'
        '<notifications xmlns="http://soap.sforce.com/2005/09/outbound">'
        f"<OrganizationId>{text(ORG_ID)}</OrganizationId><ActionId>04k5e000000CaRkAAK</ActionId>"
        + "".join(notification() for _ in range(maybe(draw, 1, st.integers(0, 3))))
        + "</notifications></soapenv:Body></soapenv:Envelope>"
    )
    path = f"/webhooks/salesforce/outbound?connection=salesforce&token={OUTBOUND_TOKEN}"
    return path, utf8(xml), {"Content-Type": "text/xml; charset=utf-8", "SOAPAction": '""'}


@st.composite
def change_event_delivery(draw: st.DrawFn, target: Target) -> Delivery:
    def event() -> dict[str, Any]:
        header = {
            "entityName": maybe(draw, "Opportunity"),
            "recordIds": maybe(
                draw, [normalize_salesforce_id(f"0065e00000R{draw(st.integers(0, 9999)):04d}")]
            ),
            "changeType": maybe(
                draw, draw(st.sampled_from(["UPDATE", "CREATE", "GAP_UPDATE", "GAP_OVERFLOW"]))
            ),
            "changeOrigin": maybe(draw, "com/salesforce/api/rest/62.0;client=crm-approvals"),
            "transactionKey": maybe(draw, f"0001b6f4-{draw(st.integers(0, 10**6))}"),
            "sequenceNumber": maybe(draw, 1),
            "commitTimestamp": maybe(draw, now_ms()),
            "commitUser": maybe(draw, "0055e000001AbCdAAK"),
            "changedFields": maybe(draw, ["Amount", "StageName"]),
            "diffFields": maybe(draw, []),
        }
        return {
            "ChangeEventHeader": maybe(draw, header),
            "Amount": maybe(draw, 150000),
            "StageName": maybe(draw, "Won"),
        }

    body = maybe(draw, [event() for _ in range(draw(st.integers(1, 3)))])
    raw = utf8(to_json(body))
    headers = {
        "Content-Type": "application/json",
        "X-CRM-Approvals-Signature": sign_timestamped_hmac(EVENTS_SECRET, int(time.time()), raw),
    }
    return "/webhooks/salesforce/events", raw, headers


@st.composite
def zoho_notification(draw: st.DrawFn, target: Target) -> Delivery:
    record = maybe(draw, "5725767000003000064")
    body = {
        "server_time": maybe(draw, now_ms()),
        "query_params": {},
        "module": maybe(draw, "Deals"),
        "resource_uri": "https://www.zohoapis.com/crm/v6/Deals",
        "ids": maybe(draw, [record]),
        "affected_fields": maybe(draw, [{str(record): maybe(draw, ["Stage"])}]),
        "affected_values": maybe(
            draw, [{"record_id": record, "values": maybe(draw, {"Stage": "Closed Won"})}]
        ),
        "operation": maybe(draw, "update"),
        "channel_id": maybe(draw, "1000000068001"),
        "token": maybe(draw, ZOHO_NOTIFY_TOKEN),
    }
    return "/webhooks/zoho/notify", utf8(to_json(body)), {"Content-Type": "application/json"}


@st.composite
def zoho_workflow(draw: st.DrawFn, target: Target) -> Delivery:
    params = {
        "crm_approvals_secret": maybe(draw, ZOHO_WORKFLOW_SECRET),
        "module": maybe(draw, "Deals"),
        "id": maybe(draw, "5725767000003000064"),
        "modified_time": maybe(draw, "2026-11-23T10:00:00+05:30"),
        "modified_by": maybe(draw, "5725767000000411001"),
        "Amount": maybe(draw, "150000"),
        maybe(draw, "Stage", TEXT): maybe(draw, "Closed Won"),
    }
    if draw(st.booleans()):
        return "/webhooks/zoho/workflow", utf8(to_json(params)), {"Content-Type": "application/json"}
    body = form_body([(k, to_json(v) if not isinstance(v, str) else v) for k, v in params.items()])
    return "/webhooks/zoho/workflow", body, {"Content-Type": "application/x-www-form-urlencoded"}


@st.composite
def bitrix24_event(draw: st.DrawFn, target: Target) -> Delivery:
    def text(valid: str) -> str:
        return str(maybe(draw, valid, TEXT))

    pairs = [
        ("event", text(maybe(draw, "ONCRMDEALUPDATE", st.just("ONCRMDYNAMICITEMADD")))),
        ("event_handler_id", text("201")),
        ("data[FIELDS][ID]", text("759")),
        ("data[FIELDS][ENTITY_TYPE_ID]", text("128")),
        ("ts", text(str(int(time.time())))),
        ("auth[domain]", text("example.bitrix24.com")),
        ("auth[member_id]", text("a223c6b3710f85df22e9377d6c4f7553")),
        ("auth[application_token]", text(BITRIX_TOKEN)),
    ]
    return "/webhooks/bitrix24", form_body(pairs), {"Content-Type": "application/x-www-form-urlencoded"}


DELIVERIES: dict[str, Callable[[Target], st.SearchStrategy[Delivery]]] = {
    "/webhooks/standard": standard_delivery,
    "/webhooks/hubspot": hubspot_delivery,
    "/webhooks/salesforce/outbound": outbound_delivery,
    "/webhooks/salesforce/events": change_event_delivery,
    "/webhooks/zoho/notify": zoho_notification,
    "/webhooks/zoho/workflow": zoho_workflow,
    "/webhooks/bitrix24": bitrix24_event,
    "/webhooks/checks/<callback_id>": check_callback,
}


def test_signed_deliveries_with_hostile_values_to_every_webhook_endpoint(
    target: Target, record_property: Callable[[str, object], None]
) -> None:
    endpoints = {rule for rule, _method in target.routes("/webhooks/")}
    assert endpoints == set(DELIVERIES), "give every webhook endpoint a builder of signed deliveries"
    deliveries = st.one_of(*(build(target) for build in DELIVERIES.values()))

    @given(delivery=deliveries)
    def never_a_server_error(delivery: Delivery) -> None:
        path, body, headers = delivery
        send(target, "POST", path, body, headers)

    never_a_server_error()
    ran_the_budget(target, record_property)


def test_the_signed_builders_without_hostile_values_are_accepted(
    target: Target, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Else the signing or the valid baseline broke, and the fuzzer above only ever meets the
    first check of each endpoint."""
    monkeypatch.setattr(sys.modules[__name__], "HOSTILE_ODDS", 0)
    for build in DELIVERIES.values():

        @given(delivery=build(target))
        @settings(max_examples=5)
        def accepted(delivery: Delivery) -> None:
            path, body, headers = delivery
            response = target.world.client.post(path, data=body, headers=headers)
            assert response.status_code in (200, 202), (path, response.get_data(as_text=True)[:300])

        accepted()


# --- API calls with real tokens --------------------------------------------------------------------

API_PARAMETERS = {
    "/api/v1/requests": ["status", "limit", "cursor", "all", "pending_for", "rule", "record", "connection"],
    "/api/v1/dead-letters": [
        "connection",
        "object",
        "code",
        "kind",
        "older_than",
        "newer_than",
        "state",
        "limit",
        "offset",
    ],
}


@st.composite
def api_call(draw: st.DrawFn, target: Target) -> tuple[str, str, bytes, dict[str, str]]:
    rule, method = draw(st.sampled_from(target.routes("/api/")))
    path = fill_path(draw, rule, target.request_ids)
    names = API_PARAMETERS.get(rule, [])
    query = draw(st.lists(st.tuples(st.sampled_from(names), TEXT), max_size=3)) if names else []
    user = draw(st.sampled_from(sorted(target.world.tokens)))
    headers = {"Authorization": f"Bearer {target.world.tokens[user]}"}
    body = b""
    if method == "POST" and draw(st.booleans()):
        fields = draw(
            st.dictionaries(
                st.sampled_from(
                    ["comment", "step_index", "ids", "all", "dry_run", "connection", "kind", "older_than"]
                ),
                HOSTILE,
                max_size=3,
            )
        )
        body = utf8(to_json(fields))
        headers["Content-Type"] = "application/json"
    return method, path + query_string(query), body, headers


def test_api_calls_with_real_tokens_and_hostile_values(
    target: Target, record_property: Callable[[str, object], None]
) -> None:
    @given(call=api_call(target))
    def never_a_server_error(call: tuple[str, str, bytes, dict[str, str]]) -> None:
        send(target, *call)

    never_a_server_error()
    ran_the_budget(target, record_property)
