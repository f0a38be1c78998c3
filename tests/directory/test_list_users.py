"""list_users() of every adapter, against each CRM's documented user-list format (mocked with
`responses`): Salesforce User by SOQL, HubSpot owners, Zoho users, Bitrix24 user.get +
department.get, and the sandbox's own API (the real sandbox app)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import responses
from flask.testing import FlaskClient

from connector.config import Settings, parse_connections
from connector.crm.base import CRMAdapter, CRMUser
from connector.crm.registry import adapter_class
from connector.crm.retry import NO_WAIT
from connector.sandbox.app import SandboxConfig, create_sandbox_app
from tests.contract.harness_bitrix24 import WEBHOOK_ENV, WEBHOOK_URL
from tests.contract.harness_hubspot import API as HUBSPOT_API
from tests.contract.harness_hubspot import PRIVATE_APP_ENV
from tests.contract.harness_salesforce import INSTANCE, QUERY_URL, SalesforceAdapterHarness, mock_soap_login
from tests.contract.harness_sandbox import ENV
from tests.contract.harness_zoho import ADAPTER_ENV as ZOHO_ENV
from tests.contract.harness_zoho import API as ZOHO_API
from tests.contract.harness_zoho import mock_token
from tests.sandbox.test_sandbox import sandbox_settings, wire_sandbox_api


def make_adapter(kind: str, env: dict[str, str]) -> CRMAdapter:
    connections = parse_connections(env)
    settings = Settings(connections=connections, http_timeout_seconds=5)
    adapter = adapter_class(kind).from_config(next(iter(connections.values())), settings)  # type: ignore[attr-defined]
    adapter.retry = NO_WAIT
    return adapter  # type: ignore[no-any-return]


# --- Salesforce: SELECT ... FROM User through format_soql, paged with nextRecordsUrl ----------


def sf_user(
    user_id: str, name: str, email: str, locale: str, manager: str | None, active: bool
) -> dict[str, Any]:
    return {
        "attributes": {"type": "User", "url": f"/services/data/v62.0/sobjects/User/{user_id}"},
        "Id": user_id,
        "Name": name,
        "Email": email,
        "LanguageLocaleKey": locale,
        "ManagerId": manager,
        "IsActive": active,
    }


def test_salesforce_lists_standard_users_by_soql_and_follows_next_records_url() -> None:
    more = "/services/data/v62.0/query/01gD0000002HU6KIAW-2000"
    with responses.RequestsMock() as rsps:
        mock_soap_login(rsps)
        rsps.get(
            re.compile(re.escape(QUERY_URL) + r"\?q=.*"),
            json={
                "totalSize": 3,
                "done": False,
                "nextRecordsUrl": more,
                "records": [
                    sf_user("005Hs00000Mgr001AAA", "Maria Garcia", "maria@acme.example", "es", None, True),
                    sf_user(
                        "005Hs00000Rep001AAA",
                        "Li Wei",
                        "li.wei@acme.example",
                        "zh_CN",
                        "005Hs00000Mgr001AAA",
                        True,
                    ),
                ],
            },
        )
        rsps.get(
            f"{INSTANCE}{more}",
            json={"totalSize": 3, "done": True, "records": [
                sf_user("005Hs00000Old001AAA", "Jan Nowak", "jan@acme.example", "pl", None, False)]},
        )  # fmt: skip
        users = list(make_adapter("salesforce", dict(SalesforceAdapterHarness.env)).list_users())
        soql = parse_qs(urlsplit(rsps.calls[1].request.url).query)["q"][0]
    assert soql == (
        "SELECT Id, Name, Email, LanguageLocaleKey, ManagerId, IsActive FROM User "
        "WHERE UserType = 'Standard' ORDER BY Id"
    )
    assert users == [
        CRMUser("005Hs00000Mgr001AAA", "Maria Garcia", "maria@acme.example", "es", None, True),
        CRMUser("005Hs00000Rep001AAA", "Li Wei", "li.wei@acme.example", "zh_CN", "005Hs00000Mgr001AAA", True),
        CRMUser("005Hs00000Old001AAA", "Jan Nowak", "jan@acme.example", "pl", None, False),
    ]


# --- HubSpot: GET /crm/v3/owners, paged with `after`, active then archived --------------------


def owner(
    owner_id: str, first: str, last: str, email: str, user_id: int, archived: bool = False
) -> dict[str, Any]:
    return {
        "id": owner_id,
        "email": email,
        "type": "PERSON",
        "firstName": first,
        "lastName": last,
        "userId": user_id,
        "userIdIncludingInactive": user_id,
        "createdAt": "2019-12-25T13:01:35.228Z",
        "updatedAt": "2023-08-22T13:40:26.790Z",
        "archived": archived,
        "teams": [{"id": "368389", "name": "Sales Team", "primary": True}],
    }


def test_hubspot_lists_owners_with_their_user_ids_as_other_ids() -> None:
    url = f"{HUBSPOT_API}/crm/v3/owners"
    with responses.RequestsMock() as rsps:
        rsps.get(
            url,
            match=[responses.matchers.query_param_matcher({"limit": "100", "archived": "false"})],
            json={
                "results": [owner("41629779", "Ana", "Lopez", "ana@acme.example", 9586504)],
                "paging": {"next": {"after": "NDE2Mjk3Nzk=", "link": f"{url}?after=NDE2Mjk3Nzk="}},
            },
        )
        rsps.get(
            url,
            match=[
                responses.matchers.query_param_matcher(
                    {"limit": "100", "archived": "false", "after": "NDE2Mjk3Nzk="}
                )
            ],
            json={"results": [owner("41629780", "Bo", "Chen", "bo@acme.example", 9586505)]},
        )
        archived = owner("41629781", "Old", "Owner", "old@acme.example", 9586506, archived=True)
        rsps.get(
            url,
            match=[responses.matchers.query_param_matcher({"limit": "100", "archived": "true"})],
            json={"results": [archived]},
        )
        users = list(make_adapter("hubspot", dict(PRIVATE_APP_ENV)).list_users())
        assert all(c.request.headers["Authorization"].startswith("Bearer pat-") for c in rsps.calls)
    assert users == [
        CRMUser("41629779", "Ana Lopez", "ana@acme.example", None, None, True, ("9586504",)),
        CRMUser("41629780", "Bo Chen", "bo@acme.example", None, None, True, ("9586505",)),
        CRMUser("41629781", "Old Owner", "old@acme.example", None, None, False, ("9586506",)),
    ]


# --- Zoho: GET /crm/v6/users?type=AllUsers, paged with page/per_page -------------------------


def zoho_user(
    user_id: str, name: str, email: str, locale: str, manager: dict[str, str] | None, status: str
) -> dict:
    first, _, last = name.partition(" ")
    return {
        "country": "Poland",
        "role": {"name": "Sales", "id": "554023000000026008"},
        "language": locale,
        "locale": locale,
        "Modified_By": {"name": "Admin", "id": "554023000000235001"},
        "id": user_id,
        "first_name": first,
        "last_name": last,
        "full_name": name,
        "email": email,
        "status": status,
        "Reporting_To": manager,
        "confirm": True,
        "profile": {"name": "Standard", "id": "554023000000026014"},
    }


def test_zoho_lists_all_users_with_reporting_to_as_manager() -> None:
    with responses.RequestsMock() as rsps:
        mock_token(rsps)
        rsps.get(
            f"{ZOHO_API}/users",
            match=[
                responses.matchers.query_param_matcher({"type": "AllUsers", "page": "1", "per_page": "200"})
            ],
            json={
                "users": [
                    zoho_user(
                        "554023000000235101",
                        "Kasia Nowak",
                        "kasia@acme.example",
                        "pl_PL",
                        {"name": "Jan Kowalski", "id": "554023000000235102"},
                        "active",
                    )
                ],
                "info": {"per_page": 200, "count": 1, "page": 1, "more_records": True},
            },
        )
        rsps.get(f"{ZOHO_API}/users", match=[responses.matchers.query_param_matcher(
                     {"type": "AllUsers", "page": "2", "per_page": "200"})],
                 json={"users": [zoho_user("554023000000235102", "Jan Kowalski", "jan@acme.example", "en_US",
                                           None, "disabled")],
                       "info": {"per_page": 200, "count": 1, "page": 2, "more_records": False}})  # fmt: skip
        users = list(make_adapter("zoho", dict(ZOHO_ENV)).list_users())
        assert rsps.calls[1].request.headers["Authorization"] == "Zoho-oauthtoken 1000.access.1"
    assert users == [
        CRMUser(
            "554023000000235101", "Kasia Nowak", "kasia@acme.example", "pl_PL", "554023000000235102", True
        ),
        CRMUser("554023000000235102", "Jan Kowalski", "jan@acme.example", "en_US", None, False),
    ]


# --- Bitrix24: user.get paged with start; managers are department heads (department.get) -----


def bitrix_user(
    user_id: str, name: str, last: str, email: str, departments: list[int], active: bool = True
) -> dict:
    return {
        "ID": user_id, "ACTIVE": active, "EMAIL": email, "NAME": name, "LAST_NAME": last, "SECOND_NAME": "",
        "PERSONAL_GENDER": "", "WORK_POSITION": "", "UF_DEPARTMENT": departments, "UF_PHONE_INNER": None,
    }  # fmt: skip


def form(request: Any) -> dict[str, list[str]]:
    return parse_qs(request.body if isinstance(request.body, str) else request.body.decode())


def test_bitrix24_lists_users_and_takes_managers_from_department_heads() -> None:
    departments = [
        {"ID": "1", "NAME": "Company", "SORT": 500, "UF_HEAD": "1"},
        {"ID": "5", "NAME": "Sales", "SORT": 500, "PARENT": "1", "UF_HEAD": "7"},
        {"ID": "9", "NAME": "Sales EU", "SORT": 500, "PARENT": "5", "UF_HEAD": "0"},  # no head
    ]
    pages = {
        "0": {"result": [bitrix_user("1", "Olga", "Ivanova", "olga@acme.example", [1]),
                         bitrix_user("7", "Piotr", "Zielinski", "piotr@acme.example", [5])],
              "next": 2, "total": 3, "time": {"start": 1.0}},
        "2": {"result": [bitrix_user("12", "Wang", "Fang", "wang@acme.example", [9], active=False)],
              "total": 3, "time": {"start": 1.0}},
    }  # fmt: skip
    with responses.RequestsMock() as rsps:
        rsps.add_callback(
            responses.POST,
            f"{WEBHOOK_URL}department.get",
            callback=lambda r: (200, {}, json.dumps({"result": departments, "total": 3})),
        )
        rsps.add_callback(responses.POST, f"{WEBHOOK_URL}user.get",
                          callback=lambda r: (200, {}, json.dumps(pages[form(r)["start"][0]])))  # fmt: skip
        users = list(make_adapter("bitrix24", dict(WEBHOOK_ENV)).list_users())
        user_calls = [c for c in rsps.calls if c.request.url.endswith("user.get")]
        assert [form(c.request)["start"] for c in user_calls] == [["0"], ["2"]]
    assert users == [
        CRMUser("1", "Olga Ivanova", "olga@acme.example", None, None, True),  # heads the top: no manager
        CRMUser(
            "7", "Piotr Zielinski", "piotr@acme.example", None, "1", True
        ),  # heads Sales: its parent's head
        CRMUser("12", "Wang Fang", "wang@acme.example", None, "7", False),  # Sales EU has no head: Sales's
    ]


# --- sandbox: the seeded users through the real sandbox API ---------------------------------


def sandbox_web(tmp_path: Path) -> FlaskClient:
    """The real sandbox app, seeded, as the sandbox tests build it."""
    app = create_sandbox_app(SandboxConfig.from_settings(sandbox_settings(tmp_path)), start_delivery=False)
    app.testing = True
    return app.test_client()


def test_sandbox_lists_the_seeded_users_with_email_locale_and_manager(tmp_path: Path) -> None:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        wire_sandbox_api(rsps, sandbox_web(tmp_path))
        users = {u.id: u for u in make_adapter("sandbox", dict(ENV)).list_users()}
    assert set(users) == {
        "u-rep-anna",
        "u-rep-felix",
        "u-mgr-boris",
        "u-gm-carla",
        "u-fin-dmitri",
        "u-legal-eva",
        "u-acc-greta",  # seed 001's company cascade
        "u-com-ivan",
        "u-cfo-hugo",
    }
    assert users["u-mgr-boris"] == CRMUser(
        "u-mgr-boris", "Boris Novak", "boris.novak@sandbox.example", "en_US", "u-gm-carla", True
    )
    assert users["u-rep-anna"].manager_id == "u-mgr-boris" and users["u-rep-anna"].locale == "pl_PL"
    assert users["u-gm-carla"].locale == "zh_CN" and users["u-gm-carla"].manager_id is None
