"""HubSpot CRM adapter: CRM v3 objects API for reads, writes, search and properties, v4
associations for related fields. Formats, limits and set-up: docs/crms/hubspot.md.

Auth: a private-app token (`ACCESS_TOKEN`, never expires), or OAuth (`REFRESH_TOKEN` +
`CLIENT_ID` + `CLIENT_SECRET`) through the shared `connector.crm.auth.OAuthTokens`: the access
token is renewed before it expires and once more on a 401.

Related fields are dotted `<associated object type>.<property>`, e.g. `companies.credit_score`
on a deal: the value of the primary associated company (else the first HubSpot lists).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any, ClassVar
from urllib.parse import quote

import requests

from connector.clock import utcnow
from connector.config import ConfigError, ConnectionConfig, Settings
from connector.crm.auth import OAuthTokens, TokenAnswer, TokenEndpoint, TokenRefused
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
from connector.crm.errors import CRMError, FatalError, NotFoundError, RateLimitedError, parse_retry_after
from connector.crm.http import raise_for_status, send
from connector.crm.retry import RetryPolicy
from connector.events import RecordChangeEvent

API_BASE = "https://api.hubapi.com"
TOKEN_PATH = "/oauth/v1/token"
BATCH_LIMIT = 100  # batch read/update inputs per call
SEARCH_PAGE_SIZE = 100  # the search API allows up to 200
OWNERS_PAGE_SIZE = 100  # GET /crm/v3/owners takes limit up to 100
OK_OR_MULTI_STATUS = (200, 207)
DOCUMENTS_FOLDER = "/crm-approvals"  # file manager folder of approval sheets and documents
# HubSpot-defined association type ids, note -> record (docs: associations v4 type ids)
NOTE_ASSOCIATIONS = {"contacts": 202, "companies": 190, "deals": 214, "tickets": 228}
# Error categories of a per-record failure that may succeed on a later attempt.
RETRIABLE_CATEGORIES = frozenset({"RATE_LIMITS", "INTERNAL_ERROR", "TIMEOUT"})
# Contacts name their modification date differently from every other object.
LAST_MODIFIED = {"contacts": "lastmodifieddate"}
DEFAULT_LAST_MODIFIED = "hs_lastmodifieddate"
# Standard objects HubSpot associates with each other: the relations `describe` lists.
ASSOCIABLE_OBJECTS = ("contacts", "companies", "deals", "tickets")
OWN_CHANGE_SOURCE = "INTEGRATION"  # webhook changeSource of writes made with an app's token
MIXED_ORIGIN = "MIXED"  # intake: one delivery coalesced changes from several sources


@dataclass(frozen=True)
class HubSpotTokenEndpoint(TokenEndpoint):
    """`POST /oauth/v1/token` with the grant as a form body; the answer is
    {"access_token", "refresh_token", "expires_in": 1800, "token_type": "bearer"}."""

    url: str
    issuer: str = "HubSpot"
    hint: str = "authorize the app again and set the refresh token of the new install"

    def parse(self, response: requests.Response) -> TokenAnswer:
        if response.status_code == 429 or response.status_code >= 500:
            raise_for_status(response, read_hubspot_error)  # HubSpot's trouble, not ours: retriable
        token = json_or_empty(response)
        if response.status_code != 200 or not token.get("access_token"):
            code, message = read_hubspot_error(response)
            raise TokenRefused(code, message, response.status_code)
        expires_in = token.get("expires_in")
        return TokenAnswer(
            access_token=str(token["access_token"]),
            expires_in=float(expires_in) if expires_in is not None else None,
            refresh_token=str(token.get("refresh_token") or "") or None,
        )


class HubSpotAdapter(CRMAdapter):
    kind = "hubspot"
    batch_limit = BATCH_LIMIT
    last_modified_by_field: ClassVar[str | None] = "hs_updated_by_user_id"

    def __init__(
        self,
        connection: ConnectionConfig,
        *,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        session: requests.Session | None = None,
    ) -> None:
        super().__init__(connection, timeout=timeout, retry=retry)
        self.base_url = (connection.get("BASE_URL") or API_BASE).rstrip("/")
        self.app_id = connection.get("APP_ID")
        self.session = session or requests.Session()
        refresh_token = connection.get("REFRESH_TOKEN")
        self._private_app_token = None if refresh_token else connection.get("ACCESS_TOKEN")
        self.oauth_tokens = (
            OAuthTokens(
                HubSpotTokenEndpoint(self.base_url + TOKEN_PATH),
                connection,
                client_id=connection.require("CLIENT_ID"),
                client_secret=connection.require("CLIENT_SECRET"),
                refresh_token=refresh_token,
                access_token=connection.get("ACCESS_TOKEN"),  # optional first token; its expiry is unknown
                session=self.session,
                timeout=self.timeout,
            )
            if refresh_token
            else None
        )

    @classmethod
    def from_config(cls, connection: ConnectionConfig, settings: Settings) -> HubSpotAdapter:
        if connection.get("REFRESH_TOKEN"):
            connection.require("CLIENT_ID")
            connection.require("CLIENT_SECRET")
        elif not connection.get("ACCESS_TOKEN"):
            raise ConfigError(
                f"connection {connection.name!r} (hubspot) needs {connection.env_prefix}ACCESS_TOKEN "
                f"(a private-app token) or {connection.env_prefix}REFRESH_TOKEN with CLIENT_ID and "
                "CLIENT_SECRET (OAuth); set them in the environment or .env (see .env.example)"
            )
        return cls(connection, timeout=settings.http_timeout_seconds)

    @property
    def oauth(self) -> bool:
        return self.oauth_tokens is not None

    # --- reads --------------------------------------------------------------------------

    def _fetch(
        self, object_type: str, ids: Sequence[str], fields: Sequence[str]
    ) -> dict[str, dict[str, Any]]:
        plain, related = split_fields(fields)
        records = self._batch_read(object_type, ids, plain)
        self._add_related(object_type, records, related)
        return records

    def _batch_read(
        self, object_type: str, ids: Sequence[str], properties: Sequence[str]
    ) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for chunk in chunked(list(dict.fromkeys(ids)), BATCH_LIMIT):
            body = {
                "properties": list(properties),
                "propertiesWithHistory": [],
                "inputs": [{"id": record_id} for record_id in chunk],
            }
            # 207: some ids do not exist; they are simply absent from `results`.
            answer = self._request("POST", f"/crm/v3/objects/{object_type}/batch/read", body)
            for result in answer.get("results", []):
                found[str(result["id"])] = pick(result.get("properties") or {}, properties)
        return found

    def _add_related(
        self, object_type: str, records: dict[str, dict[str, Any]], related: Mapping[str, list[str]]
    ) -> None:
        for to_type, properties in related.items():
            links = self._primary_associations(object_type, to_type, list(records))
            values = self._batch_read(to_type, sorted(set(links.values())), properties)
            for record_id, record in records.items():
                target = values.get(links.get(record_id, ""), {})
                record.update({f"{to_type}.{name}": target.get(name) for name in properties})

    def _primary_associations(self, from_type: str, to_type: str, ids: Sequence[str]) -> dict[str, str]:
        """Record id -> the associated record's id (HubSpot's primary one where labelled)."""
        links: dict[str, str] = {}
        for chunk in chunked(list(ids), BATCH_LIMIT):
            body = {"inputs": [{"id": record_id} for record_id in chunk]}
            # 207 with errors for records that have no association: those stay unlinked.
            answer = self._request("POST", f"/crm/v4/associations/{from_type}/{to_type}/batch/read", body)
            for result in answer.get("results", []):
                target = primary_target(result.get("to") or [])
                if target is not None:
                    links[str(result["from"]["id"])] = target
        return links

    def _query_page(
        self, object_type: str, fields: Sequence[str], filters: Mapping[str, Any], cursor: Any
    ) -> tuple[list[dict[str, Any]], Any]:
        plain, related = split_fields(fields)
        body: dict[str, Any] = {"properties": plain, "limit": SEARCH_PAGE_SIZE}
        conditions = search_filters(object_type, filters)
        if conditions:  # all in one group: HubSpot ANDs the filters of a group
            body["filterGroups"] = [{"filters": conditions}]
        if cursor is not None:
            body["after"] = cursor
        answer = self._request("POST", f"/crm/v3/objects/{object_type}/search", body)
        records = {str(r["id"]): pick(r.get("properties") or {}, plain) for r in answer.get("results", [])}
        self._add_related(object_type, records, related)
        page = [{"id": record_id, **values} for record_id, values in records.items()]
        next_cursor = ((answer.get("paging") or {}).get("next") or {}).get("after")
        return page, next_cursor

    def _users_page(self, cursor: Any) -> tuple[list[CRMUser], Any]:
        """Owners (the ids records carry in hubspot_owner_id): the active ones, then the archived
        ones, each paged with `after`. The cursor is (archived, after)."""
        archived, after = cursor or (False, None)
        query = f"limit={OWNERS_PAGE_SIZE}&archived={'true' if archived else 'false'}"
        if after:
            query += f"&after={quote(str(after), safe='')}"
        answer = self._request("GET", f"/crm/v3/owners?{query}")
        users = [owner_user(owner, active=not archived) for owner in answer.get("results", [])]
        next_after = ((answer.get("paging") or {}).get("next") or {}).get("after")
        if next_after:
            return users, (archived, next_after)
        return users, (None if archived else (True, None))

    def _queues(self) -> list[CRMQueue]:
        """Teams (GET /settings/v3/users/teams): members are user ids, primary and secondary;
        the directory maps them to the owner ids records carry."""
        answer = self._request("GET", "/settings/v3/users/teams")
        return [
            CRMQueue(
                id=str(team["id"]),
                name=str(team.get("name") or team["id"]),
                members=tuple(
                    dict.fromkeys(
                        str(u) for u in [*(team.get("userIds") or []), *(team.get("secondaryUserIds") or [])]
                    )
                ),
            )
            for team in answer.get("results", [])
            if team.get("id") is not None
        ]

    def describe(self, object_type: str) -> list[FieldInfo]:
        """The object's properties, plus one entry per associable object type so that a related
        field such as `companies.credit_score` names a relation that validation can find."""
        answer = self._call(lambda: self._request("GET", f"/crm/v3/properties/{object_type}"))
        fields = [field_info(prop) for prop in answer.get("results", [])]
        return fields + [association_info(to) for to in ASSOCIABLE_OBJECTS if to != object_type]

    # --- writes -------------------------------------------------------------------------

    def _update_batch(self, object_type: str, updates: Sequence[RecordUpdate]) -> list[UpdateResult]:
        body = {
            "inputs": [
                {"id": u.record_id, "properties": {k: to_hubspot_value(v) for k, v in u.fields.items()}}
                for u in updates
            ]
        }
        try:
            answer = self._request("POST", f"/crm/v3/objects/{object_type}/batch/update", body)
        except FatalError as exc:
            if exc.status != 400:
                raise
            # HubSpot refused the whole batch (naming no record): every record carries the reason.
            return [failed(u.record_id, exc.code, exc.message, exc.fields) for u in updates]
        return batch_results(updates, answer)

    # --- echo detection -----------------------------------------------------------------

    def is_own_change(self, event: RecordChangeEvent) -> bool | None:
        """HubSpot reports writes made with an app's token as changeSource INTEGRATION with
        sourceId = that app's id; the intake stores them as origin `INTEGRATION:<sourceId>`."""
        source, _, source_id = (event.origin or "").partition(":")
        if not source:
            return None
        if source != OWN_CHANGE_SOURCE:
            return False  # a person, a workflow, an import, or a mix: not (only) our write
        if not self.app_id:
            return None  # some integration wrote it; without APP_ID we cannot tell which
        return source_id == self.app_id

    # --- auth ---------------------------------------------------------------------------

    def refresh_auth(self) -> bool:
        """OAuth mode: trade the refresh token for a new access token. Private-app tokens do not expire."""
        if self.oauth_tokens is None:
            return False
        self.oauth_tokens.renew()
        return True

    def _authorization(self) -> dict[str, str]:
        token = self.oauth_tokens.current().value if self.oauth_tokens else self._private_app_token
        return {"Authorization": f"Bearer {token}"}

    # --- documents ----------------------------------------------------------------------

    def attach_file(self, object_type: str, record_id: str, file: FileUpload, replaces: str | None) -> str:
        """A private file in the file manager, shown on the record by one note that carries it
        (hs_attachment_ids). A new version: upload it, point the same note at it, delete the
        old file. Returns `<note id>/<file id>`."""
        association = NOTE_ASSOCIATIONS.get(object_type.lower())
        if association is None:
            raise AttachmentsUnsupported(
                f"HubSpot notes cannot be associated with {object_type!r} here; "
                f"documents attach to {', '.join(sorted(NOTE_ASSOCIATIONS))}"
            )
        file_id = self._upload_file(file)
        body = f"{file.title}: {file.filename}"
        properties = {"hs_attachment_ids": file_id, "hs_note_body": body}
        if replaces is not None:
            note_id, _, old_file = replaces.partition("/")
            try:
                self._call(
                    lambda: self._request(
                        "PATCH", f"/crm/v3/objects/notes/{note_id}", {"properties": properties}
                    )
                )
            except NotFoundError:
                pass  # someone deleted the note: make a new one below
            else:
                if old_file:
                    self._call(lambda: self._request("DELETE", f"/files/v3/files/{old_file}"))
                return f"{note_id}/{file_id}"
        note = self._call(
            lambda: self._request(
                "POST",
                "/crm/v3/objects/notes",
                {
                    "properties": {**properties, "hs_timestamp": utcnow().isoformat()},
                    "associations": [
                        {
                            "to": {"id": record_id},
                            "types": [
                                {"associationCategory": "HUBSPOT_DEFINED", "associationTypeId": association}
                            ],
                        }
                    ],
                },
            ),
            idempotent=False,
        )
        return f"{note['id']}/{file_id}"

    def _upload_file(self, file: FileUpload) -> str:
        def upload() -> Any:
            response = send(
                self.session,
                "POST",
                self.base_url + "/files/v3/files",
                self.timeout,
                headers=self._authorization(),
                files={"file": (file.filename, file.content, file.content_type)},
                data={
                    "folderPath": DOCUMENTS_FOLDER,
                    "fileName": file.filename.removesuffix(".pdf"),
                    "options": json.dumps({"access": "PRIVATE", "overwrite": False}),
                },
            )
            if response.status_code == 429:
                raise rate_limited(response)
            raise_for_status(response, read_hubspot_error)
            return response.json()

        return str(self._call(upload, idempotent=False)["id"])

    # --- HTTP ---------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        """One API call; 200/207 answers are returned parsed, anything else raises our error."""
        kwargs: dict[str, Any] = {"headers": self._authorization()}
        if body is not None:
            kwargs["json"] = body
        response = send(self.session, method, self.base_url + path, self.timeout, **kwargs)
        if response.status_code in OK_OR_MULTI_STATUS:
            return response.json() if response.content else {}
        if response.status_code == 429:
            raise rate_limited(response)
        try:
            raise_for_status(response, read_hubspot_error)
        except CRMError as exc:
            exc.fields = blamed_fields(json_or_empty(response))
            raise
        return response.json() if response.content else {}  # other 2xx/3xx: whatever came back


# --- reading HubSpot's answers -------------------------------------------------------------


def read_hubspot_error(response: requests.Response) -> tuple[str | None, str]:
    """HubSpot error bodies: {status, message, correlationId, category[, policyName]}."""
    body = json_or_empty(response)
    if not body:
        return None, (response.text or response.reason or "")[:500]
    code = body.get("policyName") or body.get("category") or body.get("errorType") or body.get("status")
    return (str(code) if code else None), str(body.get("message") or body)[:2000]


def rate_limited(response: requests.Response) -> RateLimitedError:
    """429: honour Retry-After; else wait out the rolling window HubSpot names in its headers."""
    code, message = read_hubspot_error(response)
    wait = parse_retry_after(response.headers)
    if wait is None and code == "SECONDLY":
        wait = 1.0
    elif wait is None and code != "DAILY":  # the daily quota resets at midnight: back off instead
        interval = response.headers.get("X-HubSpot-RateLimit-Interval-Milliseconds")
        wait = float(interval) / 1000 if interval and interval.strip().isdigit() else None
    return RateLimitedError(message, code=code, status=429, retry_after=wait)


def batch_results(updates: Sequence[RecordUpdate], answer: Mapping[str, Any]) -> list[UpdateResult]:
    """One result per update, in order: 200 = all written; 207 = `errors` name their records
    in `context.id`/`context.ids`; an error naming none applies to every record not in `results`."""
    written = {str(r.get("id")) for r in answer.get("results", [])}
    blamed: dict[str, Mapping[str, Any]] = {}
    unattributed: Mapping[str, Any] | None = None
    for error in answer.get("errors", []):
        ids = error_record_ids(error)
        for record_id in ids:
            blamed.setdefault(record_id, error)
        if not ids and unattributed is None:
            unattributed = error
    results = []
    for update in updates:
        error = blamed.get(update.record_id)
        if error is None and update.record_id not in written:
            error = unattributed
        results.append(
            UpdateResult.success(update.record_id) if error is None else record_error(update, error)
        )
    return results


def record_error(update: RecordUpdate, error: Mapping[str, Any]) -> UpdateResult:
    category = str(error.get("category") or error.get("status") or "ERROR")
    status = str(error.get("status") or "")  # "error", or an HTTP status code as text
    retriable = category in RETRIABLE_CATEGORIES or (
        status.isdigit() and (status == "429" or int(status) >= 500)
    )
    message = str(error.get("message") or category)
    return failed(update.record_id, category, message, blamed_fields(error), retriable)


def failed(
    record_id: str, code: str | None, message: str, fields: tuple[str, ...], retriable: bool = False
) -> UpdateResult:
    return UpdateResult(
        record_id=record_id, ok=False, error_code=code, message=message, fields=fields, retriable=retriable
    )


def error_record_ids(error: Mapping[str, Any]) -> list[str]:
    context = error.get("context") or {}
    ids = list(context.get("id") or []) + list(context.get("ids") or [])
    if error.get("id") is not None:
        ids.append(error["id"])
    return [str(i) for i in ids]


def blamed_fields(error: Mapping[str, Any]) -> tuple[str, ...]:
    """Property names HubSpot blames: `errors[].context.propertyName`, `errors[].in`, and the
    `name`s in the JSON list embedded in 'Property values were not valid: [...]' messages."""
    names: list[str] = []
    for detail in error.get("errors") or []:
        names.extend((detail.get("context") or {}).get("propertyName") or [])
        if detail.get("in"):
            names.append(detail["in"])
    names.extend((error.get("context") or {}).get("propertyName") or [])
    names.extend(embedded_property_names(str(error.get("message") or "")))
    return tuple(dict.fromkeys(str(n) for n in names))


def embedded_property_names(message: str) -> list[str]:
    _, bracket, rest = message.partition("[")
    if not bracket:
        return []
    try:
        items = json.loads(bracket + rest)
    except ValueError:
        return []
    return [str(item["name"]) for item in items if isinstance(item, dict) and item.get("name")]


def primary_target(targets: Iterable[Mapping[str, Any]]) -> str | None:
    """The associated id labelled Primary, else the first one HubSpot lists."""
    targets = list(targets)
    for target in targets:
        labels = {str(t.get("label") or "").lower() for t in target.get("associationTypes") or []}
        if "primary" in labels:
            return str(target["toObjectId"])
    return str(targets[0]["toObjectId"]) if targets else None


def owner_user(owner: Mapping[str, Any], *, active: bool) -> CRMUser:
    """An owner of GET /crm/v3/owners -> CRMUser. Owners carry no locale and no manager; the
    user id (`userId`, what hs_updated_by_user_id holds) is kept as another id of the person."""
    name = " ".join(str(owner.get(k) or "").strip() for k in ("firstName", "lastName")).strip()
    user_ids = {owner.get("userId"), owner.get("userIdIncludingInactive")} - {None, ""}
    return CRMUser(
        id=str(owner["id"]),
        name=name or str(owner.get("email") or owner["id"]),
        email=owner.get("email") or None,
        active=active and not owner.get("archived", False),
        other_ids=tuple(sorted(str(u) for u in user_ids)),
    )


def field_info(prop: Mapping[str, Any]) -> FieldInfo:
    metadata = prop.get("modificationMetadata") or {}
    read_only = bool(metadata.get("readOnlyValue")) or bool(prop.get("calculated"))
    return FieldInfo(
        name=prop["name"],
        label=prop.get("label") or prop["name"],
        type=prop.get("type") or "string",
        updateable=not read_only,
        extra={
            "fieldType": prop.get("fieldType"),
            "options": [o.get("value") for o in prop.get("options") or []],
            "groupName": prop.get("groupName"),
        },
    )


def association_info(to_type: str) -> FieldInfo:
    return FieldInfo(
        name=to_type,
        label=f"Associated {to_type} (related fields: {to_type}.<property>)",
        type="association",
        updateable=False,
        reference_to=(to_type,),
        relationship_name=to_type,
    )


def json_or_empty(response: requests.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


# --- building requests ---------------------------------------------------------------------


def split_fields(fields: Sequence[str]) -> tuple[list[str], dict[str, list[str]]]:
    """['amount', 'companies.credit_score'] -> (['amount'], {'companies': ['credit_score']})."""
    plain: list[str] = []
    related: dict[str, list[str]] = {}
    for name in dict.fromkeys(fields):
        to_type, dot, prop = name.partition(".")
        if not dot:
            plain.append(name)
        elif not to_type or not prop or "." in prop:
            raise FatalError(
                f"{name!r}: a related HubSpot field is <associated object type>.<property>, one level deep "
                "(e.g. companies.credit_score)",
                code="UNSUPPORTED_FIELD",
            )
        else:
            related.setdefault(to_type, []).append(prop)
    return plain, related


def search_filters(object_type: str, filters: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Equality filters (EQ) plus `modified_since` as a GTE on the last-modified property."""
    result = []
    for name, value in filters.items():
        if name == "modified_since":
            prop = LAST_MODIFIED.get(object_type, DEFAULT_LAST_MODIFIED)
            result.append({"propertyName": prop, "operator": "GTE", "value": to_hubspot_value(value)})
        elif "." in name:
            raise FatalError(f"cannot search HubSpot {object_type} by the related field {name!r}")
        else:
            result.append({"propertyName": name, "operator": "EQ", "value": to_hubspot_value(value)})
    return result


def to_hubspot_value(value: Any) -> str:
    """HubSpot takes every property value as a string: booleans 'true'/'false', datetimes as
    epoch milliseconds, dates as YYYY-MM-DD, and '' clears a value."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        aware = value if value.tzinfo else value.replace(tzinfo=UTC)
        return str(int(aware.timestamp() * 1000))
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, list | tuple | set):
        return ";".join(to_hubspot_value(v) for v in value)  # multi-select checkboxes
    return str(value)


def pick(properties: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
    return {name: properties.get(name) for name in names}
