"""An in-memory CRM behind the real adapter interface, for tests of our own storage logic
(outbox, inbox, worker). It stands in for the CRM, not for any of our code: per-CRM wire
formats are tested with `responses` in the contract suite."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from connector.config import ConnectionConfig
from connector.crm.base import CRMAdapter, CRMQueue, CRMUser, FieldInfo, RecordUpdate, UpdateResult
from connector.crm.errors import CRMError, RetriableError
from connector.crm.retry import NO_WAIT


class MemoryCRM(CRMAdapter):
    kind = "memory"
    batch_limit = 3

    def __init__(self, name: str = "sandbox", records: dict[str, dict[str, Any]] | None = None) -> None:
        super().__init__(ConnectionConfig(name=name, kind="sandbox"), retry=NO_WAIT)
        self.records: dict[str, dict[str, Any]] = records if records is not None else {}
        self.update_calls: list[list[RecordUpdate]] = []
        self.reads = 0
        self.reject: dict[str, str] = {}  # record id -> error code to answer with
        self.fail_calls = 0  # the next N update calls fail with a retriable error
        self.crash_after_apply = False  # apply the write, then "lose the connection"
        self.users: list[CRMUser] = []  # what list_users answers
        self.queues: list[CRMQueue] = []  # what list_queues answers
        self.queue_error: CRMError | None = None  # list_queues raises this instead

    def _fetch(
        self, object_type: str, ids: Sequence[str], fields: Sequence[str]
    ) -> dict[str, dict[str, Any]]:
        self.reads += 1
        return {i: {f: self.records[i].get(f) for f in fields} for i in ids if i in self.records}

    def _update_batch(self, object_type: str, updates: Sequence[RecordUpdate]) -> list[UpdateResult]:
        self.update_calls.append(list(updates))
        if self.fail_calls:
            self.fail_calls -= 1
            raise RetriableError("503 Service Unavailable", status=503, retry_after=0)
        results = []
        for update in updates:
            code = self.reject.get(update.record_id)
            if code:
                results.append(
                    UpdateResult(update.record_id, False, code, f"{code} on {update.record_id}", ("Status",))
                )
                continue
            self.records.setdefault(update.record_id, {}).update(update.fields)
            results.append(UpdateResult.success(update.record_id))
        if self.crash_after_apply:
            raise SystemExit("worker killed after the CRM applied the batch")
        return results

    def _query_page(
        self, object_type: str, fields: Sequence[str], filters: Mapping[str, Any], cursor: Any
    ) -> tuple[list[dict[str, Any]], Any]:
        return [{"id": i, **r} for i, r in self.records.items()], None

    def describe(self, object_type: str) -> list[FieldInfo]:
        return [
            FieldInfo(name=n, label=n, type="string")
            for n in sorted({k for r in self.records.values() for k in r})
        ]

    def _users_page(self, cursor: Any) -> tuple[list[CRMUser], Any]:
        return list(self.users), None

    def _queues(self) -> list[CRMQueue]:
        if self.queue_error is not None:
            raise self.queue_error
        return list(self.queues)
