"""The one small interface every CRM adapter implements.

Modelled on huey's storage backends: the base class owns what is the same for every
CRM (chunking to the CRM's batch limit, the retry policy); a CRM module implements the
few primitive calls. The contract suite in tests/contract/ runs against every adapter.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar

from connector.config import ConnectionConfig, Settings
from connector.crm.errors import AuthError, AuthExpiredError, FatalError
from connector.crm.retry import RetryPolicy
from connector.events import RecordChangeEvent
from connector.metrics import timed_crm_call

if TYPE_CHECKING:
    from connector.crm.rate_limits import RateLimiter


@dataclass(frozen=True)
class RecordUpdate:
    record_id: str
    fields: Mapping[str, Any]  # CRM API name -> value


@dataclass(frozen=True)
class UpdateResult:
    record_id: str
    ok: bool
    error_code: str | None = None
    message: str | None = None  # the CRM's own words
    fields: tuple[str, ...] = ()  # fields the CRM blamed
    retriable: bool = False  # e.g. a row lock: try this record again later

    @classmethod
    def success(cls, record_id: str) -> UpdateResult:
        return cls(record_id=record_id, ok=True)


@dataclass(frozen=True)
class ApiUsage:
    """The API requests a CRM reports as used against its daily limit (e.g. Sforce-Limit-Info)."""

    used: int
    limit: int

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used)


@dataclass(frozen=True)
class CRMUser:
    """One person of the CRM's user list (connector.directory caches these)."""

    id: str  # the id records and mapping files use for this person (Salesforce 18-char, HubSpot owner id)
    name: str
    email: str | None = None
    locale: str | None = None  # as the CRM spells it: en_US, zh_CN, pl, pl-PL
    manager_id: str | None = None
    active: bool = True
    other_ids: tuple[str, ...] = ()  # other ids the CRM uses for the same person (HubSpot userId)


@dataclass(frozen=True)
class CRMQueue:
    """A set of people the CRM groups work for (Salesforce Queue/Group, HubSpot team, Zoho
    group, Bitrix24 department): approvers `{queue: ...}` in mapping files (by id or name)."""

    id: str
    name: str
    members: tuple[str, ...]  # user ids, in the form records and mapping files use


@dataclass(frozen=True)
class FieldInfo:
    name: str  # API name
    label: str
    type: str  # the CRM's own type name
    updateable: bool = True
    reference_to: tuple[str, ...] = ()  # for lookups: the related objects
    relationship_name: str | None = None  # e.g. Account for AccountId
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class QueryPage:
    records: list[dict[str, Any]]
    cursor: Any  # what fetched this page (None = the first); every adapter's cursor is JSON
    next_cursor: Any  # None on the last page


@dataclass(frozen=True)
class DuplicateRecord:
    """Another record holding a value that must be unique (`kind: duplicate` steps)."""

    record_id: str
    name: str | None  # what people call it, where the CRM's query returned a name


# Fields naming a record, asked for with a duplicate query so the message can name the other one.
NAME_FIELDS: dict[str, tuple[str, ...]] = {
    "salesforce": ("Name",),
    "hubspot": (),
    "zoho": (),
    "bitrix24": ("TITLE", "title"),  # classic objects, smart-process items
    "sandbox": ("name",),
}


def query_record_id(record: Mapping[str, Any]) -> str:
    """The id of a record `query` returned: every adapter puts it under "id" in its CRM's own
    letter case (id, Salesforce Id, Bitrix24 ID)."""
    for key, value in record.items():
        if key.lower() == "id" and value not in (None, ""):
            return str(value)
    raise KeyError(f"a queried record carries no id: {sorted(record)}")


@dataclass(frozen=True)
class FileUpload:
    """A document to attach to a record (connector/documents/)."""

    filename: str  # e.g. "approval-sheet v3.pdf"
    title: str  # what people see in the CRM, e.g. "Approval sheet"
    content: bytes
    content_type: str = "application/pdf"
    document: str = ""  # the document's name in the mapping file, e.g. approval-sheet


class AttachmentsUnsupported(FatalError):
    """This CRM connection cannot hold files for the record (or is not configured to)."""


class CRMAdapter(ABC):
    """Reads and writes records of one CRM connection."""

    kind: ClassVar[str]
    batch_limit: ClassVar[int]  # most records one update call may carry
    # The connection's shared rate limits (connector/crm/rate_limits.py); the Runtime attaches it.
    rate_limiter: RateLimiter | None = None
    # The record field naming the user who changed it last (LastModifiedById, Modified_By...);
    # None where the CRM keeps none. Read when a delivery does not say who made the change.
    last_modified_by_field: ClassVar[str | None] = None

    def __init__(
        self, connection: ConnectionConfig, *, timeout: float = 30.0, retry: RetryPolicy | None = None
    ):
        self.connection = connection
        self.timeout = timeout
        self.retry = retry or RetryPolicy()

    @classmethod
    def from_config(cls, connection: ConnectionConfig, settings: Settings) -> CRMAdapter:
        """Build from the connection's `NAME_*` variables; raises ConfigError naming what is missing."""
        return cls(connection, timeout=settings.http_timeout_seconds)

    # --- what every CRM module implements -------------------------------------------

    @abstractmethod
    def _fetch(
        self, object_type: str, ids: Sequence[str], fields: Sequence[str]
    ) -> dict[str, dict[str, Any]]:
        """One read call: record id -> {API name (dotted for related fields) -> value}.
        Missing records are simply absent."""

    @abstractmethod
    def _update_batch(self, object_type: str, updates: Sequence[RecordUpdate]) -> list[UpdateResult]:
        """One write call of at most `batch_limit` records, one result per record, in order."""

    @abstractmethod
    def _query_page(
        self, object_type: str, fields: Sequence[str], filters: Mapping[str, Any], cursor: Any
    ) -> tuple[list[dict[str, Any]], Any]:
        """One page of records matching equality `filters`; returns (records, next cursor or None).
        The special filter key `modified_since` takes an aware datetime."""

    @abstractmethod
    def describe(self, object_type: str) -> list[FieldInfo]:
        """The object's fields, to validate mapping files against."""

    @abstractmethod
    def _users_page(self, cursor: Any) -> tuple[list[CRMUser], Any]:
        """One page of the CRM's users; returns (users, next cursor or None)."""

    def _queues(self) -> list[CRMQueue]:
        """Every queue/group/team/department with its members (one call or several: the
        adapter's own paging); read with the directory."""
        return []

    def is_own_change(self, event: RecordChangeEvent) -> bool | None:
        """Whether the CRM marks this change as made by our own write-back (e.g. Salesforce
        changeOrigin naming our client id, HubSpot changeSource). None = the CRM cannot tell,
        and the pipeline compares values with what the outbox wrote instead."""
        return None

    def modified_by_field(self, object_type: str) -> str | None:
        """The API name of `object_type`'s last-modified-by field (see last_modified_by_field)."""
        return self.last_modified_by_field

    def modified_by(self, object_type: str, values: Mapping[str, Any]) -> str | None:
        """The user id in a record's last-modified-by field as read by `get_record`: a plain id,
        or a lookup object with an `id` (Zoho's Modified_By); None when absent."""
        name = self.modified_by_field(object_type)
        if name is None:
            return None
        raw = next((v for k, v in values.items() if k.lower() == name.lower()), None)
        if isinstance(raw, Mapping):
            raw = raw.get("id")
        if isinstance(raw, bool) or not isinstance(raw, str | int) or not str(raw).strip():
            return None
        return str(raw).strip()

    def refresh_auth(self) -> bool:
        """Renew the session after a 401. Returns False where the auth mode cannot."""
        return False

    def attach_file(self, object_type: str, record_id: str, file: FileUpload, replaces: str | None) -> str:
        """Put `file` on the record as the new version of `replaces` (the reference this method
        returned for the previous version; None for the first), so one file per document
        stays on the record. Returns the reference of what the CRM now holds."""
        raise AttachmentsUnsupported(f"{self.kind} connections cannot attach files to records yet")

    @property
    def api_usage(self) -> ApiUsage | None:
        """API quota use as of the CRM's last response, for the sweep log; None where the CRM
        reports none (or before the first call)."""
        return None

    # --- shared behaviour -------------------------------------------------------------

    def get_records(
        self, object_type: str, ids: Sequence[str], fields: Sequence[str]
    ) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for chunk in chunked(list(dict.fromkeys(ids)), self.read_batch_limit):
            found.update(self._call(lambda c=chunk: self._fetch(object_type, c, fields)))
        return found

    def get_record(self, object_type: str, record_id: str, fields: Sequence[str]) -> dict[str, Any] | None:
        return self.get_records(object_type, [record_id], fields).get(record_id)

    def update_records(self, object_type: str, updates: Sequence[RecordUpdate]) -> list[UpdateResult]:
        """Write all updates in calls of at most `batch_limit`; one result per update, in order."""
        results: list[UpdateResult] = []
        for chunk in chunked(list(updates), self.batch_limit):
            results.extend(self._call(lambda c=chunk: self._update_batch(object_type, c), idempotent=False))
        return results

    def query(
        self,
        object_type: str,
        fields: Sequence[str],
        filters: Mapping[str, Any] | None = None,
        modified_since: datetime | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Every matching record, page by page (for backfill and reconcile)."""
        for page in self.query_pages(object_type, fields, filters, modified_since):
            yield from page.records

    def query_pages(
        self,
        object_type: str,
        fields: Sequence[str],
        filters: Mapping[str, Any] | None = None,
        modified_since: datetime | None = None,
        cursor: Any = None,
    ) -> Iterator[QueryPage]:
        """The matching records one page at a time, starting at `cursor` (a `next_cursor` an
        earlier page returned; None = the first page), so that a job can store where it is."""
        wanted = dict(filters or {})
        if modified_since is not None:
            wanted["modified_since"] = modified_since
        while True:
            records, next_cursor = self._call(
                lambda c=cursor: self._query_page(object_type, fields, wanted, c)
            )
            yield QueryPage(records, cursor, next_cursor)
            if next_cursor is None:
                return
            cursor = next_cursor

    def find_duplicates(
        self, object_type: str, field: str, value: Any, *, exclude_id: str, limit: int = 5
    ) -> list[DuplicateRecord]:
        """Other records of `object_type` whose `field` (API name) equals `value` (issue 12).

        Runs through each CRM's own equality query (`_query_page`: SOQL built with
        format_soql, HubSpot's search API, Zoho's search, Bitrix24's list filter, the
        sandbox's filter), so every adapter answers in its CRM's terms."""
        found: list[DuplicateRecord] = []
        for record in self.query(object_type, [field, *NAME_FIELDS.get(self.kind, ())], {field: value}):
            record_id = query_record_id(record)
            if record_id == str(exclude_id):
                continue
            names = [record.get(n) for n in NAME_FIELDS.get(self.kind, ()) if record.get(n)]
            found.append(DuplicateRecord(record_id, str(names[0]) if names else None))
            if len(found) >= limit:
                break
        return found

    def list_users(self) -> Iterator[CRMUser]:
        """Every user of the CRM, active or not where the CRM lists both, page by page."""
        cursor: Any = None
        while True:
            page, cursor = self._call(lambda c=cursor: self._users_page(c))
            yield from page
            if cursor is None:
                return

    def list_queues(self) -> list[CRMQueue]:
        """The CRM's queues of approvers with their members (connector.directory caches them)."""
        return list(self._call(self._queues))

    @property
    def read_batch_limit(self) -> int:
        return self.batch_limit

    def _observe_usage(self) -> None:
        usage = self.api_usage
        if self.rate_limiter is not None and usage is not None:
            self.rate_limiter.observe_daily_usage(usage.used, usage.limit)

    def _call(self, fn: Any, *, idempotent: bool = True) -> Any:
        """Run one CRM call with the retry policy; on an expired session refresh once first.
        A write (`idempotent=False`) that times out is raised as InDoubtError, not repeated."""

        name = self.connection.name

        def attempt() -> Any:
            if self.rate_limiter is not None:
                self.rate_limiter.acquire()  # waits while the connection's shared budget is spent
            try:
                result = timed_crm_call(name, fn)
                self._observe_usage()
                return result
            except AuthExpiredError as exc:
                if not self.refresh_auth():
                    raise AuthError(
                        f"{self.kind} connection {name!r}: the session expired and this auth "
                        f"mode cannot renew it ({exc}); configure credentials that can log in again"
                    ) from exc
                return timed_crm_call(name, fn)

        return self.retry.call(attempt, crm=name, idempotent=idempotent)


def chunked(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
