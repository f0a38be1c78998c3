"""Zoho CRM adapter: OAuth refresh-token flow (the shared `connector.crm.auth.OAuthTokens`),
data-centre aware, Records API (v6 by default).

Formats and limits are documented in docs/crms/zoho.md with the Zoho pages they come from.
Writes go through `PUT /crm/{version}/{module}` (at most 100 records, one result per record
in order); reads through `GET /crm/{version}/{module}?ids=...&fields=...`; queries through the
Search API (equality filters) or the list API with `If-Modified-Since` (everything else).
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar
from urllib.parse import quote

import requests

from connector.config import ConfigError, ConnectionConfig, Settings
from connector.crm.auth import OAuthTokens, TokenAnswer, TokenEndpoint, TokenRefused
from connector.crm.base import (
    CRMAdapter,
    CRMQueue,
    CRMUser,
    FieldInfo,
    FileUpload,
    RecordUpdate,
    UpdateResult,
    chunked,
)
from connector.crm.errors import AuthError, FatalError, NotFoundError, RateLimitedError, RetriableError
from connector.crm.http import json_error_reader, raise_for_status, send
from connector.crm.retry import RetryPolicy
from connector.events import RecordChangeEvent, parse_timestamp

# Data centre -> (accounts server, API domain). Canada's accounts server is zohocloud.ca.
DATA_CENTERS: dict[str, tuple[str, str]] = {
    "com": ("https://accounts.zoho.com", "https://www.zohoapis.com"),
    "eu": ("https://accounts.zoho.eu", "https://www.zohoapis.eu"),
    "in": ("https://accounts.zoho.in", "https://www.zohoapis.in"),
    "com.au": ("https://accounts.zoho.com.au", "https://www.zohoapis.com.au"),
    "jp": ("https://accounts.zoho.jp", "https://www.zohoapis.jp"),
    "ca": ("https://accounts.zohocloud.ca", "https://www.zohoapis.ca"),
    "com.cn": ("https://accounts.zoho.com.cn", "https://www.zohoapis.com.cn"),
    "sa": ("https://accounts.zoho.sa", "https://www.zohoapis.sa"),
}
TRIGGERS = ("workflow", "approval", "blueprint", "pathfinder", "orchestration")
EXPIRED_TOKEN_CODES = frozenset({"INVALID_TOKEN", "AUTHENTICATION_FAILURE"})
RATE_LIMIT_CODES = frozenset({"TOO_MANY_REQUESTS"})
RETRIABLE_RECORD_CODES = frozenset({"RECORD_LOCKED"})  # "wait until the record is unlocked"
EMBEDDED_LOOKUP_KEYS = frozenset({"id", "name", "email"})  # carried inside a lookup value itself
API_NAME = re.compile(r"^[A-Za-z0-9_$]+$")
SEARCH_PAGE_SIZE = 200
USERS_PAGE_SIZE = 200  # GET /crm/{version}/users: per_page up to 200
MAX_SEARCH_CRITERIA = 10
DEFAULT_TOKEN_LIFETIME = 3600.0  # seconds, when Zoho Accounts leaves out expires_in
NOTIFY_TOKEN_MAX_LENGTH = 50  # "The maximum character length is 50" (notifications/enable)
WATCH_EVENT = re.compile(r"^[A-Za-z0-9_$]+\.(create|edit|delete|all)$")


@dataclass(frozen=True)
class ZohoTokenEndpoint(TokenEndpoint):
    """`POST {accounts}/oauth/v2/token`. The grant goes in a form body, not the query string the
    docs show (Zoho takes both), so no secret can end up in a URL or a log line. The answer is
    {"access_token", "api_domain", "token_type", "expires_in": 3600}, without a new refresh
    token (Zoho's do not rotate). A bad refresh token gets HTTP 200 and {"error": "invalid_code"}."""

    url: str
    issuer: str
    hint: str = "a refresh token only works in the data centre it was made in"
    extra_variables: tuple[str, ...] = ("DATA_CENTER",)

    def parse(self, response: requests.Response) -> TokenAnswer:
        if response.status_code >= 500:
            raise_for_status(response, json_error_reader)
        body = _json_object(response)
        if not body.get("access_token"):
            code = str(body.get("error") or f"HTTP {response.status_code}")
            described = str(body.get("error_description") or "")
            if "too many requests" in described.lower():  # Zoho Accounts throttles token refreshes
                raise RateLimitedError(described, code=code, status=response.status_code, retry_after=60.0)
            raise TokenRefused(code, described, response.status_code)
        return TokenAnswer(
            access_token=str(body["access_token"]),
            expires_in=float(body.get("expires_in") or DEFAULT_TOKEN_LIFETIME),
            refresh_token=str(body.get("refresh_token") or "") or None,  # not sent on a refresh
            api_domain=str(body["api_domain"]).rstrip("/") if body.get("api_domain") else None,
        )


@dataclass(frozen=True)
class ReadPlan:
    """Which fields to ask the module for, and which dotted fields to resolve through lookups."""

    direct: tuple[str, ...]
    related: dict[str, tuple[str, ...]]  # lookup field -> sub-fields

    @property
    def requested(self) -> list[str]:
        return list(dict.fromkeys([*self.direct, *self.related]))


@dataclass(frozen=True)
class NotificationChannel:
    """A notification channel we keep alive (`ZOHO_NOTIFY_CHANNEL_ID`, docs/crms/zoho.md)."""

    connection: str
    channel_id: str
    events: tuple[str, ...]  # e.g. ("Deals.all",)
    notify_url: str
    token: str = field(repr=False)  # the first ZOHO_NOTIFY_TOKEN; Zoho echoes it in every callback


class ZohoAdapter(CRMAdapter):
    kind = "zoho"
    batch_limit = 100  # "A maximum of 100 records can be updated per API call"
    last_modified_by_field: ClassVar[str | None] = "Modified_By"

    def __init__(
        self,
        connection: ConnectionConfig,
        *,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(connection, timeout=timeout, retry=retry)
        self.client_id = connection.require("CLIENT_ID")
        client_secret = connection.require("CLIENT_SECRET")
        refresh_token = connection.require("REFRESH_TOKEN")
        default_accounts, default_api = data_center_urls(connection)
        self.accounts_url = (connection.get("ACCOUNTS_URL") or default_accounts).rstrip("/")
        self._api_domain_override = connection.get("API_DOMAIN")
        self.api_domain = (self._api_domain_override or default_api).rstrip("/")
        self.api_version = connection.get("API_VERSION", "v6") or "v6"
        self.trigger = parse_trigger(connection)
        self.own_user_ids = connection.get_list("API_USER_ID")
        self.session = session or requests.Session()
        self.oauth_tokens = OAuthTokens(
            ZohoTokenEndpoint(
                url=f"{self.accounts_url}/oauth/v2/token", issuer=f"Zoho Accounts at {self.accounts_url}"
            ),
            connection,
            client_id=self.client_id,
            client_secret=client_secret,
            refresh_token=refresh_token,
            session=self.session,
            timeout=self.timeout,
            clock=clock,
        )
        self._fields: dict[str, list[FieldInfo]] = {}

    @classmethod
    def from_config(cls, connection: ConnectionConfig, settings: Settings) -> ZohoAdapter:
        return cls(connection, timeout=settings.http_timeout_seconds)

    # --- auth -------------------------------------------------------------------------

    def refresh_auth(self) -> bool:
        self.oauth_tokens.renew()
        return True

    def _access_token(self) -> str:
        token = self.oauth_tokens.current()
        if token.api_domain and not self._api_domain_override:  # the token's own data centre wins
            self.api_domain = token.api_domain
        return token.value

    # --- HTTP -------------------------------------------------------------------------

    @property
    def api_base(self) -> str:
        return f"{self.api_domain}/crm/{self.api_version}"

    def _send(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        _check_api_name(path.partition("/")[0])  # a module name must never step outside /crm/{version}/
        headers = {**kwargs.pop("headers", {}), "Authorization": f"Zoho-oauthtoken {self._access_token()}"}
        return send(self.session, method, f"{self.api_base}/{path}", self.timeout, headers=headers, **kwargs)

    def _checked(self, response: requests.Response) -> requests.Response:
        raise_for_zoho_status(response)
        return response

    # --- reads ------------------------------------------------------------------------

    def _fetch(
        self, object_type: str, ids: Sequence[str], fields: Sequence[str]
    ) -> dict[str, dict[str, Any]]:
        plan = self._read_plan(object_type, fields)
        records = self._records_by_ids(object_type, ids, plan.requested)
        shaped = self._shape(object_type, records, plan)
        return {str(record["id"]): record for record in shaped}

    def _records_by_ids(self, module: str, ids: Sequence[str], fields: Sequence[str]) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        for chunk in chunked(list(dict.fromkeys(ids)), self.read_batch_limit):
            params = {"ids": ",".join(chunk), "fields": ",".join(fields or ["id"])}
            response = self._checked(self._send("GET", module, params=params))
            found.extend(_data(response))
        return found

    def _read_plan(self, object_type: str, fields: Sequence[str]) -> ReadPlan:
        direct: list[str] = []
        related: dict[str, list[str]] = {}
        for name in fields:
            lookup, dot, sub = name.partition(".")
            _check_api_name(lookup)
            if not dot:
                direct.append(name)
                continue
            if "." in sub or not sub:
                raise FatalError(
                    f"{object_type}.{name}: only one level of lookup is supported (Lookup.Field)"
                )
            related.setdefault(lookup, []).append(sub)
        return ReadPlan(tuple(direct), {k: tuple(v) for k, v in related.items()})

    def _shape(self, object_type: str, records: list[dict[str, Any]], plan: ReadPlan) -> list[dict[str, Any]]:
        shaped = [{"id": str(r.get("id")), **{f: r.get(f) for f in plan.direct}} for r in records]
        for lookup, subs in plan.related.items():
            values = self._related_values(object_type, lookup, subs, [r.get(lookup) for r in records])
            for out, resolved in zip(shaped, values, strict=True):
                out.update({f"{lookup}.{sub}": resolved.get(sub) for sub in subs})
        return shaped

    def _related_values(
        self, object_type: str, lookup: str, subs: Sequence[str], links: list[Any]
    ) -> list[dict[str, Any]]:
        """For each record's lookup value: sub-field -> value, from the embedded object or the
        related record (fetched in one call per 100 ids)."""
        remote = [s for s in subs if s not in EMBEDDED_LOOKUP_KEYS]
        fetched: dict[str, dict[str, Any]] = {}
        if remote:
            module = self._lookup_module(object_type, lookup)
            ids = [str(link["id"]) for link in links if isinstance(link, dict) and link.get("id")]
            fetched = {str(r["id"]): r for r in self._records_by_ids(module, ids, remote)} if ids else {}
        resolved: list[dict[str, Any]] = []
        for link in links:
            if not isinstance(link, dict):
                resolved.append({})
                continue
            row = {s: link.get(s) for s in subs if s in EMBEDDED_LOOKUP_KEYS}
            row.update({s: fetched.get(str(link.get("id")), {}).get(s) for s in remote})
            resolved.append(row)
        return resolved

    def _lookup_module(self, object_type: str, lookup: str) -> str:
        info = next((f for f in self._field_metadata(object_type) if f.name == lookup), None)
        if info is None or not info.reference_to:
            raise FatalError(
                f"{object_type}.{lookup} is not a lookup to another module, so {lookup}.<Field> cannot be "
                f"read; only {', '.join(sorted(EMBEDDED_LOOKUP_KEYS))} are available inside user lookups"
            )
        return info.reference_to[0]

    # --- writes -----------------------------------------------------------------------

    def _update_batch(self, object_type: str, updates: Sequence[RecordUpdate]) -> list[UpdateResult]:
        # `trigger` is always sent: left out, Zoho would run every workflow on our own write-back.
        body = {"data": [{**u.fields, "id": u.record_id} for u in updates], "trigger": list(self.trigger)}
        items = _record_results(self._send("PUT", object_type, json=body))
        if len(items) != len(updates):
            raise FatalError(
                f"Zoho answered {len(items)} results for {len(updates)} {object_type} updates; "
                "cannot map them back to records"
            )
        return [record_result(u.record_id, item) for u, item in zip(updates, items, strict=True)]

    # --- documents --------------------------------------------------------------------

    def attach_file(self, object_type: str, record_id: str, file: FileUpload, replaces: str | None) -> str:
        """Upload the file to the record's Attachments, then delete the one it replaces, so
        the record lists one file per document. Returns the new attachment's id."""
        path = f"{object_type}/{record_id}/Attachments"

        def upload() -> Any:
            files = {"file": (file.filename, file.content, file.content_type)}
            return self._checked(self._send("POST", path, files=files)).json()

        answer = self._call(upload, idempotent=False)
        items = answer.get("data") if isinstance(answer, dict) else None
        item = items[0] if isinstance(items, list) and items and isinstance(items[0], dict) else {}
        if str(item.get("status", "")).lower() != "success" or not (item.get("details") or {}).get("id"):
            code, message = item.get("code"), item.get("message") or str(answer)[:200]
            raise FatalError(f"Zoho did not attach {file.filename}: {message}", code=code)
        new_id = str(item["details"]["id"])
        if replaces is not None:
            with contextlib.suppress(NotFoundError):  # someone removed it already
                self._call(lambda: self._checked(self._send("DELETE", f"{path}/{replaces}")))
        return new_id

    # --- queries ----------------------------------------------------------------------

    def _query_page(
        self, object_type: str, fields: Sequence[str], filters: Mapping[str, Any], cursor: Any
    ) -> tuple[list[dict[str, Any]], Any]:
        wanted = dict(filters)
        since = wanted.pop("modified_since", None)
        plan = self._read_plan(object_type, fields)
        if wanted:
            records, cursor = self._search_page(object_type, plan, wanted, since, cursor or 1)
        else:
            records, cursor = self._list_page(object_type, plan, since, cursor)
        return self._shape(object_type, records, plan), cursor

    def _search_page(
        self, module: str, plan: ReadPlan, filters: Mapping[str, Any], since: datetime | None, page: int
    ) -> tuple[list[dict[str, Any]], int | None]:
        fields = list(dict.fromkeys([*plan.requested, *filters]))
        params = {
            "criteria": search_criteria(filters, since),
            "fields": ",".join(fields),
            "page": page,
            "per_page": SEARCH_PAGE_SIZE,
        }
        response = self._checked(self._send("GET", f"{module}/search", params=params))
        # With several conditions "equals" also matches e.g. "ABC Inc" for ABC: keep exact matches only.
        records = [r for r in _data(response) if _matches(r, filters)]
        return records, (page + 1 if _more_records(response) else None)

    def _list_page(
        self, module: str, plan: ReadPlan, since: datetime | None, page_token: str | None
    ) -> tuple[list[dict[str, Any]], str | None]:
        params: dict[str, Any] = {"fields": ",".join(plan.requested or ["id"]), "per_page": SEARCH_PAGE_SIZE}
        if page_token:
            params["page_token"] = page_token
        headers = {"If-Modified-Since": zoho_datetime(since)} if since is not None else {}
        response = self._checked(self._send("GET", module, params=params, headers=headers))
        if response.status_code == 304:  # nothing modified since
            return [], None
        token = _info(response).get("next_page_token") if _more_records(response) else None
        return _data(response), token

    def _users_page(self, cursor: Any) -> tuple[list[CRMUser], Any]:
        """GET /crm/{version}/users?type=AllUsers (active and deactivated), paged with page/per_page."""
        page = cursor or 1
        params = {"type": "AllUsers", "page": page, "per_page": USERS_PAGE_SIZE}
        body = _json_object(self._checked(self._send("GET", "users", params=params)))
        users = [zoho_user(u) for u in body.get("users") or [] if isinstance(u, dict) and u.get("id")]
        info = body.get("info")
        more = isinstance(info, dict) and bool(info.get("more_records"))
        return users, (page + 1 if more else None)

    def _queues(self) -> list[CRMQueue]:
        """User groups (GET settings/user_groups) and the users each one holds as sources (GET
        settings/user_groups/{id}/sources?type=users: `{"type": "users", "source": {"id",
        "name"}}`), both paged with page/per_page; HTTP 204 means none. Roles and territories
        added to a group as sources are not expanded (docs/crms/zoho.md)."""
        groups = self._pages("settings/user_groups", "user_groups", {})
        queues = []
        for group in groups:
            path = f"settings/user_groups/{quote(str(group['id']), safe='')}/sources"
            sources = self._pages(path, "sources", {"type": "users"}, has_id=False)
            members = tuple(
                str(item["source"]["id"])
                for item in sources
                if item.get("type") == "users"
                and isinstance(item.get("source"), dict)
                and item["source"].get("id")
            )
            queues.append(CRMQueue(str(group["id"]), str(group.get("name") or group["id"]), members))
        return queues

    def _pages(
        self, path: str, key: str, params: Mapping[str, str], *, has_id: bool = True
    ) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        page = 1
        while True:
            query = {**params, "page": page, "per_page": USERS_PAGE_SIZE}
            body = _json_object(self._checked(self._send("GET", path, params=query)))
            rows.extend(r for r in body.get(key) or [] if isinstance(r, dict) and (r.get("id") or not has_id))
            info = body.get("info")
            if not (isinstance(info, dict) and info.get("more_records")):
                return rows
            page += 1

    # --- metadata, loop prevention ----------------------------------------------------

    def describe(self, object_type: str) -> list[FieldInfo]:
        return self._call(lambda: self._field_metadata(object_type))

    def _field_metadata(self, object_type: str) -> list[FieldInfo]:
        """Fields metadata, fetched once per module (lookups need it to find their module)."""
        if object_type not in self._fields:
            params = {"module": object_type}
            body = _json_object(self._checked(self._send("GET", "settings/fields", params=params)))
            self._fields[object_type] = [
                field_info(f) for f in body.get("fields") or [] if isinstance(f, dict)
            ]
        return self._fields[object_type]

    # --- notification channels --------------------------------------------------------

    def watch(
        self, channel: NotificationChannel, expiry: datetime, *, enable: bool = False
    ) -> datetime | None:
        """Renew a notification channel (`PATCH /actions/watch`, which keeps whatever else the channel
        has, e.g. a notification_condition), or enable it (`POST`, for a channel Zoho no longer
        has). Returns the expiry Zoho confirmed (the earliest of its modules), None if it named none."""
        item: dict[str, Any] = {
            "channel_id": channel.channel_id,
            "events": list(channel.events),
            "channel_expiry": zoho_datetime(expiry),
            "token": channel.token,
            "notify_url": channel.notify_url,
        }
        if enable:
            item["return_affected_field_values"] = True  # the callbacks then carry the new values
        method = "POST" if enable else "PATCH"
        confirmed: datetime | None = self._call(
            lambda: watch_result(self._send(method, "actions/watch", json={"watch": [item]}))
        )
        return confirmed

    def is_own_change(self, event: RecordChangeEvent) -> bool | None:
        """Notifications never say who changed a record (origin None -> None). A workflow webhook
        that sends `modified_by` names the user; ours when it is one of API_USER_ID."""
        if event.origin is None or not self.own_user_ids:
            return None
        return event.origin.strip() in self.own_user_ids


# --- configuration --------------------------------------------------------------------


def data_center_urls(connection: ConnectionConfig) -> tuple[str, str]:
    center = (connection.get("DATA_CENTER") or "com").strip().lower().lstrip(".")
    try:
        return DATA_CENTERS[center]
    except KeyError:
        raise ConfigError(
            f"{connection.env_prefix}DATA_CENTER={center!r} is not a Zoho data centre; use one of "
            f"{', '.join(DATA_CENTERS)} (or set ACCOUNTS_URL and API_DOMAIN)"
        ) from None


def notification_channel(connection: ConnectionConfig, public_base_url: str) -> NotificationChannel | None:
    """The channel `ZOHO_NOTIFY_CHANNEL_ID` names, None when the connection keeps none alive."""
    channel_id = connection.get("NOTIFY_CHANNEL_ID")
    if channel_id is None:
        return None
    prefix = connection.env_prefix
    if not channel_id.isdigit():
        raise ConfigError(
            f"{prefix}NOTIFY_CHANNEL_ID={channel_id!r} must be a number (Zoho's channel ids are)"
        )
    events = connection.get_list("NOTIFY_EVENTS")
    wrong = [e for e in events if not WATCH_EVENT.match(e)]
    if not events or wrong:
        problem = f"has {', '.join(wrong)}" if wrong else "is not set"
        raise ConfigError(
            f"{prefix}NOTIFY_EVENTS {problem}: list the events the channel subscribes to as "
            "Module.operation, operation one of create, edit, delete, all "
            "(e.g. Deals.all,Accounts.edit)"
        )
    tokens = connection.get_list("NOTIFY_TOKEN")
    if not tokens:
        raise ConfigError(
            f"{prefix}NOTIFY_CHANNEL_ID needs {prefix}NOTIFY_TOKEN: the token Zoho echoes in every callback"
        )
    if len(tokens[0]) > NOTIFY_TOKEN_MAX_LENGTH:
        raise ConfigError(f"{prefix}NOTIFY_TOKEN: Zoho takes at most {NOTIFY_TOKEN_MAX_LENGTH} characters")
    default_url = f"{public_base_url.rstrip('/')}/webhooks/zoho/notify?connection={connection.name}"
    return NotificationChannel(
        connection=connection.name,
        channel_id=channel_id,
        events=events,
        notify_url=connection.get("NOTIFY_URL") or default_url,
        token=tokens[0],  # while rotating, list the new token first: a renewal switches Zoho to it
    )


def parse_trigger(connection: ConnectionConfig) -> tuple[str, ...]:
    """Automation our own write-back may start; empty (the default) starts none, so an update we
    make cannot set off a Zoho workflow that calls us again."""
    values = tuple(v.lower() for v in connection.get_list("TRIGGER"))
    unknown = [v for v in values if v not in TRIGGERS]
    if unknown:
        raise ConfigError(
            f"{connection.env_prefix}TRIGGER has {', '.join(unknown)}; allowed: {', '.join(TRIGGERS)} "
            "(comma-separated; leave empty to start no Zoho automation)"
        )
    return values


# --- response reading -----------------------------------------------------------------


def raise_for_zoho_status(response: requests.Response) -> None:
    """Zoho's codes on top of the shared status map: only an expired/invalid token is worth a
    refresh; other 401s (scope mismatch) are configuration errors; TOO_MANY_REQUESTS is a throttle."""
    if response.status_code < 400:
        return
    code, message = json_error_reader(response)
    if response.status_code == 401 and code not in EXPIRED_TOKEN_CODES:
        raise AuthError(message, code=code, status=401)
    if code in RATE_LIMIT_CODES and response.status_code != 429:
        raise RateLimitedError(message, code=code, status=response.status_code)
    raise_for_status(response, json_error_reader)


def _record_results(response: requests.Response) -> list[dict[str, Any]]:
    """The per-record `data` array, whatever the overall status (207/400 when some or all failed)."""
    status = response.status_code
    if status != 401 and status != 429 and status < 500:
        body = _json_object(response, required=False)
        data = body.get("data")
        if isinstance(data, list) and all(isinstance(item, dict) for item in data):
            return data
    raise_for_zoho_status(response)
    raise RetriableError(f"unexpected Zoho answer to an update: HTTP {status}", status=status)


def watch_result(response: requests.Response) -> datetime | None:
    """The answer to POST/PATCH /actions/watch: {"watch": [{"code": "SUCCESS", "details": {"events":
    [{"channel_expiry": ..., "resource_name": "Deals", "channel_id": ...}]}, ...}]}, or the same
    array with an error code (HTTP 400) naming what Zoho refused."""
    status = response.status_code
    items = None
    if status != 401 and status != 429 and status < 500:
        items = _json_object(response, required=False).get("watch")
    if not isinstance(items, list) or not items or not isinstance(items[0], dict):
        raise_for_zoho_status(response)
        raise RetriableError(f"unexpected Zoho answer to actions/watch: HTTP {status}", status=status)
    item: dict[str, Any] = items[0]
    details = item["details"] if isinstance(item.get("details"), dict) else {}
    if item.get("code") != "SUCCESS":
        named = details.get("api_name") or details.get("json_path")
        message = str(item.get("message") or "refused") + (f" ({named})" if named else "")
        raise FatalError(message, code=str(item.get("code") or "") or None, status=status)
    events = details["events"] if isinstance(details.get("events"), list) else []
    expiries = [
        parse_timestamp(e["channel_expiry"])
        for e in events
        if isinstance(e, dict) and e.get("channel_expiry")
    ]
    return min(expiries) if expiries else None


def record_result(record_id: str, item: Mapping[str, Any]) -> UpdateResult:
    code = str(item.get("code") or "")
    if code == "SUCCESS":
        return UpdateResult.success(record_id)
    details = item.get("details")
    details = details if isinstance(details, dict) else {}
    api_name = details.get("api_name")
    return UpdateResult(
        record_id=record_id,
        ok=False,
        error_code=code or None,
        message=str(item.get("message") or ""),
        fields=(str(api_name),) if api_name else (),
        retriable=code in RETRIABLE_RECORD_CODES,
    )


def zoho_user(user: Mapping[str, Any]) -> CRMUser:
    """A user of the Users API -> CRMUser; `Reporting_To` ({"name", "id"} or null) is the manager."""
    raw = user.get("Reporting_To")
    reporting_to: Mapping[str, Any] = raw if isinstance(raw, dict) else {}
    name = (
        user.get("full_name")
        or " ".join(str(user.get(k) or "").strip() for k in ("first_name", "last_name")).strip()
    )
    return CRMUser(
        id=str(user["id"]),
        name=str(name or user.get("email") or user["id"]),
        email=user.get("email") or None,
        locale=user.get("locale") or user.get("language") or None,
        manager_id=str(reporting_to["id"]) if reporting_to.get("id") else None,
        active=str(user.get("status") or "active").lower() == "active",
    )


def field_info(meta: Mapping[str, Any]) -> FieldInfo:
    lookup = meta.get("lookup")
    lookup = lookup if isinstance(lookup, dict) else {}
    module = lookup.get("module")
    target = module.get("api_name") if isinstance(module, dict) else module  # v2 sent a bare string
    operations = meta.get("operation_type")
    operations = operations if isinstance(operations, dict) else {}
    return FieldInfo(
        name=str(meta.get("api_name")),
        label=str(meta.get("field_label") or meta.get("display_label") or meta.get("api_name")),
        type=str(meta.get("data_type") or ""),
        updateable=not meta.get("read_only")
        and not meta.get("field_read_only")
        and operations.get("api_update", True) is not False,
        reference_to=(str(target),) if target else (),
        extra={k: meta[k] for k in ("json_type", "system_mandatory", "length") if k in meta},
    )


def _json_object(response: requests.Response, *, required: bool = True) -> dict[str, Any]:
    if response.status_code == 204 or not response.content:
        return {}
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        return body
    if required:
        raise RetriableError(
            f"Zoho answered HTTP {response.status_code} with a body that is not a JSON object"
        )
    return {}


def _data(response: requests.Response) -> list[dict[str, Any]]:
    data = _json_object(response).get("data")  # 204 No Content = nothing found
    return [r for r in data if isinstance(r, dict)] if isinstance(data, list) else []


def _info(response: requests.Response) -> dict[str, Any]:
    info = _json_object(response).get("info")
    return info if isinstance(info, dict) else {}


def _more_records(response: requests.Response) -> bool:
    return bool(_info(response).get("more_records"))


# --- search criteria ------------------------------------------------------------------


def search_criteria(filters: Mapping[str, Any], since: datetime | None = None) -> str:
    """`((Field:equals:value)and(...))`; parentheses and commas in values escaped with a backslash
    as the Search API requires (requests then URL-encodes the whole parameter)."""
    conditions = [f"({_check_api_name(k)}:equals:{escape_search_value(v)})" for k, v in filters.items()]
    if since is not None:
        conditions.append(f"(Modified_Time:greater_equal:{zoho_datetime(since)})")
    if len(conditions) > MAX_SEARCH_CRITERIA:
        raise FatalError(
            f"the Zoho Search API takes at most {MAX_SEARCH_CRITERIA} conditions, got {len(conditions)}"
        )
    return conditions[0] if len(conditions) == 1 else "(" + "and".join(conditions) + ")"


def escape_search_value(value: Any) -> str:
    if value is None or isinstance(value, dict | list):
        raise FatalError(f"cannot search Zoho for {value!r}: only text, numbers and booleans can be matched")
    text = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return re.sub(r"([(),])", r"\\\1", text)


def zoho_datetime(when: datetime) -> str:
    """ISO 8601 with a numeric offset (yyyy-MM-ddTHH:mm:ss±HH:mm), as Zoho expects."""
    aware = when if when.tzinfo is not None else when.replace(tzinfo=UTC)
    return aware.astimezone(UTC).replace(microsecond=0).isoformat()


def _matches(record: Mapping[str, Any], filters: Mapping[str, Any]) -> bool:
    return all(_same(record.get(name), wanted) for name, wanted in filters.items())


def _same(got: Any, wanted: Any) -> bool:
    if isinstance(got, dict):  # a lookup: compare its id or its name
        return str(wanted) in (str(got.get("id")), str(got.get("name")))
    if isinstance(wanted, bool) or isinstance(got, bool):
        return got is wanted or str(got).lower() == str(wanted).lower()
    return got == wanted or str(got) == str(wanted)


def _check_api_name(name: str) -> str:
    if not API_NAME.match(name or ""):
        raise FatalError(f"{name!r} is not a Zoho API name (letters, digits, _ and $ only)")
    return name
