"""Salesforce in the adapter contract suite, answering in Salesforce's documented formats.

Password auth: every mock_* registers the SOAP login (POST /services/Soap/u/<version>), whose
LoginResult gives the session id and, in serverUrl, the org's instance. Writes are sObject
Collections PATCHes; reads are SOQL queries. The intake harness lives in harness_salesforce_intake.py.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs, urlparse

import requests
import responses

from connector.crm.base import CRMQueue
from tests.contract.harness import AdapterHarness, CallLog, FilesOnRecord

API_VERSION = "62.0"
INSTANCE = "https://acme.my.salesforce.com"
DATA = f"{INSTANCE}/services/data/v{API_VERSION}"
SOAP_LOGIN_URL = f"https://login.salesforce.com/services/Soap/u/{API_VERSION}"
COLLECTIONS_URL = f"{DATA}/composite/sobjects"
QUERY_URL = f"{DATA}/query/"
ORG_ID = "00DDn00000ABCDEMA4"
USER_ID = "005Dn000001Qx8WIAS"
SESSION_IDS = (
    "00DDn00000ABCDE!AQ4AQFirstSessionR2bW9n5Y0pKxv1ZcJm8sTqHdLwE3uNfGa7",
    "00DDn00000ABCDE!AQ4AQSecondSessionX7yP2kQ9mVtB4nWc6LrJsHdFgZa1eUoi",
)
RELATED_TYPES = {"Account": "Account", "Owner": "User"}  # relationship name -> sObject type

_CHECKSUM_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"


def sf18(id15: str) -> str:
    """Salesforce's 15 -> 18 character id: three suffix letters encode where the capitals are."""
    suffix = ""
    for start in (0, 5, 10):
        bits = sum(1 << i for i, ch in enumerate(id15[start : start + 5]) if "A" <= ch <= "Z")
        suffix += _CHECKSUM_ALPHABET[bits]
    return id15 + suffix


def opportunity_ids(count: int) -> list[str]:
    return [sf18(f"006Dn00000{1000 + i:05d}") for i in range(count)]


def soap_login_response(session_id: str, instance: str = INSTANCE) -> str:
    """A SOAP API login() answer (LoginResult), as Salesforce documents it."""
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"
    xmlns="urn:partner.soap.sforce.com" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <soapenv:Body>
    <loginResponse>
      <result>
        <metadataServerUrl>{instance}/services/Soap/m/{API_VERSION}/{ORG_ID[:15]}</metadataServerUrl>
        <passwordExpired>false</passwordExpired>
        <sandbox>false</sandbox>
        <serverUrl>{instance}/services/Soap/u/{API_VERSION}/{ORG_ID[:15]}</serverUrl>
        <sessionId>{session_id}</sessionId>
        <userId>{USER_ID}</userId>
        <userInfo><organizationId>{ORG_ID}</organizationId><userName>integration@acme.example</userName></userInfo>
      </result>
    </loginResponse>
  </soapenv:Body>
</soapenv:Envelope>"""


def soap_login_fault(code: str, message: str) -> str:
    """A SOAP API LoginFault (sent with HTTP 500)."""
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"
    xmlns:sf="urn:fault.partner.soap.sforce.com" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <soapenv:Body>
    <soapenv:Fault>
      <faultcode>sf:{code}</faultcode>
      <faultstring>{code}: {message}</faultstring>
      <detail>
        <sf:LoginFault xsi:type="sf:LoginFault">
          <sf:exceptionCode>{code}</sf:exceptionCode>
          <sf:exceptionMessage>{message}</sf:exceptionMessage>
        </sf:LoginFault>
      </detail>
    </soapenv:Fault>
  </soapenv:Body>
</soapenv:Envelope>"""


def mock_soap_login(rsps: responses.RequestsMock, url: str = SOAP_LOGIN_URL) -> list[str]:
    """Answer each login with the next session id; returns the list of ids handed out."""
    handed_out: list[str] = []

    def answer(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        session_id = SESSION_IDS[min(len(handed_out), len(SESSION_IDS) - 1)]
        handed_out.append(session_id)
        return 200, {"Content-Type": "text/xml; charset=utf-8"}, soap_login_response(session_id)

    rsps.add_callback(responses.POST, url, callback=answer)
    return handed_out


def save_success(record_id: str) -> dict[str, Any]:
    return {"id": record_id, "success": True, "errors": []}


def save_failure(status_code: str, message: str, fields: list[str] | None = None) -> dict[str, Any]:
    return {
        "success": False,
        "errors": [{"statusCode": status_code, "message": message, "fields": fields or []}],
    }


def api_error(code: str, message: str) -> str:
    """Salesforce's REST error body: a JSON array of {message, errorCode}."""
    return json.dumps([{"message": message, "errorCode": code}])


def sent_ids(request: requests.PreparedRequest) -> list[str]:
    return [record["id"] for record in json.loads(request.body or b"{}")["records"]]


def soql_record(object_type: str, record_id: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """A record as the query resource returns it: related fields nested under their relationship,
    a relationship whose values are all None as null."""
    record: dict[str, Any] = {
        "attributes": {
            "type": object_type,
            "url": f"/services/data/v{API_VERSION}/sobjects/{object_type}/{record_id}",
        },
        "Id": record_id,
    }
    related: dict[str, dict[str, Any]] = {}
    for name, value in values.items():
        relationship, _, field = name.partition(".")
        if field:
            related.setdefault(relationship, {})[field] = value
        else:
            record[name] = value
    for relationship, fields in related.items():
        if all(v is None for v in fields.values()):
            record[relationship] = None
            continue
        sobject = RELATED_TYPES.get(relationship, relationship)
        record[relationship] = {
            "attributes": {"type": sobject, "url": f"/services/data/v{API_VERSION}/sobjects/{sobject}/x"},
            **fields,
        }
    return record


class SalesforceAdapterHarness(AdapterHarness):
    kind = "salesforce"
    object_type = "Opportunity"
    modified_by_sample = ("0055e000001T7QxAAK", "0055e000001T7QxAAK")  # LastModifiedById
    batch_limit = 200
    read_batch_limit = 200  # ids per SOQL `IN` list (connector/crm/salesforce.py READ_BATCH_LIMIT)
    fatal_code = "FIELD_CUSTOM_VALIDATION_EXCEPTION"
    env = {
        "CRM_CONNECTIONS": "salesforce",
        "SALESFORCE_USERNAME": "integration@acme.example",
        "SALESFORCE_PASSWORD": "correct-horse-battery",
        "SALESFORCE_SECURITY_TOKEN": "Xk3r9QpTz8WmB1vN7cJd",
        "SALESFORCE_CLIENT_ID": "crm-approvals",
    }

    def record_ids(self, count: int) -> list[str]:
        return opportunity_ids(count)

    def mock_updates(self, rsps: responses.RequestsMock, fail: Mapping[str, str] | None = None) -> CallLog:
        mock_soap_login(rsps)
        log = CallLog()
        failures = {
            "fatal": save_failure(self.fatal_code, "A rejection needs a comment in Approval_Comment__c.", []),
            "retriable": save_failure(
                "UNABLE_TO_LOCK_ROW", "unable to obtain exclusive access to this record"
            ),
        }

        def answer(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
            ids = sent_ids(request)
            log.calls.append(ids)
            results = [failures[(fail or {})[i]] if i in (fail or {}) else save_success(i) for i in ids]
            return 200, {"Sforce-Limit-Info": "api-usage=18/5000"}, json.dumps(results)

        rsps.add_callback(responses.PATCH, COLLECTIONS_URL, callback=answer, content_type="application/json")
        return log

    def mock_throttled_then_ok(self, rsps: responses.RequestsMock, retry_after: int) -> CallLog:
        limit = api_error("REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded.")
        return self._first_fails(rsps, 403, limit, {"Retry-After": str(retry_after)})

    def mock_server_error_then_ok(self, rsps: responses.RequestsMock) -> CallLog:
        unknown = api_error(
            "UNKNOWN_EXCEPTION",
            "An unexpected error occurred. Please include this ErrorId if you contact support: "
            "1429201811-31174 (-1370213429)",
        )
        return self._first_fails(rsps, 500, unknown, {})

    def mock_auth_expired_then_ok(self, rsps: responses.RequestsMock) -> CallLog:
        mock_soap_login(rsps)
        log = CallLog()

        def answer(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
            ids = sent_ids(request)
            log.calls.append(ids)
            if request.headers["Authorization"] == f"Bearer {SESSION_IDS[0]}":
                return 401, {}, api_error("INVALID_SESSION_ID", "Session expired or invalid")
            return 200, {}, json.dumps([save_success(i) for i in ids])

        rsps.add_callback(responses.PATCH, COLLECTIONS_URL, callback=answer, content_type="application/json")
        return log

    def mock_records(self, rsps: responses.RequestsMock, records: Mapping[str, Mapping[str, Any]]) -> None:
        mock_soap_login(rsps)

        def answer(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
            soql = parse_qs(urlparse(request.url or "").query)["q"][0]
            found = [soql_record(self.object_type, i, v) for i, v in records.items() if f"'{i}'" in soql]
            return 200, {}, json.dumps({"totalSize": len(found), "done": True, "records": found})

        rsps.add_callback(responses.GET, QUERY_URL, callback=answer, content_type="application/json")

    unique_field = "Contract_Number__c"

    def mock_duplicate_query(
        self, rsps: responses.RequestsMock, value: str, rows: Mapping[str, str]
    ) -> list[str]:
        mock_soap_login(rsps)
        seen: list[str] = []

        def answer(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
            soql = parse_qs(urlparse(request.url or "").query)["q"][0]
            # format_soql quotes and escapes the value: O'Brien -> 'O\'Brien'
            assert soql == (
                f"SELECT Id, Contract_Number__c, Name FROM Opportunity WHERE Contract_Number__c = '{value}'"
            ), soql
            seen.append(soql)
            found = [
                {
                    "attributes": {
                        "type": "Opportunity",
                        "url": f"/services/data/v59.0/sobjects/Opportunity/{i}",
                    },
                    "Id": i,
                    "Contract_Number__c": value,
                    "Name": name,
                }
                for i, name in rows.items()
            ]
            return 200, {}, json.dumps({"totalSize": len(found), "done": True, "records": found})

        rsps.add_callback(responses.GET, QUERY_URL, callback=answer, content_type="application/json")
        return seen

    def mock_files(self, rsps: responses.RequestsMock, record_id: str) -> FilesOnRecord:
        """Salesforce Files: POST sobjects/ContentVersion (JSON, VersionData base64) answers
        {"id", "success", "errors"}; FirstPublishLocationId makes a new ContentDocument linked
        to the record, ContentDocumentId adds a version to that one; SOQL on ContentVersion
        gives its ContentDocumentId."""
        mock_soap_login(rsps)
        documents: dict[str, bytes] = {}  # ContentDocumentId -> latest VersionData
        versions: dict[str, str] = {}  # ContentVersion Id -> ContentDocumentId

        def insert(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
            body = json.loads(request.body or b"{}")
            content = base64.b64decode(body["VersionData"])
            version_id = f"0684x00000{len(versions) + 1:05d}AAA"
            if "FirstPublishLocationId" in body:
                assert body["FirstPublishLocationId"] == record_id and "ContentDocumentId" not in body
                document = f"0694x00000{len(documents) + 1:05d}AAA"
            else:
                document = body["ContentDocumentId"]
                if document not in documents:
                    errors = [
                        {
                            "message": "invalid cross reference id",
                            "errorCode": "INVALID_CROSS_REFERENCE_KEY",
                            "fields": ["ContentDocumentId"],
                        }
                    ]
                    return 400, {}, json.dumps(errors)
            documents[document], versions[version_id] = content, document
            return 201, {}, json.dumps({"id": version_id, "success": True, "errors": []})

        def query(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
            soql = parse_qs(urlparse(request.url or "").query)["q"][0]
            found = [
                {
                    "attributes": {
                        "type": "ContentVersion",
                        "url": f"/services/data/v{API_VERSION}/sobjects/ContentVersion/{v}",
                    },
                    "ContentDocumentId": d,
                }
                for v, d in versions.items()
                if f"'{v}'" in soql and "FROM ContentVersion" in soql
            ]
            return 200, {}, json.dumps({"totalSize": len(found), "done": True, "records": found})

        rsps.add_callback(
            responses.POST,
            f"{DATA}/sobjects/ContentVersion",
            callback=insert,
            content_type="application/json",
        )
        rsps.add_callback(responses.GET, QUERY_URL, callback=query, content_type="application/json")
        return FilesOnRecord(lambda: documents)

    def sample_records(self) -> dict[str, dict[str, Any]]:
        first, second = opportunity_ids(2)
        return {
            first: {
                "Name": "Acme - 500 laptops",
                "Amount": 125000.0,
                "StageName": "Negotiation/Review",
                "Account.Credit_Score__c": 80,
                "Owner.ManagerId": "005Dn000001Qx9ZIAS",
            },
            second: {
                "Name": "Globex - renewal",
                "Amount": 8000.0,
                "StageName": "Proposal/Price Quote",
                "Account.Credit_Score__c": None,  # no Account: the relationship comes back null
                "Owner.ManagerId": "005Dn000001Qx9ZIAS",
            },
        }

    def sample_queues(self) -> list[CRMQueue]:
        return [
            CRMQueue("00GDn000000QueA1MAC", "Finance Queue", ("005Dn000001Qx8WIAS", "005Dn000001Qx9ZIAS")),
            CRMQueue("00GDn000000GrpB2MAC", "Legal Group", ("005Dn000001QxALIA0",)),  # through a nested group
            CRMQueue("00GDn000000GrpC3MAC", "Legal Core", ("005Dn000001QxALIA0",)),
            CRMQueue("00GDn000000EmpD4MAC", "Empty Queue", ()),
        ]

    def mock_queues(self, rsps: responses.RequestsMock, queues: Sequence[CRMQueue]) -> None:
        """Group rows by SOQL (Type IN ('Queue', 'Regular')), then GroupMember rows; Legal Group
        holds Legal Core (a group id) rather than its user, as Salesforce allows."""
        mock_soap_login(rsps)
        nested = {"00GDn000000GrpB2MAC": ["00GDn000000GrpC3MAC"]}

        def answer(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
            soql = parse_qs(urlparse(request.url or "").query)["q"][0]
            if soql.startswith("SELECT Id, Name, Type FROM Group WHERE Type IN ('Queue','Regular')"):
                rows = [
                    {"attributes": {"type": "Group"}, "Id": q.id, "Name": q.name, "Type": "Queue"}
                    for q in queues
                ]
            elif soql.startswith("SELECT GroupId, UserOrGroupId FROM GroupMember WHERE GroupId IN ("):
                rows = [
                    {"attributes": {"type": "GroupMember"}, "GroupId": q.id, "UserOrGroupId": member}
                    for q in queues
                    if f"'{q.id}'" in soql
                    for member in nested.get(q.id, list(q.members))
                ]
            else:
                return 400, {}, json.dumps([{"errorCode": "MALFORMED_QUERY", "message": soql}])
            return 200, {}, json.dumps({"totalSize": len(rows), "done": True, "records": rows})

        rsps.add_callback(responses.GET, QUERY_URL, callback=answer, content_type="application/json")

    def _first_fails(
        self, rsps: responses.RequestsMock, status: int, body: str, headers: dict[str, str]
    ) -> CallLog:
        mock_soap_login(rsps)
        log = CallLog()

        def answer(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
            ids = sent_ids(request)
            log.calls.append(ids)
            if len(log.calls) == 1:
                return status, headers, body
            return 200, {}, json.dumps([save_success(i) for i in ids])

        rsps.add_callback(responses.PATCH, COLLECTIONS_URL, callback=answer, content_type="application/json")
        return log


ADAPTER_HARNESS = SalesforceAdapterHarness()
