"""What each CRM supplies to the one contract suite (tests/contract/test_*_contract.py).

A harness knows its CRM's documented wire formats and mocks them with `responses`; the
suite itself is the same for every CRM. Add a CRM: write `tests/contract/harness_<kind>.py`
defining ADAPTER_HARNESS (an `AdapterHarness`) and INTAKE_HARNESS (an `IntakeHarness`);
`discover.py` finds every `harness_*.py` by its name, so nothing else lists them.
docs/crms/adding-a-crm.md walks through the whole of a new CRM.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import responses

from connector.config import ConnectionConfig, Settings, parse_connections
from connector.crm.base import CRMAdapter, CRMQueue
from connector.crm.registry import adapter_class
from connector.crm.retry import RetryPolicy


@dataclass
class CallLog:
    """What the mocked update endpoint saw: one entry per call, the record ids it carried."""

    calls: list[list[str]] = field(default_factory=list)


@dataclass
class FilesOnRecord:
    """What the mocked CRM shows on the record after the calls: file reference -> content of
    its latest version (computed from the mock's state each time it is read)."""

    view: Any

    @property
    def files(self) -> dict[str, bytes]:
        return dict(self.view())


def multipart_file(request: Any, field_name: str = "file") -> tuple[str, bytes]:
    """(filename, content) of one part of a multipart/form-data request, as the CRM reads it."""
    from email.parser import BytesParser
    from email.policy import HTTP

    head = f"Content-Type: {request.headers['Content-Type']}\r\n\r\n".encode()
    message = BytesParser(policy=HTTP).parsebytes(head + request.body)
    for part in message.iter_parts():
        if part.get_param("name", header="content-disposition") == field_name:
            return str(part.get_filename()), bytes(part.get_payload(decode=True))
    raise AssertionError(f"no multipart part named {field_name!r}")


def multipart_value(request: Any, field_name: str) -> str | None:
    from email.parser import BytesParser
    from email.policy import HTTP

    head = f"Content-Type: {request.headers['Content-Type']}\r\n\r\n".encode()
    message = BytesParser(policy=HTTP).parsebytes(head + request.body)
    for part in message.iter_parts():
        if part.get_param("name", header="content-disposition") == field_name:
            return str(part.get_content())
    return None


class AdapterHarness(ABC):
    kind: str
    object_type: str  # an object the adapter writes, as the CRM names it
    batch_limit: int  # the CRM's documented maximum per update call
    fatal_code: str  # the CRM's own error code our fatal per-record failure carries
    env: Mapping[str, str]  # CRM_CONNECTIONS and the connection's variables
    # False where the CRM's documented rate-limit answer carries no Retry-After (Bitrix24):
    # the contract then expects the policy's own backoff instead of the hinted wait.
    sends_retry_after: bool = True
    # The CRM's documented maximum of records one read call may fetch (Salesforce: ids in a
    # SOQL IN list; HubSpot batch read; Zoho by ids; Bitrix24 commands in one `batch`).
    read_batch_limit: int = 100

    def is_read_call(self, request: Any) -> bool:
        """Whether a call the read test saw fetched records (not a login or metadata call)."""
        url = str(request.url or "")
        return not any(part in url for part in ("oauth", "token", "login", "/Soap/", "/settings/"))

    # The record's last-modified-by field as the CRM's read API returns it, and the user id the
    # adapter must make of it; None where the CRM keeps no such field (the sandbox).
    modified_by_sample: tuple[Any, str] | None = None

    def connection(self) -> ConnectionConfig:
        return next(iter(parse_connections(dict(self.env)).values()))

    def make_adapter(self, retry: RetryPolicy) -> CRMAdapter:
        settings = Settings(connections=parse_connections(dict(self.env)), http_timeout_seconds=5)
        adapter = adapter_class(self.kind).from_config(self.connection(), settings)  # type: ignore[attr-defined]
        adapter.retry = retry
        return adapter  # type: ignore[no-any-return]

    def record_ids(self, count: int) -> list[str]:
        """Ids in the CRM's own shape (Salesforce: 18-char ids)."""
        return [str(1000 + i) for i in range(count)]

    @abstractmethod
    def mock_updates(self, rsps: responses.RequestsMock, fail: Mapping[str, str] | None = None) -> CallLog:
        """Register the batch-update endpoint, answering in the CRM's documented format.
        `fail` maps record id -> "fatal" (a validation error with `fatal_code`) or
        "retriable" (e.g. a row lock) for a per-record failure; the others succeed."""

    @abstractmethod
    def mock_throttled_then_ok(self, rsps: responses.RequestsMock, retry_after: int) -> CallLog:
        """The first update call gets the CRM's rate-limit answer (with Retry-After where the CRM
        sends one); later ones succeed."""

    @abstractmethod
    def mock_server_error_then_ok(self, rsps: responses.RequestsMock) -> CallLog:
        """The first update call gets a 5xx (or the CRM's own transient error); later ones succeed."""

    @abstractmethod
    def mock_auth_expired_then_ok(self, rsps: responses.RequestsMock) -> CallLog:
        """The first update call says the token/session expired; the adapter must re-authenticate
        (the harness mocks the CRM's token endpoint) and the retry succeeds. Where the CRM's
        auth mode cannot expire (e.g. a static webhook URL), raise pytest.skip with the reason."""

    @abstractmethod
    def mock_records(self, rsps: responses.RequestsMock, records: Mapping[str, Mapping[str, Any]]) -> None:
        """Register the read endpoint(s) answering with these records (id -> API field -> value)."""

    def read_fields(self) -> list[str]:
        """Fields the read test asks for, including a related one where the CRM has them."""
        return sorted({name for values in self.sample_records().values() for name in values})

    @abstractmethod
    def mock_files(self, rsps: responses.RequestsMock, record_id: str) -> FilesOnRecord:
        """Register the CRM's documented file endpoints for documents on `record_id` (upload,
        new version or replacement, link to the record) as a small stateful fake."""

    @abstractmethod
    def sample_records(self) -> dict[str, dict[str, Any]]:
        """Two or three records as get_records must return them (id -> API field -> value)."""

    @abstractmethod
    def sample_queues(self) -> list[CRMQueue]:
        """Queues as list_queues must return them, ids in the CRM's shape: at least two, one
        with several members and one with none."""

    @abstractmethod
    def mock_queues(self, rsps: responses.RequestsMock, queues: Sequence[CRMQueue]) -> None:
        """Register the CRM's queue/group/team/department endpoints answering, in its documented
        format, with these queues and their members."""

    unique_field: str = "name"  # a field of `object_type` a duplicate check asks about (issue 12)

    @abstractmethod
    def mock_duplicate_query(
        self, rsps: responses.RequestsMock, value: str, rows: Mapping[str, str]
    ) -> list[str]:
        """Register the CRM's documented query/search endpoint answering `rows` (id -> name) for
        an equality filter on `unique_field` == `value`; it must check the filter is written in
        the CRM's query language and append one entry per call to the returned list."""


@dataclass(frozen=True)
class Delivery:
    path: str  # with query string
    body: bytes
    headers: dict[str, str]


class IntakeHarness(ABC):
    kind: str
    env: Mapping[str, str]
    object_type: str  # what the canonical event must say
    record_id: str = "1001"  # a record id in the CRM's own shape (Salesforce: a valid 18-char id)
    tolerance_seconds: int = 300
    # Who made the change, as the canonical event of `signed_delivery` must say; None where the
    # CRM's delivery does not tell (the worker then reads the adapter's last-modified-by field).
    modified_by: str | None = None

    @abstractmethod
    def signed_delivery(self, record_id: str, event_id: str, timestamp: int) -> Delivery:
        """A correctly signed delivery about one record change, in the CRM's documented format."""

    @abstractmethod
    def forged_delivery(self, record_id: str, event_id: str, timestamp: int) -> Delivery:
        """The same delivery with a wrong signature/token."""

    def stale_delivery(self, record_id: str, event_id: str, timestamp: int) -> Delivery | None:
        """A delivery signed for a time outside the window; None where the CRM signs no time."""
        return self.signed_delivery(record_id, event_id, timestamp - self.tolerance_seconds - 60)

    def accepted(self, status: int, body: bytes) -> bool:
        return status in (200, 202, 204)

    def rejected(self, status: int) -> bool:
        return 400 <= status < 500
