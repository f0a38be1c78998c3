"""Salesforce adapter on simple-salesforce.

Writes go through sObject Collections (`PATCH composite/sobjects`, up to 200 records a call,
allOrNone false so each record succeeds or fails on its own); reads are SOQL built with
`format_soql` from validated field names. Docs: docs/crms/salesforce.md.

simple-salesforce raises its own exceptions, which carry no response headers, so a response
hook on our requests session keeps the last response (Retry-After, Sforce-Limit-Info) and
`_translated` turns every failure into our retriable/fatal errors in one place.

We log in ourselves (SalesforceLogin) and hand simple-salesforce the session id. That turns off
its own silent re-login on 401, so the base class refreshes once through `refresh_auth`, as for
every CRM, and a session-id connection can say that it cannot renew.
"""

from __future__ import annotations

import base64
import logging
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import requests
from simple_salesforce import Salesforce, SalesforceLogin, format_soql
from simple_salesforce.exceptions import SalesforceAuthenticationFailed, SalesforceError

from connector.config import ConfigError, ConnectionConfig
from connector.crm.base import (
    ApiUsage,
    CRMAdapter,
    CRMQueue,
    CRMUser,
    FieldInfo,
    FileUpload,
    RecordUpdate,
    UpdateResult,
)
from connector.crm.errors import (
    AuthError,
    AuthExpiredError,
    CRMError,
    FatalError,
    RateLimitedError,
    RetriableError,
    parse_retry_after,
)
from connector.crm.http import STATUS_ERRORS, network_error
from connector.crm.retry import RetryPolicy
from connector.crm.salesforce_ids import normalize_salesforce_id
from connector.events import RecordChangeEvent

log = logging.getLogger(__name__)

DEFAULT_API_VERSION = "62.0"
READ_BATCH_LIMIT = 200  # ids per SOQL `IN` list: ~4 KB, far below the 100,000-character SOQL limit
MAX_RELATIONSHIP_LEVELS = 5  # SOQL follows child-to-parent relationships five levels deep at most

# Request-level errorCodes that decide the error class whatever the HTTP status says.
CODE_ERRORS: dict[str, type[CRMError]] = {
    "REQUEST_LIMIT_EXCEEDED": RateLimitedError,  # HTTP 403: the org's API request limit is used up
    "INVALID_SESSION_ID": AuthExpiredError,  # HTTP 401
}
# Per-record statusCodes worth another try later: another transaction holds the row.
RETRIABLE_RECORD_CODES = frozenset({"UNABLE_TO_LOCK_ROW"})

# Auth mode -> the variables it needs; a group of several names means "one of these".
AUTH_MODES: dict[str, tuple[tuple[str, ...], ...]] = {
    "password": (("USERNAME",), ("PASSWORD",), ("SECURITY_TOKEN",)),
    "ip_filter": (("USERNAME",), ("PASSWORD",), ("ORGANIZATION_ID",)),
    "oauth_password": (("USERNAME",), ("PASSWORD",), ("CONSUMER_KEY",), ("CONSUMER_SECRET",)),
    "jwt": (("USERNAME",), ("CONSUMER_KEY",), ("PRIVATE_KEY", "PRIVATE_KEY_FILE")),
    "client_credentials": (("CONSUMER_KEY",), ("CONSUMER_SECRET",), ("DOMAIN",)),
    "session": (("SESSION_ID",), ("INSTANCE_URL",)),
}
LOGIN_KEYWORDS = {  # connection variable -> SalesforceLogin keyword
    "USERNAME": "username",
    "PASSWORD": "password",
    "SECURITY_TOKEN": "security_token",
    "ORGANIZATION_ID": "organizationId",
    "CONSUMER_KEY": "consumer_key",
    "CONSUMER_SECRET": "consumer_secret",
    "PRIVATE_KEY": "privatekey",
    "PRIVATE_KEY_FILE": "privatekey_file",
}

API_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
API_VERSION = re.compile(r"\d{2,3}\.0")
# Sforce-Call-Options separates options with ',' or ';'. 28 characters keep CDC's changeOrigin
# for our REST writes ("com/salesforce/api/rest/62.0;client=...") within the inbox origin column.
CLIENT_ID = re.compile(r"[A-Za-z0-9_.\-/]{1,28}")


class SalesforceAdapter(CRMAdapter):
    kind: ClassVar[str] = "salesforce"
    batch_limit: ClassVar[int] = 200  # sObject Collections takes up to 200 records a call
    last_modified_by_field: ClassVar[str | None] = "LastModifiedById"

    def __init__(
        self, connection: ConnectionConfig, *, timeout: float = 30.0, retry: RetryPolicy | None = None
    ) -> None:
        super().__init__(connection, timeout=timeout, retry=retry)
        # Everything is checked here, without network, so a bad .env fails at start-up.
        self.auth_mode = auth_mode(connection)
        check_credentials(connection, self.auth_mode)
        self.domain = login_domain(connection, self.auth_mode)
        self.api_version = api_version(connection)
        self.client_id = client_id(connection)
        self.session = _TimeoutSession(lambda: self.timeout)
        self.session.hooks["response"].append(self._on_response)
        self._last = threading.local()
        self._lock = threading.Lock()
        self._sf: Salesforce | None = None
        self._api_usage: ApiUsage | None = None

    # --- reads -------------------------------------------------------------------------

    @property
    def read_batch_limit(self) -> int:
        return READ_BATCH_LIMIT

    def _fetch(
        self, object_type: str, ids: Sequence[str], fields: Sequence[str]
    ) -> dict[str, dict[str, Any]]:
        soql = format_soql(
            "SELECT {:literal} FROM {:literal} WHERE Id IN {}",
            select_list(fields),
            object_name(object_type),
            list(ids),
        )
        # Each record under every id it was asked for as (15 or 18 characters), matched by the
        # 18-character form: ids that only share their first 15 characters are different records.
        requested: dict[str, list[str]] = {}
        for record_id in ids:
            requested.setdefault(_id18(record_id), []).append(record_id)
        found: dict[str, dict[str, Any]] = {}
        for record in self._query_all(soql):
            returned = str(record.get("Id") or "")
            values = pick(flatten(record), fields)
            for asked in requested.get(_id18(returned), [returned]):
                found[asked] = values
        return found

    def _query_page(
        self, object_type: str, fields: Sequence[str], filters: Mapping[str, Any], cursor: Any
    ) -> tuple[list[dict[str, Any]], Any]:
        with self._translated():
            if cursor is None:
                soql = format_soql(
                    "SELECT {:literal} FROM {:literal}", select_list(fields), object_name(object_type)
                )
                page = self._client().query(soql + where_clause(filters), timeout=self.timeout)
            else:
                page = self._client().query_more(cursor, identifier_is_url=True, timeout=self.timeout)
        records = [pick(flatten(record), ["Id", *fields]) for record in page.get("records", [])]
        return records, (None if page.get("done", True) else page.get("nextRecordsUrl"))

    def _users_page(self, cursor: Any) -> tuple[list[CRMUser], Any]:
        """Standard (licensed) users; portal and guest users cannot approve anything here."""
        with self._translated():
            if cursor is None:
                soql = format_soql(
                    "SELECT Id, Name, Email, LanguageLocaleKey, ManagerId, IsActive FROM User "
                    "WHERE UserType = {} ORDER BY Id",
                    "Standard",
                )
                page = self._client().query(soql, timeout=self.timeout)
            else:
                page = self._client().query_more(cursor, identifier_is_url=True, timeout=self.timeout)
        users = [user_of(record) for record in page.get("records", [])]
        return users, (None if page.get("done", True) else page.get("nextRecordsUrl"))

    def _queues(self) -> list[CRMQueue]:
        """Queues and public groups (Group Type Queue / Regular) with their GroupMember users;
        a group inside a group contributes its own users (role groups are not expanded)."""
        groups = list(
            self._query_all(
                format_soql(
                    "SELECT Id, Name, Type FROM Group WHERE Type IN {} ORDER BY Id", QUEUE_GROUP_TYPES
                )
            )
        )
        direct: dict[str, list[str]] = {str(g["Id"]): [] for g in groups}
        ids = list(direct)
        for start in range(0, len(ids), READ_BATCH_LIMIT):
            soql = format_soql(
                "SELECT GroupId, UserOrGroupId FROM GroupMember WHERE GroupId IN {} ORDER BY Id",
                ids[start : start + READ_BATCH_LIMIT],
            )
            for member in self._query_all(soql):
                direct.setdefault(str(member["GroupId"]), []).append(str(member["UserOrGroupId"]))
        return [
            CRMQueue(
                id=str(g["Id"]),
                name=str(g.get("Name") or g["Id"]),
                members=_group_users(direct, str(g["Id"])),
            )
            for g in groups
        ]

    def _query_all(self, soql: str) -> Iterator[Mapping[str, Any]]:
        with self._translated():
            page = self._client().query(soql, timeout=self.timeout)
        yield from page.get("records", [])
        while not page.get("done", True):
            with self._translated():
                page = self._client().query_more(
                    page["nextRecordsUrl"], identifier_is_url=True, timeout=self.timeout
                )
            yield from page.get("records", [])

    def describe(self, object_type: str) -> list[FieldInfo]:
        return self._call(lambda: self._describe(object_type))

    def _describe(self, object_type: str) -> list[FieldInfo]:
        with self._translated():
            body = self._client().restful(
                f"sobjects/{object_name(object_type)}/describe", timeout=self.timeout
            )
        return [field_info(field) for field in (body or {}).get("fields", [])]

    # --- writes ------------------------------------------------------------------------

    def _update_batch(self, object_type: str, updates: Sequence[RecordUpdate]) -> list[UpdateResult]:
        sobject = object_name(object_type)
        body = {"allOrNone": False, "records": [record_body(sobject, update) for update in updates]}
        with self._translated():
            results = self._client().restful(
                "composite/sobjects",
                method="PATCH",
                json=body,
                headers=self._call_options(),
                timeout=self.timeout,
            )
        if not isinstance(results, list) or len(results) != len(updates):
            count = len(results) if isinstance(results, list) else 0
            raise FatalError(
                f"Salesforce answered {count} results for {len(updates)} {sobject} updates; "
                "cannot tell which result belongs to which record"
            )
        return [record_result(update, result) for update, result in zip(updates, results, strict=True)]

    def attach_file(self, object_type: str, record_id: str, file: FileUpload, replaces: str | None) -> str:
        """Salesforce Files: the first version is a ContentVersion published to the record
        (FirstPublishLocationId links it); later ones are new ContentVersions of the same
        ContentDocument, so the record shows one file with a version history. Returns the
        ContentDocumentId."""
        body: dict[str, Any] = {
            "Title": file.title,
            "PathOnClient": file.filename,
            "VersionData": base64.b64encode(file.content).decode("ascii"),
        }
        if replaces is None:
            body["FirstPublishLocationId"] = record_id
        else:
            body["ContentDocumentId"] = replaces
            body["ReasonForChange"] = "Regenerated after the approval moved on"
        try:
            with self._translated():
                created = self._client().restful(
                    "sobjects/ContentVersion",
                    method="POST",
                    json=body,
                    headers=self._call_options(),
                    timeout=self.timeout,
                )
        except FatalError as exc:
            if replaces is None or exc.code not in FILE_GONE_CODES:
                raise
            return self.attach_file(object_type, record_id, file, None)  # deleted in Salesforce: anew
        if not isinstance(created, dict) or not created.get("id"):
            raise FatalError(f"Salesforce answered the ContentVersion insert with {str(created)[:200]}")
        if replaces is not None:
            return replaces
        soql = format_soql("SELECT ContentDocumentId FROM ContentVersion WHERE Id = {}", str(created["id"]))
        with self._translated():
            rows = self._client().query(soql, timeout=self.timeout).get("records", [])
        if not rows:
            raise FatalError(f"Salesforce created ContentVersion {created['id']} but cannot find it")
        return str(rows[0]["ContentDocumentId"])

    def _call_options(self) -> dict[str, str]:
        # Names us in CDC's changeOrigin ("...;client=<id>"), which is_own_change looks for.
        return {"Sforce-Call-Options": f"client={self.client_id}"} if self.client_id else {}

    def is_own_change(self, event: RecordChangeEvent) -> bool | None:
        if not self.client_id or event.origin is None:
            return None  # e.g. Outbound Messages carry no origin
        # CDC leaves changeOrigin empty for UI changes: present, and not ours.
        # Salesforce's own samples end the client part with a slash: "client=SfdcInternalAPI/".
        parts = (part.strip().rstrip("/") for part in event.origin.split(";"))
        return f"client={self.client_id}" in parts

    # --- session -----------------------------------------------------------------------

    @property
    def api_usage(self) -> ApiUsage | None:
        """The org's daily API requests used/limit (Sforce-Limit-Info) as of the last response."""
        return self._api_usage

    def refresh_auth(self) -> bool:
        if self.auth_mode == "session":
            return False  # a pasted session id cannot be renewed without credentials
        with self._lock:
            self._sf = self._connect()
        return True

    def _client(self) -> Salesforce:
        with self._lock:
            if self._sf is None:
                self._sf = self._connect()
            return self._sf

    def _connect(self) -> Salesforce:
        if self.auth_mode == "session":
            return Salesforce(
                session_id=self.connection.require("SESSION_ID"),
                instance_url=self.connection.require("INSTANCE_URL"),
                session=self.session,
                version=self.api_version,
            )
        arguments: dict[str, Any] = dict(login_arguments(self.connection, self.auth_mode))
        with self._translated():
            session_id, instance = SalesforceLogin(
                session=self.session, sf_version=self.api_version, domain=self.domain, **arguments
            )
        log.info("salesforce %s: logged in (%s auth) to %s", self.connection.name, self.auth_mode, instance)
        return Salesforce(
            session_id=session_id, instance=instance, session=self.session, version=self.api_version
        )

    def _on_response(self, response: requests.Response, *args: Any, **kwargs: Any) -> requests.Response:
        self._last.response = response
        usage = parse_api_usage(response.headers.get("Sforce-Limit-Info"))
        if usage is not None:
            self._api_usage = usage
        return response

    def _last_response(self, status: int | None = None) -> requests.Response | None:
        response: requests.Response | None = getattr(self._last, "response", None)
        if response is None or (status is not None and response.status_code != status):
            return None
        return response

    # --- errors: the one place simple-salesforce and requests failures become ours -------

    @contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except SalesforceAuthenticationFailed as exc:
            raise self._login_error(exc) from exc
        except SalesforceError as exc:
            raise self._api_error(exc) from exc
        except (requests.Timeout, requests.ConnectionError) as exc:
            raise network_error(exc, "Salesforce did not answer") from exc

    def _api_error(self, exc: SalesforceError) -> CRMError:
        response = self._last_response(exc.status)
        code, message = read_error(exc.content)
        return error_for(exc.status, code, message, response.headers if response is not None else {})

    def _login_error(self, exc: SalesforceAuthenticationFailed) -> CRMError:
        # simple-salesforce gives the SOAP exceptionCode / OAuth `error`, or the HTTP status.
        code = exc.code if isinstance(exc.code, str) else None
        response = self._last_response()
        status = exc.code if isinstance(exc.code, int) else None
        if status is None and response is not None:
            status = response.status_code
        unavailable = code is None and status is not None and (status == 429 or status >= 500)
        throttled = code is not None and CODE_ERRORS.get(code) is RateLimitedError
        if unavailable or throttled:
            headers = response.headers if response is not None else {}
            return error_for(status or 503, code, f"Salesforce login failed: {exc.auth_message}", headers)
        return AuthError(
            f"Salesforce {self.auth_mode} login for connection {self.connection.name!r} was refused: "
            f"{code or status}: {exc.auth_message}. Check the {self.connection.env_prefix}* variables "
            "(docs/crms/salesforce.md)",
            code=code,
            status=status,
        )


class _TimeoutSession(requests.Session):
    """Gives every request a time-out, also the logins simple-salesforce sends without one."""

    def __init__(self, timeout: Callable[[], float]) -> None:
        super().__init__()
        self._timeout = timeout

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self._timeout()
        return super().request(method, url, *args, **kwargs)


# --- configuration ----------------------------------------------------------------------


def auth_mode(connection: ConnectionConfig) -> str:
    """`AUTH` when set, else the mode the connection's variables point to."""
    chosen = connection.get("AUTH")
    if chosen is not None:
        if chosen.lower() not in AUTH_MODES:
            raise ConfigError(
                f"{connection.env_prefix}AUTH={chosen!r} is not a Salesforce auth mode; "
                f"use one of: {', '.join(AUTH_MODES)}"
            )
        return chosen.lower()
    has = connection.get
    if has("SESSION_ID"):
        return "session"
    if has("PRIVATE_KEY") or has("PRIVATE_KEY_FILE"):
        return "jwt"
    if has("SECURITY_TOKEN"):
        return "password"
    if has("ORGANIZATION_ID"):
        return "ip_filter"
    if has("CONSUMER_SECRET"):
        return "oauth_password" if has("USERNAME") else "client_credentials"
    if has("USERNAME") or has("PASSWORD"):
        return "password"
    options = "; ".join(f"{mode}: {_needs(connection, mode)}" for mode in AUTH_MODES)
    raise ConfigError(
        f"connection {connection.name!r} (salesforce) has no credentials. Set the variables of one "
        f"auth mode ({options}) in the environment or .env, see docs/crms/salesforce.md"
    )


def check_credentials(connection: ConnectionConfig, mode: str) -> None:
    missing = [group for group in AUTH_MODES[mode] if not any(connection.get(name) for name in group)]
    if missing:
        names = ", ".join(" or ".join(connection.env_prefix + name for name in group) for group in missing)
        raise ConfigError(
            f"connection {connection.name!r} (salesforce, {mode} auth) needs {names}; "
            "set them in the environment or .env (see docs/crms/salesforce.md)"
        )
    key_file = connection.get("PRIVATE_KEY_FILE")
    if mode == "jwt" and not connection.get("PRIVATE_KEY") and key_file and not Path(key_file).is_file():
        raise ConfigError(f"{connection.env_prefix}PRIVATE_KEY_FILE={key_file!r}: no such file")
    instance_url = connection.get("INSTANCE_URL")
    if mode == "session" and instance_url and not instance_url.startswith("https://"):
        raise ConfigError(
            f"{connection.env_prefix}INSTANCE_URL must be the https:// URL of your org, "
            f"e.g. https://acme.my.salesforce.com; got {instance_url!r}"
        )


def login_domain(connection: ConnectionConfig, mode: str) -> str:
    """`login`, `test` or a My Domain (`acme.my`); a full host name or URL is accepted too."""
    raw = (connection.get("DOMAIN") or "login").strip().lower()
    domain = raw.removeprefix("https://").removeprefix("http://").rstrip("/").removesuffix(".salesforce.com")
    if not re.fullmatch(r"[a-z0-9][a-z0-9.\-]*", domain):
        raise ConfigError(
            f"{connection.env_prefix}DOMAIN={raw!r} is not login, test or a My Domain like acme.my"
        )
    if mode == "client_credentials" and domain in ("login", "test"):
        raise ConfigError(
            f"the client credentials flow needs your My Domain in {connection.env_prefix}DOMAIN "
            f"(e.g. acme.my or acme--uat.sandbox.my), not {domain!r}"
        )
    return domain


# A ContentDocument someone deleted (or emptied from the recycle bin): the next version starts anew.
FILE_GONE_CODES = frozenset({"INVALID_CROSS_REFERENCE_KEY", "ENTITY_IS_DELETED"})


def api_version(connection: ConnectionConfig) -> str:
    version = (connection.get("VERSION") or DEFAULT_API_VERSION).strip().removeprefix("v")
    if not API_VERSION.fullmatch(version):
        raise ConfigError(f"{connection.env_prefix}VERSION must look like 62.0, got {version!r}")
    return version


def client_id(connection: ConnectionConfig) -> str | None:
    value = connection.get("CLIENT_ID")
    if value is not None and not CLIENT_ID.fullmatch(value):
        raise ConfigError(
            f"{connection.env_prefix}CLIENT_ID={value!r}: use up to 28 letters, digits, '_', '.', '-' or '/'"
        )
    return value


def login_arguments(connection: ConnectionConfig, mode: str) -> dict[str, str]:
    arguments: dict[str, str] = {}
    for group in AUTH_MODES[mode]:
        for name in group:
            value = connection.get(name)
            if value is not None and name in LOGIN_KEYWORDS:
                arguments[LOGIN_KEYWORDS[name]] = value
                break  # PRIVATE_KEY wins over PRIVATE_KEY_FILE
    if "privatekey" in arguments:  # a PEM in .env usually has its line breaks written as \n
        arguments["privatekey"] = arguments["privatekey"].replace("\\n", "\n")
    return arguments


def _needs(connection: ConnectionConfig, mode: str) -> str:
    return " + ".join("/".join(connection.env_prefix + n for n in group) for group in AUTH_MODES[mode])


# --- SOQL and record shapes ------------------------------------------------------------


def _id18(record_id: str) -> str:
    """The 18-character form of a valid id; anything else as it is (Salesforce finds no record
    for it, and the quoted SOQL value keeps it harmless)."""
    try:
        return normalize_salesforce_id(record_id)
    except ValueError:
        return record_id


def object_name(name: str) -> str:
    if not API_NAME.fullmatch(name):
        raise FatalError(
            f"{name!r} is not a Salesforce object API name (e.g. Opportunity, Invoice__c)",
            code="INVALID_TYPE",
        )
    return name


def field_name(name: str) -> str:
    """A field API name or a dotted relationship path, checked so it can go into SOQL as is."""
    parts = name.split(".")
    if len(parts) > MAX_RELATIONSHIP_LEVELS + 1 or not all(API_NAME.fullmatch(part) for part in parts):
        raise FatalError(
            f"{name!r} is not a Salesforce field API name: use letters, digits and _, dotted for "
            "related fields up to five levels (e.g. Account.Credit_Score__c); fix the mapping file",
            code="INVALID_FIELD",
        )
    return name


def select_list(fields: Sequence[str]) -> str:
    """`Id` plus the fields, each once: SOQL rejects a field selected twice."""
    names = {"id": "Id"}
    for name in fields:
        names.setdefault(field_name(name).lower(), name)
    return ", ".join(names.values())


def where_clause(filters: Mapping[str, Any]) -> str:
    conditions = [condition(name, value) for name, value in filters.items()]
    return " WHERE " + " AND ".join(conditions) if conditions else ""


def condition(name: str, value: Any) -> str:
    if name == "modified_since":
        if not isinstance(value, datetime):
            raise FatalError(f"modified_since must be a datetime, got {value!r}")
        aware = value if value.tzinfo else value.replace(tzinfo=UTC)  # we keep naive times in UTC
        return format_soql("LastModifiedDate >= {}", aware)
    several = isinstance(value, list | tuple | set | frozenset)
    try:
        return format_soql(
            "{:literal} {:literal} {}",
            field_name(name),
            "IN" if several else "=",
            list(value) if several else value,
        )
    except ValueError:
        raise FatalError(f"filter {name}: {value!r} cannot be written as a SOQL value") from None


def flatten(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested related records -> dotted keys: {"Account": {"Credit_Score__c": 80}} -> Account.Credit_Score__c.
    Compound values such as addresses have no `attributes` and stay whole."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        if key == "attributes":
            continue
        if isinstance(value, Mapping) and "attributes" in value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def pick(flat: Mapping[str, Any], fields: Sequence[str]) -> dict[str, Any]:
    """The requested fields under the names asked for (SOQL names are case-insensitive); a field
    behind a null relationship is None."""
    by_lower = {key.lower(): value for key, value in flat.items()}
    return {name: by_lower.get(name.lower()) for name in fields}


QUEUE_GROUP_TYPES = ["Queue", "Regular"]
USER_ID_PREFIX = "005"


def _group_users(direct: Mapping[str, list[str]], group_id: str) -> tuple[str, ...]:
    """Users of a group, following nested groups (each once: Salesforce forbids loops, but
    a half-read membership list must not hang us)."""
    users: list[str] = []
    seen: set[str] = set()
    pending = [group_id]
    while pending:
        current = pending.pop(0)
        if current in seen:
            continue
        seen.add(current)
        for member in direct.get(current, []):
            if member.startswith(USER_ID_PREFIX):
                users.append(member)
            elif member in direct:
                pending.append(member)
    return tuple(dict.fromkeys(users))


def user_of(record: Mapping[str, Any]) -> CRMUser:
    """A User row of SOQL (Id, Name, Email, LanguageLocaleKey, ManagerId, IsActive) -> CRMUser."""
    return CRMUser(
        id=str(record["Id"]),
        name=str(record.get("Name") or record["Id"]),
        email=record.get("Email") or None,
        locale=record.get("LanguageLocaleKey") or None,
        manager_id=record.get("ManagerId") or None,
        active=bool(record.get("IsActive", True)),
    )


def record_body(object_type: str, update: RecordUpdate) -> dict[str, Any]:
    return {**update.fields, "attributes": {"type": object_type}, "id": update.record_id}


def record_result(update: RecordUpdate, result: Mapping[str, Any]) -> UpdateResult:
    """One SaveResult ({"id", "success", "errors": [{statusCode, message, fields}]}) -> UpdateResult."""
    if result.get("success"):
        return UpdateResult.success(update.record_id)
    errors = [e for e in result.get("errors") or [] if isinstance(e, Mapping)] or [{}]
    codes = [str(e.get("statusCode") or "UNKNOWN_EXCEPTION") for e in errors]
    messages = [str(e["message"]) for e in errors if e.get("message")]
    return UpdateResult(
        record_id=update.record_id,
        ok=False,
        error_code=codes[0],
        message="; ".join(messages) or "Salesforce did not say why",
        fields=tuple(dict.fromkeys(str(f) for e in errors for f in e.get("fields") or ())),
        retriable=all(code in RETRIABLE_RECORD_CODES for code in codes),
    )


def field_info(field: Mapping[str, Any]) -> FieldInfo:
    return FieldInfo(
        name=field["name"],
        label=field.get("label") or field["name"],
        type=field.get("type") or "string",
        updateable=bool(field.get("updateable")),
        reference_to=tuple(field.get("referenceTo") or ()),
        relationship_name=field.get("relationshipName"),
        extra={
            "nillable": field.get("nillable"),
            "custom": field.get("custom"),
            "calculated": field.get("calculated"),
            "length": field.get("length"),
            "picklist_values": [v["value"] for v in field.get("picklistValues") or () if v.get("active")],
        },
    )


# --- errors ---------------------------------------------------------------------------


def read_error(content: Any) -> tuple[str | None, str]:
    """Salesforce's REST error body, [{"errorCode": ..., "message": ...}], -> (code, message)."""
    first = content[0] if isinstance(content, list) and content else content
    if isinstance(first, Mapping):
        code = first.get("errorCode") or first.get("error")
        message = first.get("message") or first.get("error_description") or str(first)
        return (str(code) if code else None), str(message)
    return None, str(content)[:500]


def error_for(status: int, code: str | None, message: str, headers: Mapping[str, str]) -> CRMError:
    """The errorCode decides first (REQUEST_LIMIT_EXCEEDED comes as 403), then the HTTP status."""
    cls = CODE_ERRORS.get(code or "") or STATUS_ERRORS.get(status)
    if cls is None:
        cls = RetriableError if status >= 500 else FatalError
    kwargs: dict[str, Any] = {"code": code, "status": status}
    if issubclass(cls, RetriableError):
        kwargs["retry_after"] = parse_retry_after(headers)
    return cls(message, **kwargs)


def parse_api_usage(header: str | None) -> ApiUsage | None:
    """`Sforce-Limit-Info: api-usage=18/5000` -> ApiUsage(18, 5000), with simple-salesforce's parser."""
    if not header:
        return None
    usage = Salesforce.parse_api_usage(header).get("api-usage")
    return ApiUsage(used=usage.used, limit=usage.total) if usage is not None else None
