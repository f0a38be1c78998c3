"""Bitrix24 adapter over the REST API (apidocs.bitrix24.com); details in docs/crms/bitrix24.md.

Auth: an inbound webhook URL (its secret code is part of the path, so it never appears in
an error) or an app's OAuth tokens, renewed at oauth.bitrix.info through the shared
`connector.crm.auth.OAuthTokens` (before they expire, and on `expired_token`/`invalid_token`).
Reads: crm.deal.get / crm.company.get / crm.contact.get / crm.item.get (smart processes),
several ids in one `batch` call. Writes: crm.*.update commands, 50 per `batch` call with
halt=0, each command's result or error mapped back to its record.
"""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, ClassVar
from urllib.parse import urlencode, urlsplit

import requests

from connector.config import ConfigError, ConnectionConfig
from connector.crm.auth import OAuthTokens, TokenAnswer, TokenEndpoint, TokenRefused, mask
from connector.crm.base import (
    AttachmentsUnsupported,
    CRMAdapter,
    CRMQueue,
    CRMUser,
    FieldInfo,
    FileUpload,
    RecordUpdate,
    UpdateResult,
    chunked,
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
from connector.crm.http import raise_for_status, send
from connector.crm.retry import RetryPolicy
from connector.events import RecordChangeEvent, parse_timestamp

log = logging.getLogger(__name__)

BATCH_LIMIT = 50  # commands per `batch` call, and rows per list page
TOKEN_URL = "https://oauth.bitrix.info/oauth/token/"
DYNAMIC_PREFIX = (
    "dynamic_"  # smart process objects: dynamic_<entityTypeId>, as Bitrix names them DYNAMIC_<id>
)
# Documented system codes: the leaky-bucket limit (503) and the per-method operating limit (429).
RATE_LIMIT_CODES = frozenset({"QUERY_LIMIT_EXCEEDED", "OPERATION_TIME_LIMIT"})
TRANSIENT_CODES = RATE_LIMIT_CODES | {"INTERNAL_SERVER_ERROR", "ERROR_UNEXPECTED_ANSWER"}
# The access token is dead but the refresh token may still work: renew and repeat the call once.
EXPIRED_TOKEN_CODES = frozenset({"expired_token", "invalid_token"})
# A record changed after the event was sent says nothing about who made *this* change.
OWN_CHANGE_SLACK = timedelta(seconds=2)
WEBHOOK_PATH = re.compile(r"^/rest/(?P<user>\d+)/(?P<code>[^/]+)/?$")


# --- objects ---------------------------------------------------------------------


@dataclass(frozen=True)
class BitrixObject:
    """One object type: the classic crm.deal.* family, or crm.item.* for a smart process."""

    name: str  # deal, company, contact, dynamic_1032
    family: str  # crm.deal, crm.company, crm.contact, crm.item
    entity_type_id: int | None = None

    @property
    def is_item(self) -> bool:
        return self.entity_type_id is not None

    def method(self, action: str) -> str:
        return f"{self.family}.{action}"

    def params(self, **params: Any) -> dict[str, Any]:
        return {"entityTypeId": self.entity_type_id, **params} if self.is_item else params

    def update_params(self, update: RecordUpdate) -> dict[str, Any]:
        if self.is_item:
            return self.params(id=update.record_id, fields=dict(update.fields))
        # No live-feed post (and no notification to the responsible user) for our write-back.
        return {
            "id": update.record_id,
            "fields": dict(update.fields),
            "params": {"REGISTER_SONET_EVENT": "N"},
        }

    @property
    def id_field(self) -> str:
        return "id" if self.is_item else "ID"

    @property
    def modified_by_field(self) -> str:
        return "updatedBy" if self.is_item else "MODIFY_BY_ID"

    @property
    def modified_at_field(self) -> str:
        return "updatedTime" if self.is_item else "DATE_MODIFY"

    @property
    def lookups(self) -> dict[str, str]:
        """Lookup field -> related object, for dotted related fields such as COMPANY_ID.UF_CRM_X."""
        if self.is_item:
            return {"companyId": "company", "contactId": "contact"}
        return {"COMPANY_ID": "company", "CONTACT_ID": "contact"}

    def record(self, result: Any) -> dict[str, Any]:
        found = result.get("item") if self.is_item and isinstance(result, dict) else result
        if not isinstance(found, dict):
            raise FatalError(f"{self.method('get')}: unexpected result {str(result)[:200]}")
        return found

    def rows(self, result: Any) -> list[dict[str, Any]]:
        found = result.get("items") if self.is_item and isinstance(result, dict) else result
        return [row for row in found or [] if isinstance(row, dict)]

    def field_specs(self, result: Any) -> dict[str, Any]:
        found = result.get("fields") if self.is_item and isinstance(result, dict) else result
        return found if isinstance(found, dict) else {}


CLASSIC_FAMILIES = {"deal": "crm.deal", "company": "crm.company", "contact": "crm.contact"}
REFERENCE_TYPES = {"crm_company": "company", "crm_contact": "contact", "crm_deal": "deal"}


def bitrix_object(object_type: str) -> BitrixObject:
    name = object_type.strip().lower()
    if name in CLASSIC_FAMILIES:
        return BitrixObject(name, CLASSIC_FAMILIES[name])
    number = name.removeprefix(DYNAMIC_PREFIX)
    if name.startswith(DYNAMIC_PREFIX) and number.isdigit():
        return BitrixObject(name, "crm.item", int(number))
    raise FatalError(
        f"Bitrix24 object {object_type!r} is not supported; use deal, company, contact or "
        "dynamic_<entityTypeId> for a smart process"
    )


# --- request encoding --------------------------------------------------------------


def php_pairs(params: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """Nested parameters as PHP-style form pairs (fields[TITLE]=.., select[0]=ID), the way
    http_build_query spells them: for form bodies and for `batch` command strings."""
    pairs: list[tuple[str, str]] = []
    for key, value in params.items():
        name = f"{prefix}[{key}]" if prefix else str(key)
        if isinstance(value, Mapping):
            pairs.extend(php_pairs(value, name))
        elif isinstance(value, list | tuple):
            pairs.extend(php_pairs({str(i): v for i, v in enumerate(value)}, name) if value else [(name, "")])
        else:
            pairs.append((name, form_value(value)))
    return pairs


def form_value(value: Any) -> str:
    if value is None:
        return ""  # Bitrix clears a field given an empty value
    if isinstance(value, bool):
        return "Y" if value else "N"  # Bitrix booleans are Y/N
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return format(value, "f")
    return str(value)


def batch_command(method: str, params: Mapping[str, Any]) -> str:
    """`method?query`: URL-encoded once here, and once more as the cmd[...] form value."""
    return f"{method}?{urlencode(php_pairs(params))}"


# --- responses and errors ------------------------------------------------------------


def error_parts(error: Any) -> tuple[str | None, str]:
    """(code, message) of an `{error, error_description}` object; the code may be empty in
    Bitrix (e.g. `{"error": "", "error_description": "Not found"}`), which becomes None."""
    if not isinstance(error, Mapping):
        return None, str(error)[:500]
    code = str(error.get("error") or "") or None
    message = str(error.get("error_description") or "") or code or "unknown error"
    return code, message


def read_error(response: requests.Response) -> tuple[str | None, str]:
    try:
        body = response.json()
    except ValueError:
        return None, (response.text or response.reason or "")[:500]
    return error_parts(body)


def raise_for_bitrix(response: requests.Response) -> None:
    """Bitrix's own codes first (a dead access token and the limits), then the shared status map."""
    if response.status_code < 400:
        return
    code, message = read_error(response)
    status = response.status_code
    if code in EXPIRED_TOKEN_CODES:
        raise AuthExpiredError(message, code=code, status=status)
    if code in RATE_LIMIT_CODES:
        # No Retry-After is documented: the policy's backoff applies unless one is sent.
        raise RateLimitedError(
            message, code=code, status=status, retry_after=parse_retry_after(response.headers)
        )
    if status == 401:  # INVALID_CREDENTIALS, NO_AUTH_FOUND, insufficient_scope...: renewing cannot help
        raise AuthError(message, code=code, status=status)
    raise_for_status(response, read_error)


def command_error(code: str | None, message: str) -> CRMError:
    """The error for one failed `batch` command (those arrive with HTTP 200)."""
    if code in RATE_LIMIT_CODES:
        return RateLimitedError(message, code=code)
    if code in TRANSIENT_CODES:
        return RetriableError(message, code=code)
    return FatalError(message, code=code)


def is_not_found(code: str | None, message: str) -> bool:
    # crm.deal.get: {"error": "", "error_description": "Not found"}; crm.item.get: NOT_FOUND.
    return code in (None, "NOT_FOUND") and "not found" in message.lower()


def as_dict(value: Any) -> dict[str, Any]:
    """PHP sends an empty array as `[]` where it would otherwise send an object."""
    if isinstance(value, dict):
        return {str(k): v for k, v in value.items()}
    if isinstance(value, list):
        return {str(i): v for i, v in enumerate(value)}
    return {}


def link_id(value: Any) -> str | None:
    """A lookup field's value as an id; Bitrix uses 0 / "0" / "" / null for "no link"."""
    text = str(value).strip() if value is not None else ""
    return None if text in ("", "0") else text


def bitrix_datetime(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds")


# --- auth ------------------------------------------------------------------------------


@dataclass
class WebhookAuth:
    """Inbound webhook https://<portal>/rest/<user id>/<code>/: the code is the credential."""

    base_url: str = field(repr=False)
    user_id: str
    code: str = field(repr=False)

    def auth_pairs(self) -> list[tuple[str, str]]:
        return []

    def secrets(self) -> set[str]:
        return {self.code}


@dataclass(frozen=True)
class BitrixTokenEndpoint(TokenEndpoint):
    """The documented renewal: `GET https://oauth.bitrix.info/oauth/token/?grant_type=refresh_token
    &client_id=..&client_secret=..&refresh_token=..` (the credentials are in the URL, so OAuthTokens
    masks every error). The answer carries a new refresh token every time (they rotate, 180 days)
    and `expires_in: 3600`; a refusal is {"error": "invalid_grant" | "PAYMENT_REQUIRED" | ...}."""

    method: ClassVar[str] = "GET"
    url: str
    issuer: str
    hint: str = (
        "re-authorise the app for a new refresh token (they last 180 days and rotate on every renewal)"
    )

    def parse(self, response: requests.Response) -> TokenAnswer:
        if response.status_code >= 500 or response.status_code == 429:
            raise_for_status(response, read_error)
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code >= 400 or not isinstance(body, dict) or not body.get("access_token"):
            code, message = (
                error_parts(body) if isinstance(body, dict) else (None, "no access_token in the answer")
            )
            raise TokenRefused(code, message, response.status_code)
        expires_in = body.get("expires_in")
        return TokenAnswer(
            access_token=str(body["access_token"]),
            expires_in=float(expires_in) if expires_in is not None else None,
            refresh_token=str(body.get("refresh_token") or "") or None,
        )


@dataclass
class OAuthAuth:
    """A local or market app: an access token (1 hour) renewed with the refresh token."""

    domain: str
    tokens: OAuthTokens

    @property
    def base_url(self) -> str:
        return f"https://{self.domain}/rest/"

    def auth_pairs(self) -> list[tuple[str, str]]:
        return [("auth", self.tokens.current().value)]

    def secrets(self) -> set[str]:
        return set(self.tokens.secrets())


BitrixAuth = WebhookAuth | OAuthAuth


def auth_from_connection(
    connection: ConnectionConfig, session: requests.Session, timeout: float
) -> BitrixAuth:
    webhook_url = connection.get("WEBHOOK_URL")
    if webhook_url:
        return webhook_auth(connection, webhook_url)
    token_url = connection.get("TOKEN_URL", TOKEN_URL) or TOKEN_URL
    tokens = OAuthTokens(
        BitrixTokenEndpoint(url=token_url, issuer=f"the Bitrix24 authorization server {token_url}"),
        connection,
        client_id=connection.require("CLIENT_ID"),
        client_secret=connection.require("CLIENT_SECRET"),
        refresh_token=connection.require("REFRESH_TOKEN"),
        access_token=connection.get("ACCESS_TOKEN"),  # optional; its expiry is unknown
        session=session,
        timeout=timeout,
    )
    return OAuthAuth(domain=portal_host(connection.require("DOMAIN")), tokens=tokens)


def webhook_auth(connection: ConnectionConfig, url: str) -> WebhookAuth:
    parts = urlsplit(url.strip())
    match = WEBHOOK_PATH.match(parts.path)
    if parts.scheme != "https" or not parts.hostname or match is None:
        # Never echo the value: it carries the webhook's secret code.
        raise ConfigError(
            f"{connection.env_prefix}WEBHOOK_URL must look like https://<portal>/rest/<user id>/<code>/ "
            "(the value is not shown because it contains the secret); copy it from "
            "Applications > Developer resources > Inbound webhook"
        )
    base = f"https://{parts.netloc}/rest/{match['user']}/{match['code']}/"
    return WebhookAuth(base_url=base, user_id=match["user"], code=match["code"])


def portal_host(domain: str) -> str:
    text = domain.strip()
    return (urlsplit(text).hostname or text) if "://" in text else text.strip("/")


# --- the adapter ---------------------------------------------------------------------


class Bitrix24Adapter(CRMAdapter):
    kind: ClassVar[str] = "bitrix24"
    batch_limit: ClassVar[int] = BATCH_LIMIT

    def __init__(
        self, connection: ConnectionConfig, *, timeout: float = 30.0, retry: RetryPolicy | None = None
    ) -> None:
        super().__init__(connection, timeout=timeout, retry=retry)
        self.session = requests.Session()
        self.auth: BitrixAuth = auth_from_connection(connection, self.session, timeout)
        webhook_user = self.auth.user_id if isinstance(self.auth, WebhookAuth) else None
        # The Bitrix user our writes run as: the webhook's owner, or set for OAuth apps.
        self.api_user_id: str | None = (connection.get("API_USER_ID") or "").strip() or webhook_user
        self._departments: dict[str, tuple[str | None, str | None]] = {}

    # --- reads ---------------------------------------------------------------------

    def _fetch(
        self, object_type: str, ids: Sequence[str], fields: Sequence[str]
    ) -> dict[str, dict[str, Any]]:
        target = bitrix_object(object_type)
        related = related_fields(target, fields)
        records = self._get_many(target, [str(i) for i in ids])
        self._attach_related(target, records, related)
        return {record_id: pick(record, fields) for record_id, record in records.items()}

    def _get_many(self, target: BitrixObject, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """id -> record (all fields); missing records are left out."""
        if len(ids) == 1:
            return self._get_one(target, ids[0])
        commands = {f"g{i}": (target.method("get"), target.params(id=rid)) for i, rid in enumerate(ids)}
        done, failed = self._batch(commands)
        for error in failed.values():
            code, message = error_parts(error)
            if not is_not_found(code, message):
                raise self._masked(command_error(code, f"{target.method('get')}: {message}"))
        return {rid: target.record(done[f"g{i}"]) for i, rid in enumerate(ids) if f"g{i}" in done}

    def _get_one(self, target: BitrixObject, record_id: str) -> dict[str, dict[str, Any]]:
        try:
            body = self._call_method(target.method("get"), target.params(id=record_id))
        except FatalError as exc:
            if is_not_found(exc.code, exc.message):
                return {}
            raise
        return {record_id: target.record(body.get("result"))}

    def _attach_related(
        self,
        target: BitrixObject,
        records: dict[str, dict[str, Any]],
        related: dict[str, list[tuple[str, str]]],
    ) -> None:
        """Fill `LOOKUP.FIELD` values by reading the linked records, one batch per 50 links."""
        for lookup, wanted in related.items():
            other = bitrix_object(target.lookups[lookup])
            links = {rid: link_id(record.get(lookup)) for rid, record in records.items()}
            found: dict[str, dict[str, Any]] = {}
            for chunk in chunked(sorted({v for v in links.values() if v}), BATCH_LIMIT):
                found.update(self._get_many(other, chunk))
            for rid, record in records.items():
                linked = found.get(links[rid] or "", {})
                for dotted, remote in wanted:
                    record[dotted] = linked.get(remote)

    def _query_page(
        self, object_type: str, fields: Sequence[str], filters: Mapping[str, Any], cursor: Any
    ) -> tuple[list[dict[str, Any]], Any]:
        target = bitrix_object(object_type)
        related = related_fields(target, fields)
        body = self._call_method(target.method("list"), self._list_params(target, fields, filters, cursor))
        records = {str(row.get(target.id_field)): row for row in target.rows(body.get("result"))}
        self._attach_related(target, records, related)
        page = [{target.id_field: rid, **pick(row, fields)} for rid, row in records.items()]
        return page, body.get("next")

    def _list_params(
        self, target: BitrixObject, fields: Sequence[str], filters: Mapping[str, Any], cursor: Any
    ) -> dict[str, Any]:
        wanted = dict(filters)
        since = wanted.pop("modified_since", None)
        if since is not None:
            wanted[f">={target.modified_at_field}"] = bitrix_datetime(since)
        if fields:
            direct = [f.partition(".")[0] for f in fields]  # a dotted field needs its lookup field
            select = list(dict.fromkeys([target.id_field, *direct]))
        else:
            select = ["*"] if target.is_item else ["*", "UF_*"]
        order = {target.id_field: "ASC"}  # stable paging while records change
        return target.params(filter=wanted, select=select, order=order, start=cursor or 0)

    def describe(self, object_type: str) -> list[FieldInfo]:
        target = bitrix_object(object_type)
        body = self._call(lambda: self._call_method(target.method("fields"), target.params()))
        specs = target.field_specs(body.get("result"))
        return [field_info(target, name, spec) for name, spec in specs.items() if isinstance(spec, dict)]

    def _users_page(self, cursor: Any) -> tuple[list[CRMUser], Any]:
        """user.get, 50 a page with `start`. Bitrix24 has no manager field: a user's manager is
        the head (UF_HEAD) of their first department, or of the nearest parent department
        when they head it themselves (department.get, read with the first page)."""
        if cursor is None:
            self._departments = self._all_departments()
        body = self._call_method("user.get", {"sort": "ID", "order": "ASC", "start": cursor or 0})
        rows = [row for row in body.get("result") or [] if isinstance(row, dict) and row.get("ID")]
        users = [bitrix_user(row, self._departments) for row in rows]
        return users, body.get("next")

    def _queues(self) -> list[CRMQueue]:
        """Departments (department.get) as queues; members are the users whose UF_DEPARTMENT
        lists the department (user.get, paged with `start`)."""
        names: dict[str, str] = {}
        start: Any = 0
        while start is not None:
            body = self._call_method("department.get", {"sort": "ID", "order": "ASC", "start": start})
            for row in body.get("result") or []:
                if isinstance(row, dict) and row.get("ID"):
                    names[str(row["ID"])] = str(row.get("NAME") or row["ID"])
            start = body.get("next")
        members: dict[str, list[str]] = {dept: [] for dept in names}
        start = 0
        while start is not None:
            body = self._call_method("user.get", {"sort": "ID", "order": "ASC", "start": start})
            for row in body.get("result") or []:
                if isinstance(row, dict) and row.get("ID"):
                    for dept in row.get("UF_DEPARTMENT") or []:
                        members.setdefault(str(dept), []).append(str(row["ID"]))
            start = body.get("next")
        return [CRMQueue(id=dept, name=names[dept], members=tuple(members[dept])) for dept in names]

    def _all_departments(self) -> dict[str, tuple[str | None, str | None]]:
        """Department id -> (head user id, parent department id)."""
        departments: dict[str, tuple[str | None, str | None]] = {}
        start: Any = 0
        while start is not None:
            body = self._call_method("department.get", {"sort": "ID", "order": "ASC", "start": start})
            for row in body.get("result") or []:
                if isinstance(row, dict) and row.get("ID"):
                    departments[str(row["ID"])] = (link_id(row.get("UF_HEAD")), link_id(row.get("PARENT")))
            start = body.get("next")
        return departments

    # --- writes --------------------------------------------------------------------

    def _update_batch(self, object_type: str, updates: Sequence[RecordUpdate]) -> list[UpdateResult]:
        target = bitrix_object(object_type)
        refused = {
            i: related_write_refused(u) for i, u in enumerate(updates) if any("." in f for f in u.fields)
        }
        commands = {
            f"u{i}": (target.method("update"), target.update_params(u))
            for i, u in enumerate(updates)
            if i not in refused
        }
        done, failed = self._batch(commands) if commands else ({}, {})
        return [
            refused.get(i) or self._command_result(u, f"u{i}", done, failed) for i, u in enumerate(updates)
        ]

    def attach_file(self, object_type: str, record_id: str, file: FileUpload, replaces: str | None) -> str:
        """Into the record's "File" user field named by <NAME>_FILE_FIELD_<DOCUMENT> (e.g.
        `B24_FILE_FIELD_APPROVAL_SHEET=UF_CRM_1712345678`): uploading a new file into a
        single-file field replaces the old one. Returns the field's name."""
        variable = "FILE_FIELD_" + re.sub(r"[^A-Z0-9]+", "_", file.document.upper()).strip("_")
        field = self.connection.get(variable)
        if not field:
            raise AttachmentsUnsupported(
                f"Bitrix24 connection {self.connection.name!r} has no file field for document "
                f"{file.document!r}: create a single-file user field of type File on the {object_type} "
                f"and set {self.connection.env_prefix}{variable} to its code (e.g. UF_CRM_1712345678)"
            )
        target = bitrix_object(object_type)
        encoded = base64.b64encode(file.content).decode("ascii")
        update = RecordUpdate(record_id, {field: {"fileData": [file.filename, encoded]}})
        result = self._call(
            lambda: self._call_method(target.method("update"), target.update_params(update)), idempotent=False
        )
        if result.get("result") in (None, False):
            raise FatalError(f"{target.method('update')} did not store {file.filename}: {str(result)[:200]}")
        return field

    def _command_result(
        self, update: RecordUpdate, key: str, done: Mapping[str, Any], failed: Mapping[str, Any]
    ) -> UpdateResult:
        if key in failed:
            code, message = error_parts(failed[key])
            return UpdateResult(
                record_id=update.record_id,
                ok=False,
                error_code=code,
                message=self._mask(message),
                fields=tuple(name for name in update.fields if name in message),
                retriable=code in TRANSIENT_CODES,
            )
        if done.get(key) not in (None, False):
            return UpdateResult.success(update.record_id)
        return UpdateResult(
            record_id=update.record_id,
            ok=False,
            message="Bitrix24 returned neither a result nor an error for this command",
            retriable=True,
        )

    # --- echo prevention -----------------------------------------------------------

    def modified_by_field(self, object_type: str) -> str | None:
        """MODIFY_BY_ID on deals, leads, contacts, companies; updatedBy on smart-process items."""
        return bitrix_object(object_type).modified_by_field

    def is_own_change(self, event: RecordChangeEvent) -> bool | None:
        """Bitrix events carry no author, so read who last modified the record and when.

        True: the last change up to the event's send time was made by our API user;
        False: by someone else; None: we cannot tell (no API user known, the record is gone,
        or it changed again after the event was sent).
        """
        if self.api_user_id is None:
            return None
        try:
            target = bitrix_object(event.object_type)
            record = self.get_record(
                event.object_type, event.record_id, [target.modified_by_field, target.modified_at_field]
            )
        except CRMError as exc:
            log.warning(
                "bitrix24 %s: cannot read the last modifier of %s %s: %s",
                self.connection.name,
                event.object_type,
                event.record_id,
                exc,
            )
            return None
        if record is None:
            return None
        return own_change_verdict(
            record.get(target.modified_by_field),
            record.get(target.modified_at_field),
            event,
            self.api_user_id,
        )

    # --- auth ------------------------------------------------------------------------

    def refresh_auth(self) -> bool:
        """OAuth: renew both tokens (the refresh token rotates). Webhook URLs cannot expire."""
        if not isinstance(self.auth, OAuthAuth):
            return False
        self.auth.tokens.renew()
        return True

    # --- transport -------------------------------------------------------------------

    def _batch(
        self, commands: Mapping[str, tuple[str, Mapping[str, Any]]]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Up to 50 commands in one `batch` call (halt=0): results and errors by command key."""
        params = {"halt": 0, "cmd": {key: batch_command(m, p) for key, (m, p) in commands.items()}}
        outcome = self._call_method("batch", params).get("result")
        if not isinstance(outcome, dict):
            raise FatalError(f"batch: unexpected result {str(outcome)[:200]}")
        return as_dict(outcome.get("result")), as_dict(outcome.get("result_error"))

    def _call_method(self, method: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """One REST call as a form POST; returns the decoded body (result, next, total, time)."""
        try:
            data = php_pairs(params) + self.auth.auth_pairs()  # OAuth: renews a missing or expiring token
            response = send(self.session, "POST", self.auth.base_url + method, self.timeout, data=data)
            raise_for_bitrix(response)
            return decoded_body(response, method)
        except CRMError as exc:
            raise self._masked(exc) from None

    def _mask(self, text: str) -> str:
        return mask(text, self.auth.secrets())

    def _masked(self, exc: CRMError) -> CRMError:
        """The same error with every secret replaced; the caller drops the chained cause
        (a requests error whose text holds the full URL)."""
        exc.message = self._mask(exc.message)
        exc.args = (exc.message,)
        exc.__context__ = None
        return exc


# --- helpers ---------------------------------------------------------------------------


def related_fields(target: BitrixObject, fields: Iterable[str]) -> dict[str, list[tuple[str, str]]]:
    """`COMPANY_ID.UF_CRM_X` -> {"COMPANY_ID": [("COMPANY_ID.UF_CRM_X", "UF_CRM_X")]}."""
    related: dict[str, list[tuple[str, str]]] = {}
    for name in fields:
        lookup, dot, remote = name.partition(".")
        if not dot:
            continue
        if lookup not in target.lookups or not remote or "." in remote:
            known = ", ".join(f"{k}.<field>" for k in target.lookups)
            raise FatalError(f"{target.name}: related field {name!r} is not supported; use {known}")
        related.setdefault(lookup, []).append((name, remote))
    return related


def pick(record: Mapping[str, Any], fields: Sequence[str]) -> dict[str, Any]:
    return {name: record.get(name) for name in fields} if fields else dict(record)


def related_write_refused(update: RecordUpdate) -> UpdateResult:
    dotted = tuple(name for name in update.fields if "." in name)
    return UpdateResult(
        record_id=update.record_id,
        ok=False,
        error_code="related_field_not_writable",
        message=f"related fields cannot be written through this record: {', '.join(dotted)}",
        fields=dotted,
    )


def field_info(target: BitrixObject, name: str, spec: Mapping[str, Any]) -> FieldInfo:
    field_type = str(spec.get("type") or "")
    related = REFERENCE_TYPES.get(field_type)
    is_lookup = related is not None and name in target.lookups
    label = spec.get("formLabel") or spec.get("listLabel") or spec.get("title") or name
    extra_keys = ("isRequired", "isMultiple", "isImmutable", "statusType", "items")
    return FieldInfo(
        name=name,
        label=str(label),
        type=field_type,
        updateable=not spec.get("isReadOnly", False),
        reference_to=(related,) if related else (),
        relationship_name=name if is_lookup else None,  # dotted reads use the lookup field itself
        extra={key: spec[key] for key in extra_keys if key in spec},
    )


def bitrix_user(row: Mapping[str, Any], departments: Mapping[str, tuple[str | None, str | None]]) -> CRMUser:
    """A user.get row -> CRMUser. Bitrix24 users carry no language: the locale stays unknown."""
    user_id = str(row["ID"])
    name = " ".join(str(row.get(k) or "").strip() for k in ("NAME", "LAST_NAME")).strip()
    active = row.get("ACTIVE", True)
    return CRMUser(
        id=user_id,
        name=name or str(row.get("EMAIL") or user_id),
        email=row.get("EMAIL") or None,
        manager_id=department_head(user_id, row.get("UF_DEPARTMENT") or [], departments),
        active=active is True or str(active).upper() in ("Y", "TRUE", "1"),
    )


def department_head(
    user_id: str, department_ids: Iterable[Any], departments: Mapping[str, tuple[str | None, str | None]]
) -> str | None:
    """The head of the user's first department, walking up past departments the user heads."""
    for first in department_ids:
        current: str | None = str(first)
        seen: set[str] = set()
        while current is not None and current in departments and current not in seen:
            seen.add(current)
            head, parent = departments[current]
            if head is not None and head != user_id:
                return head
            current = parent
        return None
    return None


def own_change_verdict(
    modified_by: Any, modified_at: Any, event: RecordChangeEvent, api_user_id: str
) -> bool | None:
    try:
        changed_at = parse_timestamp(modified_at)
    except ValueError:
        return None
    if changed_at > event.occurred_at + OWN_CHANGE_SLACK:
        return None
    return link_id(modified_by) == api_user_id


def decoded_body(response: requests.Response, method: str) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        raise RetriableError(f"{method}: the response is not JSON (HTTP {response.status_code})") from None
    if not isinstance(body, dict):
        raise FatalError(f"{method}: unexpected response {str(body)[:200]}")
    if "error" in body and "result" not in body:
        code, message = error_parts(body)
        raise command_error(code, message)
    return body
