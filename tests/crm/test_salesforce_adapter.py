"""The Salesforce adapter against Salesforce's documented wire formats (mocked with `responses`).

Login: SOAP login() for password/IP-filter auth, the OAuth token endpoint for JWT bearer,
username-password and client credentials. Writes: sObject Collections. Reads: SOQL query.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import jwt
import pytest
import requests
import responses
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from connector.config import ConfigError, Settings, parse_connections
from connector.crm.base import RecordUpdate
from connector.crm.errors import AuthError, FatalError, InDoubtError, RetriableError
from connector.crm.retry import RetryPolicy
from connector.crm.salesforce import ApiUsage, SalesforceAdapter, parse_api_usage
from connector.events import RecordChangeEvent
from tests.contract.harness_salesforce import (
    COLLECTIONS_URL,
    DATA,
    INSTANCE,
    QUERY_URL,
    SESSION_IDS,
    SOAP_LOGIN_URL,
    api_error,
    mock_soap_login,
    opportunity_ids,
    save_failure,
    save_success,
    sent_ids,
    soap_login_fault,
    soql_record,
)

TIMEOUT = 7.0
PASSWORD = "pa<ss&word"
TOKEN = "Xk3r9QpTz8WmB1vN7cJd"
PASSWORD_ENV = {
    "CRM_CONNECTIONS": "sf=salesforce",
    "SF_USERNAME": "integration@acme.example",
    "SF_PASSWORD": PASSWORD,
    "SF_SECURITY_TOKEN": TOKEN,
    "SF_CLIENT_ID": "crm-approvals",
}
SESSION_ENV = {
    "CRM_CONNECTIONS": "sf=salesforce",
    "SF_SESSION_ID": "00DDn00000ABCDE!AQ4AQPastedSession",
    "SF_INSTANCE_URL": INSTANCE,
}
TOKEN_URL = "https://login.salesforce.com/services/oauth2/token"
ACCESS_TOKEN = "00DDn00000ABCDE!AQ4AQOAuthAccessToken"
DESCRIBE_URL = f"{DATA}/sobjects/Opportunity/describe"
IDS = opportunity_ids(3)

MakeAdapter = Callable[..., SalesforceAdapter]


@pytest.fixture
def rsps() -> Iterator[responses.RequestsMock]:
    """Mocked HTTP; its calls stay readable until the test ends, then unused mocks fail it."""
    with responses.RequestsMock() as mock:
        yield mock


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def make(sleeps: list[float]) -> MakeAdapter:
    def build(env: dict[str, str] | None = None, attempts: int = 3) -> SalesforceAdapter:
        connections = parse_connections(env or PASSWORD_ENV)
        settings = Settings(connections=connections, http_timeout_seconds=TIMEOUT)
        adapter = SalesforceAdapter.from_config(next(iter(connections.values())), settings)
        adapter.retry = RetryPolicy(attempts=attempts, sleep=sleeps.append)
        assert isinstance(adapter, SalesforceAdapter)
        return adapter

    return build


def env_with(**variables: str) -> dict[str, str]:
    return {"CRM_CONNECTIONS": "sf=salesforce", **{f"SF_{k}": v for k, v in variables.items()}}


def update(record_id: str, **fields: Any) -> RecordUpdate:
    return RecordUpdate(record_id, fields or {"Approval_Status__c": "Approved"})


def token_response(instance: str = INSTANCE) -> dict[str, str]:
    """The OAuth token endpoint's answer, as Salesforce documents it."""
    return {
        "access_token": ACCESS_TOKEN,
        "scope": "api",
        "instance_url": instance,
        "id": "https://login.salesforce.com/id/00DDn00000ABCDEMA4/005Dn000001Qx8WIAS",
        "token_type": "Bearer",
        "issued_at": "1714560000000",
        "signature": "aGVsbG8gc2lnbmF0dXJl",
    }


def describe_body() -> dict[str, Any]:
    return {
        "name": "Opportunity",
        "fields": [
            {
                "name": "AccountId",
                "label": "Account ID",
                "type": "reference",
                "updateable": True,
                "referenceTo": ["Account"],
                "relationshipName": "Account",
                "nillable": True,
                "custom": False,
                "calculated": False,
                "length": 18,
                "picklistValues": [],
            },
            {
                "name": "Approval_Status__c",
                "label": "Approval Status",
                "type": "picklist",
                "updateable": True,
                "referenceTo": [],
                "relationshipName": None,
                "nillable": True,
                "custom": True,
                "calculated": False,
                "length": 255,
                "picklistValues": [
                    {
                        "active": True,
                        "defaultValue": False,
                        "label": "Pending",
                        "validFor": None,
                        "value": "Pending",
                    },
                    {
                        "active": False,
                        "defaultValue": False,
                        "label": "Old",
                        "validFor": None,
                        "value": "Old",
                    },
                ],
            },
        ],
    }


def query_body(records: list[dict[str, Any]], next_url: str | None = None) -> dict[str, Any]:
    page: dict[str, Any] = {"totalSize": len(records), "done": next_url is None, "records": records}
    if next_url:
        page["nextRecordsUrl"] = next_url
    return page


def soql_of(call: Any) -> str:
    return parse_qs(urlparse(call.request.url).query)["q"][0]


def patch_calls(rsps: responses.RequestsMock) -> list[Any]:
    return [c for c in rsps.calls if c.request.method == "PATCH"]


def login_calls(rsps: responses.RequestsMock) -> list[Any]:
    return [c for c in rsps.calls if "/services/Soap/u/" in c.request.url or "/oauth2/token" in c.request.url]


# --- configuration: chosen from the variables, checked without network ---------------------


@pytest.mark.parametrize(
    ("variables", "mode"),
    [
        ({"USERNAME": "u", "PASSWORD": "p", "SECURITY_TOKEN": "t"}, "password"),
        ({"USERNAME": "u", "PASSWORD": "p", "ORGANIZATION_ID": "00DDn00000ABCDE"}, "ip_filter"),
        ({"USERNAME": "u", "PASSWORD": "p", "CONSUMER_KEY": "k", "CONSUMER_SECRET": "s"}, "oauth_password"),
        ({"USERNAME": "u", "CONSUMER_KEY": "k", "PRIVATE_KEY": "pem"}, "jwt"),
        ({"CONSUMER_KEY": "k", "CONSUMER_SECRET": "s", "DOMAIN": "acme.my"}, "client_credentials"),
        ({"SESSION_ID": "sid", "INSTANCE_URL": INSTANCE}, "session"),
        ({"AUTH": "session", "SESSION_ID": "sid", "INSTANCE_URL": INSTANCE, "USERNAME": "u"}, "session"),
    ],
)
def test_auth_mode_is_chosen_from_the_connection_variables_without_network(
    rsps: responses.RequestsMock, make: MakeAdapter, variables: dict[str, str], mode: str
) -> None:
    adapter = make(env_with(**variables))
    assert len(rsps.calls) == 0  # the client is built on first use
    assert adapter.auth_mode == mode
    assert adapter.api_version == "62.0"


@pytest.mark.parametrize(
    ("variables", "named"),
    [
        ({"USERNAME": "u", "PASSWORD": "hunter2-secret"}, "SF_SECURITY_TOKEN"),
        ({"SESSION_ID": "sid"}, "SF_INSTANCE_URL"),
        ({"AUTH": "jwt", "USERNAME": "u"}, "SF_CONSUMER_KEY, SF_PRIVATE_KEY or SF_PRIVATE_KEY_FILE"),
        ({"AUTH": "client_credentials", "CONSUMER_KEY": "k"}, "SF_CONSUMER_SECRET, SF_DOMAIN"),
    ],
)
def test_missing_variables_are_named_exactly(
    make: MakeAdapter, variables: dict[str, str], named: str
) -> None:
    with pytest.raises(ConfigError, match=named) as caught:
        make(env_with(**variables))
    assert "hunter2" not in str(caught.value)  # names variables, never echoes values


def test_no_credentials_lists_every_auth_mode(make: MakeAdapter) -> None:
    with pytest.raises(ConfigError) as caught:
        make(env_with(DOMAIN="acme.my"))
    for variable in ("SF_SECURITY_TOKEN", "SF_SESSION_ID", "SF_PRIVATE_KEY", "SF_CONSUMER_SECRET"):
        assert variable in str(caught.value)


@pytest.mark.parametrize(
    ("variables", "complaint"),
    [
        ({"AUTH": "kerberos", "USERNAME": "u"}, "SF_AUTH"),
        ({"CONSUMER_KEY": "k", "CONSUMER_SECRET": "s", "DOMAIN": "login"}, "My Domain"),
        ({"USERNAME": "u", "PASSWORD": "p", "SECURITY_TOKEN": "t", "VERSION": "latest"}, "SF_VERSION"),
        ({"USERNAME": "u", "PASSWORD": "p", "SECURITY_TOKEN": "t", "CLIENT_ID": "a;b"}, "SF_CLIENT_ID"),
        ({"USERNAME": "u", "CONSUMER_KEY": "k", "PRIVATE_KEY_FILE": "/nonexistent/key.pem"}, "no such file"),
        ({"SESSION_ID": "sid", "INSTANCE_URL": "acme.my.salesforce.com"}, "https://"),
    ],
)
def test_malformed_settings_are_config_errors(
    make: MakeAdapter, variables: dict[str, str], complaint: str
) -> None:
    with pytest.raises(ConfigError, match=complaint):
        make(env_with(**variables))


# --- every auth mode over the wire -----------------------------------------------------------


def test_password_mode_logs_in_with_soap_and_uses_the_returned_instance(
    rsps: responses.RequestsMock, make: MakeAdapter
) -> None:
    mock_soap_login(rsps)
    rsps.add(responses.GET, DESCRIBE_URL, json=describe_body())
    make().describe("Opportunity")
    login, describe = rsps.calls
    assert login.request.url == SOAP_LOGIN_URL
    assert login.request.headers["SOAPAction"] == "login"
    body = login.request.body.decode() if isinstance(login.request.body, bytes) else login.request.body
    assert "<n1:username>integration@acme.example</n1:username>" in body
    assert f"<n1:password>pa&lt;ss&amp;word{TOKEN}</n1:password>" in body  # password + token, XML-escaped
    assert describe.request.url == DESCRIBE_URL
    assert describe.request.headers["Authorization"] == f"Bearer {SESSION_IDS[0]}"


@pytest.mark.parametrize(
    ("domain", "login_host"),
    [
        ("test", "test.salesforce.com"),
        ("acme.my", "acme.my.salesforce.com"),
        ("https://acme.my.salesforce.com/", "acme.my.salesforce.com"),
    ],
)
def test_domain_picks_the_login_host(
    rsps: responses.RequestsMock, make: MakeAdapter, domain: str, login_host: str
) -> None:
    mock_soap_login(rsps, f"https://{login_host}/services/Soap/u/62.0")
    rsps.add(responses.GET, DESCRIBE_URL, json=describe_body())
    make({**PASSWORD_ENV, "SF_DOMAIN": domain}).describe("Opportunity")
    assert urlparse(rsps.calls[0].request.url).hostname == login_host


def test_ip_filter_mode_sends_the_organization_id(rsps: responses.RequestsMock, make: MakeAdapter) -> None:
    mock_soap_login(rsps)
    rsps.add(responses.GET, DESCRIBE_URL, json=describe_body())
    make(env_with(USERNAME="u@acme.example", PASSWORD="p", ORGANIZATION_ID="00DDn00000ABCDE")).describe(
        "Opportunity"
    )
    assert "<urn:organizationId>00DDn00000ABCDE</urn:organizationId>" in rsps.calls[0].request.body


def test_session_id_mode_uses_the_pasted_session_without_logging_in(
    rsps: responses.RequestsMock, make: MakeAdapter
) -> None:
    rsps.add(responses.GET, DESCRIBE_URL, json=describe_body())
    make(SESSION_ENV).describe("Opportunity")
    (call,) = rsps.calls
    assert call.request.headers["Authorization"] == f"Bearer {SESSION_ENV['SF_SESSION_ID']}"


def _rsa_key_pem() -> tuple[str, Any]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return pem, key.public_key()


@pytest.mark.parametrize("key_in", ["PRIVATE_KEY", "PRIVATE_KEY_FILE"])
def test_jwt_bearer_mode_posts_a_signed_assertion(
    rsps: responses.RequestsMock, make: MakeAdapter, tmp_path: Path, key_in: str
) -> None:
    pem, public_key = _rsa_key_pem()
    if key_in == "PRIVATE_KEY":
        key_variable = pem.replace("\n", "\\n")  # as a one-line .env value
    else:
        key_variable = str(tmp_path / "server.key")
        Path(key_variable).write_text(pem)
    env = env_with(
        USERNAME="integration@acme.example", CONSUMER_KEY="3MVG9consumerKey", **{key_in: key_variable}
    )
    rsps.add(responses.POST, TOKEN_URL, json=token_response())
    rsps.add(responses.GET, DESCRIBE_URL, json=describe_body())
    make(env).describe("Opportunity")
    token_call, describe = rsps.calls
    form = parse_qs(token_call.request.body)
    assert form["grant_type"] == ["urn:ietf:params:oauth:grant-type:jwt-bearer"]
    claims = jwt.decode(
        form["assertion"][0], public_key, algorithms=["RS256"], audience="https://login.salesforce.com"
    )
    assert claims["iss"] == "3MVG9consumerKey"
    assert claims["sub"] == "integration@acme.example"
    assert describe.request.headers["Authorization"] == f"Bearer {ACCESS_TOKEN}"


def test_client_credentials_mode_uses_basic_auth_at_my_domain(
    rsps: responses.RequestsMock, make: MakeAdapter
) -> None:
    env = env_with(CONSUMER_KEY="3MVG9consumerKey", CONSUMER_SECRET="s3cr3t", DOMAIN="acme.my")
    rsps.add(responses.POST, f"{INSTANCE}/services/oauth2/token", json=token_response())
    rsps.add(responses.GET, DESCRIBE_URL, json=describe_body())
    make(env).describe("Opportunity")
    token_call, describe = rsps.calls
    expected = base64.b64encode(b"3MVG9consumerKey:s3cr3t").decode()
    assert token_call.request.headers["Authorization"] == f"Basic {expected}"
    assert parse_qs(token_call.request.body) == {"grant_type": ["client_credentials"]}
    assert describe.request.headers["Authorization"] == f"Bearer {ACCESS_TOKEN}"


def test_oauth_username_password_mode_posts_the_password_grant(
    rsps: responses.RequestsMock, make: MakeAdapter
) -> None:
    env = env_with(USERNAME="u@acme.example", PASSWORD="p", CONSUMER_KEY="3MVG9key", CONSUMER_SECRET="s")
    rsps.add(responses.POST, TOKEN_URL, json=token_response())
    rsps.add(responses.GET, DESCRIBE_URL, json=describe_body())
    make(env).describe("Opportunity")
    form = parse_qs(rsps.calls[0].request.body)
    assert form["grant_type"] == ["password"]
    assert form["client_id"] == ["3MVG9key"] and form["username"] == ["u@acme.example"]


def test_refused_login_is_an_auth_error_with_salesforces_words_and_no_secret(
    rsps: responses.RequestsMock, make: MakeAdapter
) -> None:
    fault = soap_login_fault(
        "INVALID_LOGIN", "Invalid username, password, security token; or user locked out."
    )
    rsps.add(responses.POST, SOAP_LOGIN_URL, body=fault, status=500, content_type="text/xml")
    with pytest.raises(AuthError) as caught:
        make().update_records("Opportunity", [update(IDS[0])])
    assert len(rsps.calls) == 1  # not retried
    assert caught.value.code == "INVALID_LOGIN"
    assert "Invalid username, password, security token" in str(caught.value)
    assert PASSWORD not in str(caught.value) and TOKEN not in str(caught.value)


def test_refused_token_request_is_an_auth_error(rsps: responses.RequestsMock, make: MakeAdapter) -> None:
    env = env_with(CONSUMER_KEY="k", CONSUMER_SECRET="s", DOMAIN="acme.my")
    refusal = {"error": "invalid_client", "error_description": "invalid client credentials"}
    rsps.add(responses.POST, f"{INSTANCE}/services/oauth2/token", json=refusal, status=400)
    with pytest.raises(AuthError, match="invalid client credentials"):
        make(env).describe("Opportunity")


def test_unavailable_login_endpoint_is_retried(
    rsps: responses.RequestsMock, make: MakeAdapter, sleeps: list[float]
) -> None:
    rsps.add(responses.POST, SOAP_LOGIN_URL, body="Service Unavailable", status=503)
    mock_soap_login(rsps)
    rsps.add(responses.GET, DESCRIBE_URL, json=describe_body())
    make().describe("Opportunity")
    assert len(login_calls(rsps)) == 2
    assert len(sleeps) == 1


def test_request_limit_at_login_is_retried(
    rsps: responses.RequestsMock, make: MakeAdapter, sleeps: list[float]
) -> None:
    fault = soap_login_fault("REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded.")
    rsps.add(responses.POST, SOAP_LOGIN_URL, body=fault, status=500, content_type="text/xml")
    mock_soap_login(rsps)
    rsps.add(responses.GET, DESCRIBE_URL, json=describe_body())
    make().describe("Opportunity")
    assert len(login_calls(rsps)) == 2 and len(sleeps) == 1


# --- writes: sObject Collections ------------------------------------------------------------


def test_update_sends_one_collections_patch_in_the_documented_shape(
    rsps: responses.RequestsMock, make: MakeAdapter
) -> None:
    mock_soap_login(rsps)
    rsps.add(responses.PATCH, COLLECTIONS_URL, json=[save_success(IDS[0]), save_success(IDS[1])])
    make().update_records(
        "Opportunity",
        [
            update(IDS[0], Approval_Status__c="Approved", Approval_Comment__c="ok"),
            update(IDS[1], Approval_Status__c="Rejected"),
        ],
    )
    (call,) = patch_calls(rsps)
    assert call.request.url == COLLECTIONS_URL
    assert json.loads(call.request.body) == {
        "allOrNone": False,
        "records": [
            {
                "attributes": {"type": "Opportunity"},
                "id": IDS[0],
                "Approval_Status__c": "Approved",
                "Approval_Comment__c": "ok",
            },
            {"attributes": {"type": "Opportunity"}, "id": IDS[1], "Approval_Status__c": "Rejected"},
        ],
    }
    assert call.request.headers["Sforce-Call-Options"] == "client=crm-approvals"
    assert call.request.headers["Content-Type"] == "application/json"


def test_no_call_options_header_without_a_client_id(rsps: responses.RequestsMock, make: MakeAdapter) -> None:
    env = {k: v for k, v in PASSWORD_ENV.items() if k != "SF_CLIENT_ID"}
    mock_soap_login(rsps)
    rsps.add(responses.PATCH, COLLECTIONS_URL, json=[save_success(IDS[0])])
    make(env).update_records("Opportunity", [update(IDS[0])])
    assert "Sforce-Call-Options" not in patch_calls(rsps)[0].request.headers


def test_450_updates_go_out_as_200_200_50(rsps: responses.RequestsMock, make: MakeAdapter) -> None:
    ids = opportunity_ids(450)
    mock_soap_login(rsps)
    rsps.add_callback(
        responses.PATCH,
        COLLECTIONS_URL,
        callback=lambda r: (200, {}, json.dumps([save_success(i) for i in sent_ids(r)])),
        content_type="application/json",
    )
    results = make().update_records("Opportunity", [update(i) for i in ids])
    assert [len(sent_ids(c.request)) for c in patch_calls(rsps)] == [200, 200, 50]
    assert [r.record_id for r in results] == ids and all(r.ok for r in results)
    assert len(login_calls(rsps)) == 1  # one session for all calls


def test_each_save_result_maps_back_to_its_record_in_order(
    rsps: responses.RequestsMock, make: MakeAdapter
) -> None:
    answers = [
        save_success(IDS[0]),
        {
            "success": False,
            "errors": [
                {
                    "statusCode": "REQUIRED_FIELD_MISSING",
                    "message": "Required fields are missing: [CloseDate]",
                    "fields": ["CloseDate"],
                },
                {
                    "statusCode": "FIELD_CUSTOM_VALIDATION_EXCEPTION",
                    "message": "Comment needed to reject",
                    "fields": ["Approval_Comment__c", "CloseDate"],
                },
            ],
        },
        save_failure("UNABLE_TO_LOCK_ROW", "unable to obtain exclusive access to this record"),
    ]
    mock_soap_login(rsps)
    rsps.add(responses.PATCH, COLLECTIONS_URL, json=answers)
    ok, fatal, locked = make().update_records("Opportunity", [update(i) for i in IDS])
    assert ok.ok and ok.record_id == IDS[0]
    assert (fatal.record_id, fatal.ok, fatal.retriable) == (IDS[1], False, False)
    assert fatal.error_code == "REQUIRED_FIELD_MISSING"
    assert fatal.message == "Required fields are missing: [CloseDate]; Comment needed to reject"
    assert fatal.fields == ("CloseDate", "Approval_Comment__c")
    assert (locked.record_id, locked.ok, locked.retriable, locked.error_code) == (
        IDS[2],
        False,
        True,
        "UNABLE_TO_LOCK_ROW",
    )


@pytest.mark.parametrize(
    ("code", "message", "fields"),
    [
        ("INVALID_FIELD", "No such column 'Approval_Stat__c' on sobject of type Opportunity", []),
        ("FIELD_CUSTOM_VALIDATION_EXCEPTION", "Comment needed to reject", ["Approval_Comment__c"]),
        ("MALFORMED_ID", "Opportunity ID: id value of incorrect type: 001Dn00000Q1ZxYIAV", ["Id"]),
        ("ENTITY_IS_DELETED", "entity is deleted", []),
    ],
)
def test_validation_failures_are_fatal_per_record_and_never_retried(
    rsps: responses.RequestsMock,
    make: MakeAdapter,
    sleeps: list[float],
    code: str,
    message: str,
    fields: list[str],
) -> None:
    mock_soap_login(rsps)
    rsps.add(responses.PATCH, COLLECTIONS_URL, json=[save_failure(code, message, fields)])
    (result,) = make().update_records("Opportunity", [update(IDS[0])])
    assert (result.ok, result.retriable, result.error_code, result.message) == (False, False, code, message)
    assert result.fields == tuple(fields)
    assert len(patch_calls(rsps)) == 1 and sleeps == []


def test_request_level_invalid_field_is_fatal_and_not_retried(
    rsps: responses.RequestsMock, make: MakeAdapter, sleeps: list[float]
) -> None:
    refusal = api_error("INVALID_FIELD", "No such column 'Approval_Stat__c' on sobject of type Opportunity")
    mock_soap_login(rsps)
    rsps.add(responses.PATCH, COLLECTIONS_URL, body=refusal, status=400, content_type="application/json")
    with pytest.raises(FatalError) as caught:
        make().update_records("Opportunity", [update(IDS[0])])
    assert (caught.value.code, caught.value.status) == ("INVALID_FIELD", 400)
    assert caught.value.message == "No such column 'Approval_Stat__c' on sobject of type Opportunity"
    assert len(patch_calls(rsps)) == 1 and sleeps == []


def test_request_limit_exceeded_403_is_retried_after_retry_after(
    rsps: responses.RequestsMock, make: MakeAdapter, sleeps: list[float]
) -> None:
    mock_soap_login(rsps)
    rsps.add(
        responses.PATCH,
        COLLECTIONS_URL,
        body=api_error("REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded."),
        status=403,
        headers={"Retry-After": "11", "Sforce-Limit-Info": "api-usage=5001/5000"},
        content_type="application/json",
    )
    rsps.add(responses.PATCH, COLLECTIONS_URL, json=[save_success(IDS[0])])
    adapter = make()
    (result,) = adapter.update_records("Opportunity", [update(IDS[0])])
    assert result.ok
    assert len(patch_calls(rsps)) == 2
    assert sleeps == [11]
    assert adapter.api_usage == ApiUsage(used=5001, limit=5000)  # read from the error response too


def test_other_403s_are_fatal(rsps: responses.RequestsMock, make: MakeAdapter) -> None:
    refusal = api_error("INSUFFICIENT_ACCESS", "insufficient access rights on object id")
    mock_soap_login(rsps)
    rsps.add(responses.PATCH, COLLECTIONS_URL, body=refusal, status=403, content_type="application/json")
    with pytest.raises(FatalError) as caught:
        make().update_records("Opportunity", [update(IDS[0])])
    assert caught.value.code == "INSUFFICIENT_ACCESS" and not isinstance(caught.value, RetriableError)


def test_503_is_retried_then_succeeds(
    rsps: responses.RequestsMock, make: MakeAdapter, sleeps: list[float]
) -> None:
    mock_soap_login(rsps)
    rsps.add(
        responses.PATCH,
        COLLECTIONS_URL,
        body=api_error("SERVER_UNAVAILABLE", "Server temporarily unavailable"),
        status=503,
        content_type="application/json",
    )
    rsps.add(responses.PATCH, COLLECTIONS_URL, json=[save_success(IDS[0])])
    (result,) = make().update_records("Opportunity", [update(IDS[0])])
    assert result.ok
    assert len(patch_calls(rsps)) == 2 and len(sleeps) == 1


def test_a_read_that_times_out_is_retried(
    rsps: responses.RequestsMock, make: MakeAdapter, sleeps: list[float]
) -> None:
    mock_soap_login(rsps)
    rsps.add(responses.GET, QUERY_URL, body=requests.ReadTimeout("read timed out"))
    record = {"attributes": {"type": "Opportunity"}, "Id": IDS[0], "Approval_Status__c": "Pending"}
    rsps.add(responses.GET, QUERY_URL, json=query_body([record]))
    found = make().get_records("Opportunity", [IDS[0]], ["Approval_Status__c"])
    assert found == {IDS[0]: {"Approval_Status__c": "Pending"}} and len(sleeps) == 1


@pytest.mark.parametrize(
    "failure",
    [
        requests.ReadTimeout("read timed out"),
        requests.ConnectionError(
            "('Connection aborted.', RemoteDisconnected('Remote end closed connection'))"
        ),
    ],
)
def test_a_write_that_times_out_is_in_doubt_and_not_sent_again(
    rsps: responses.RequestsMock, make: MakeAdapter, sleeps: list[float], failure: Exception
) -> None:
    """Salesforce may still apply the PATCH: sending it again blindly could land it after a
    newer write. The outbox reads the record back instead (docs/outbox.md)."""
    mock_soap_login(rsps)
    rsps.add(responses.PATCH, COLLECTIONS_URL, body=failure)
    with pytest.raises(InDoubtError):
        make().update_records("Opportunity", [update(IDS[0])])
    assert len(patch_calls(rsps)) == 1 and sleeps == []


def test_a_gateway_time_out_on_a_write_is_in_doubt(
    rsps: responses.RequestsMock, make: MakeAdapter, sleeps: list[float]
) -> None:
    mock_soap_login(rsps)
    rsps.add(responses.PATCH, COLLECTIONS_URL, body="<html>504 Gateway Time-out</html>", status=504)
    with pytest.raises(InDoubtError):
        make().update_records("Opportunity", [update(IDS[0])])
    assert len(patch_calls(rsps)) == 1 and sleeps == []


def test_a_write_whose_connection_never_opened_is_retried(
    rsps: responses.RequestsMock, make: MakeAdapter, sleeps: list[float]
) -> None:
    mock_soap_login(rsps)
    rsps.add(responses.PATCH, COLLECTIONS_URL, body=requests.ConnectTimeout("connect timed out"))
    rsps.add(responses.PATCH, COLLECTIONS_URL, json=[save_success(IDS[0])])
    (result,) = make().update_records("Opportunity", [update(IDS[0])])
    assert result.ok and len(patch_calls(rsps)) == 2 and len(sleeps) == 1


def test_expired_session_logs_in_again_and_retries_with_the_new_session(
    rsps: responses.RequestsMock, make: MakeAdapter
) -> None:
    mock_soap_login(rsps)
    rsps.add(
        responses.PATCH,
        COLLECTIONS_URL,
        body=api_error("INVALID_SESSION_ID", "Session expired or invalid"),
        status=401,
        content_type="application/json",
    )
    rsps.add(responses.PATCH, COLLECTIONS_URL, json=[save_success(IDS[0])])
    (result,) = make().update_records("Opportunity", [update(IDS[0])])
    assert result.ok
    first, second = patch_calls(rsps)
    assert first.request.headers["Authorization"] == f"Bearer {SESSION_IDS[0]}"
    assert second.request.headers["Authorization"] == f"Bearer {SESSION_IDS[1]}"
    assert len(login_calls(rsps)) == 2


def test_expired_pasted_session_is_an_auth_error(
    rsps: responses.RequestsMock, make: MakeAdapter, sleeps: list[float]
) -> None:
    rsps.add(
        responses.PATCH,
        COLLECTIONS_URL,
        body=api_error("INVALID_SESSION_ID", "Session expired or invalid"),
        status=401,
        content_type="application/json",
    )
    adapter = make(SESSION_ENV)
    with pytest.raises(AuthError, match="cannot renew"):
        adapter.update_records("Opportunity", [update(IDS[0])])
    assert len(rsps.calls) == 1 and sleeps == []
    assert adapter.refresh_auth() is False


def test_a_result_count_mismatch_is_fatal(rsps: responses.RequestsMock, make: MakeAdapter) -> None:
    mock_soap_login(rsps)
    rsps.add(responses.PATCH, COLLECTIONS_URL, json=[save_success(IDS[0])])
    with pytest.raises(FatalError, match="1 results for 2"):
        make().update_records("Opportunity", [update(IDS[0]), update(IDS[1])])


# --- API usage --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "usage"),
    [
        ("api-usage=18/5000", ApiUsage(18, 5000)),
        ("api-usage=25/5000; per-app-api-usage=17/250(appName=sample-connected-app)", ApiUsage(25, 5000)),
        ("per-app-api-usage=17/250(appName=x)", None),
        ("", None),
        (None, None),
    ],
)
def test_sforce_limit_info_parsing(header: str | None, usage: ApiUsage | None) -> None:
    assert parse_api_usage(header) == usage


def test_api_usage_follows_the_last_response(rsps: responses.RequestsMock, make: MakeAdapter) -> None:
    mock_soap_login(rsps)
    rsps.add(
        responses.PATCH,
        COLLECTIONS_URL,
        json=[save_success(IDS[0])],
        headers={"Sforce-Limit-Info": "api-usage=4750/5000"},
    )
    adapter = make()
    assert adapter.api_usage is None
    adapter.update_records("Opportunity", [update(IDS[0])])
    assert adapter.api_usage == ApiUsage(used=4750, limit=5000)
    assert adapter.api_usage.remaining == 250


# --- reads: SOQL --------------------------------------------------------------------------------


def test_related_fields_are_read_with_soql_and_flattened(
    rsps: responses.RequestsMock, make: MakeAdapter
) -> None:
    records = [
        soql_record(
            "Opportunity", IDS[0], {"Name": "Acme", "Account.Credit_Score__c": 80, "Owner.ManagerId": "005A"}
        ),
        soql_record(
            "Opportunity",
            IDS[1],
            {"Name": "Globex", "Account.Credit_Score__c": None, "Owner.ManagerId": None},
        ),
    ]
    fields = ["Name", "Account.Credit_Score__c", "owner.managerid"]
    mock_soap_login(rsps)
    rsps.add(responses.GET, QUERY_URL, json=query_body(records))
    got = make().get_records("Opportunity", IDS[:2], fields)
    assert records[1]["Account"] is None  # what Salesforce sends for an empty lookup
    assert soql_of(rsps.calls[-1]) == (
        "SELECT Id, Name, Account.Credit_Score__c, owner.managerid FROM Opportunity "
        f"WHERE Id IN ('{IDS[0]}','{IDS[1]}')"
    )
    assert got == {
        IDS[0]: {"Name": "Acme", "Account.Credit_Score__c": 80, "owner.managerid": "005A"},
        IDS[1]: {"Name": "Globex", "Account.Credit_Score__c": None, "owner.managerid": None},
    }


def test_a_15_character_id_gets_its_record_back_under_the_same_id(
    rsps: responses.RequestsMock, make: MakeAdapter
) -> None:
    mock_soap_login(rsps)
    rsps.add(
        responses.GET, QUERY_URL, json=query_body([soql_record("Opportunity", IDS[0], {"Name": "Acme"})])
    )
    got = make().get_record("Opportunity", IDS[0][:15], ["Name"])
    assert got == {"Name": "Acme"}


def test_ids_sharing_their_first_15_characters_are_not_the_same_record(
    rsps: responses.RequestsMock, make: MakeAdapter
) -> None:
    """The record comes back under the ids that name it (15 or 18 characters), never under an id
    that only shares its first 15 characters (a wrong checksum suffix names no record)."""
    forged = IDS[0][:15] + ("AAB" if not IDS[0].endswith("AAB") else "AAC")
    mock_soap_login(rsps)
    rsps.add(
        responses.GET, QUERY_URL, json=query_body([soql_record("Opportunity", IDS[0], {"Name": "Acme"})])
    )
    got = make().get_records("Opportunity", [forged, IDS[0], IDS[0][:15]], ["Name"])
    assert got == {IDS[0]: {"Name": "Acme"}, IDS[0][:15]: {"Name": "Acme"}}


def test_reads_are_chunked_by_200_ids(rsps: responses.RequestsMock, make: MakeAdapter) -> None:
    ids = opportunity_ids(250)
    mock_soap_login(rsps)
    rsps.add(responses.GET, QUERY_URL, json=query_body([]))
    make().get_records("Opportunity", ids, ["Name"])
    queries = [soql_of(c) for c in rsps.calls if c.request.method == "GET"]
    assert [q.count("'006") for q in queries] == [200, 50]


def test_a_soql_injection_attempt_in_an_id_stays_a_quoted_value(
    rsps: responses.RequestsMock, make: MakeAdapter
) -> None:
    hostile = "006' OR Name != '"
    mock_soap_login(rsps)
    rsps.add(responses.GET, QUERY_URL, json=query_body([]))
    assert make().get_records("Opportunity", [hostile], ["Name"]) == {}
    assert soql_of(rsps.calls[-1]) == "SELECT Id, Name FROM Opportunity WHERE Id IN ('006\\' OR Name != \\'')"


@pytest.mark.parametrize(
    "bad",
    [
        "Name FROM User WHERE Id != null --",
        "Name,Amount",
        "(SELECT Id FROM Contacts)",
        "Account..Name",
        "Name'",
        "A.B.C.D.E.F.G",  # deeper than five relationship levels
        "",
    ],
)
def test_invalid_field_names_are_rejected_before_any_request(
    rsps: responses.RequestsMock, make: MakeAdapter, bad: str
) -> None:
    with pytest.raises(FatalError) as caught:
        make().get_records("Opportunity", [IDS[0]], ["Name", bad])
    assert len(rsps.calls) == 0
    assert caught.value.code == "INVALID_FIELD"


def test_invalid_object_names_are_rejected(rsps: responses.RequestsMock, make: MakeAdapter) -> None:
    with pytest.raises(FatalError) as caught:
        make().update_records("Opportunity WHERE", [update(IDS[0])])
    assert caught.value.code == "INVALID_TYPE" and len(rsps.calls) == 0


def test_query_filters_by_equality_and_modified_since_and_follows_next_records_url(
    rsps: responses.RequestsMock, make: MakeAdapter
) -> None:
    next_url = "/services/data/v62.0/query/01gDn00000ABCDE-2000"
    first = [soql_record("Opportunity", IDS[0], {"Name": "Acme"})]
    second = [soql_record("Opportunity", IDS[1], {"Name": "Globex"})]
    mock_soap_login(rsps)
    rsps.add(responses.GET, QUERY_URL, json=query_body(first, next_url))
    rsps.add(responses.GET, f"{INSTANCE}{next_url}", json=query_body(second))
    got = list(
        make().query(
            "Opportunity",
            ["Name"],
            {"StageName": "Closed Won", "Approval_Status__c": None, "Type": ["New", "Renewal"]},
            modified_since=datetime(2024, 5, 1, 14, 30, tzinfo=UTC),
        )
    )
    assert got == [{"Id": IDS[0], "Name": "Acme"}, {"Id": IDS[1], "Name": "Globex"}]
    assert soql_of(rsps.calls[1]) == (
        "SELECT Id, Name FROM Opportunity WHERE StageName = 'Closed Won' AND Approval_Status__c = null "
        "AND Type IN ('New','Renewal') AND LastModifiedDate >= 2024-05-01T14:30:00+00:00"
    )


def test_describe_maps_fields(rsps: responses.RequestsMock, make: MakeAdapter) -> None:
    mock_soap_login(rsps)
    rsps.add(responses.GET, DESCRIBE_URL, json=describe_body())
    account, status = make().describe("Opportunity")
    assert (account.name, account.label, account.type) == ("AccountId", "Account ID", "reference")
    assert account.reference_to == ("Account",) and account.relationship_name == "Account"
    assert status.updateable and status.relationship_name is None
    assert status.extra["picklist_values"] == ["Pending"]  # inactive values left out


# --- time-outs ------------------------------------------------------------------------------


def test_every_request_carries_the_time_out(rsps: responses.RequestsMock, make: MakeAdapter) -> None:
    mock_soap_login(rsps)
    rsps.add(responses.GET, DESCRIBE_URL, json=describe_body())
    rsps.add(responses.PATCH, COLLECTIONS_URL, json=[save_success(IDS[0])])
    rsps.add(responses.GET, QUERY_URL, json=query_body([]))
    adapter = make()
    adapter.describe("Opportunity")
    adapter.update_records("Opportunity", [update(IDS[0])])
    adapter.get_records("Opportunity", [IDS[0]], ["Name"])
    assert len(rsps.calls) == 4
    assert [c.request.req_kwargs["timeout"] for c in rsps.calls] == [TIMEOUT] * 4


# --- echo prevention ------------------------------------------------------------------------


def _event(origin: str | None) -> RecordChangeEvent:
    return RecordChangeEvent(
        source="salesforce",
        connection="sf",
        object_type="Opportunity",
        record_id=IDS[0],
        event_id="1",
        occurred_at=datetime(2024, 5, 1, tzinfo=UTC),
        dedupe_key="sf:1",
        origin=origin,
    )


@pytest.mark.parametrize(
    ("client_id", "origin", "own"),
    [
        ("crm-approvals", "com/salesforce/api/rest/62.0;client=crm-approvals", True),
        ("crm-approvals", "com/salesforce/api/soap/61.0;client=DataLoaderBulkUI/", False),
        ("crm-approvals", "com/salesforce/api/rest/62.0;client=crm-approvals-v2", False),
        ("crm-approvals", "com/salesforce/api/rest/62.0", False),
        ("crm-approvals", None, None),  # e.g. an Outbound Message
        ("crm-approvals", "", False),  # CDC: a UI change
        (None, "com/salesforce/api/rest/62.0;client=crm-approvals", None),
    ],
)
def test_is_own_change_reads_the_client_in_change_origin(
    make: MakeAdapter, client_id: str | None, origin: str | None, own: bool | None
) -> None:
    env = {k: v for k, v in PASSWORD_ENV.items() if k != "SF_CLIENT_ID"}
    if client_id:
        env["SF_CLIENT_ID"] = client_id
    assert make(env).is_own_change(_event(origin)) is own


def test_api_usage_reaches_the_worker_sweep_log(
    rsps: responses.RequestsMock, make: MakeAdapter, runtime: Any
) -> None:
    from connector.worker import Tasks, make_huey
    from tests.processors import CountingProcessor

    adapter = make()
    mock_soap_login(rsps)
    rsps.patch(
        COLLECTIONS_URL, json=[save_success(IDS[0])], headers={"Sforce-Limit-Info": "api-usage=42/15000"}
    )
    adapter.update_records("Opportunity", [update(IDS[0], StageName="Closed Won")])
    runtime.set_adapter("salesforce", adapter)
    runtime.processor = CountingProcessor()
    assert Tasks(runtime, make_huey("memory://")).run_sweep()["api_usage"] == {
        "salesforce": "42/15000 used today"
    }
