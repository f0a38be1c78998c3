"""A worker's batch writes the rows of the requests it opens together
(connector/storage/batch_writes.py): the same rows as one event at a time, in the database
before anything in the transaction reads, gone with a rollback, exactly once in the outbox."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from connector.config import Settings
from connector.events import RecordChangeEvent
from connector.rules import MappingSet
from connector.runtime import Runtime
from connector.storage import audit, batch_writes
from connector.storage.db import transaction
from connector.storage.inbox import accept, process_one, process_pending
from connector.storage.models import ApprovalRequestRow, InboxEvent, OutboxUpdate
from connector.storage.outbox import enqueue_update
from connector.wiring import attach_pipeline
from tests.conftest import PG_URL, require_service
from tests.fakes import MemoryCRM
from tests.service.test_batching import DATA, counting_statements, deal

# every table an opened request writes, with the columns that differ between two runs anyway
# (generated ids, clocks) left out of the comparison
TABLES = (
    "approval_requests",
    "approval_steps",
    "approval_transitions",
    "approval_votes",
    "approval_assignees",
    "approval_waiting",
    "outbox_updates",
    "notifications",
    "record_snapshots",
    "inbox_events",
)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_urls(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """Two fresh databases of the same kind."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/a.db", f"sqlite:///{tmp_path}/b.db"
        return
    require_service("PostgreSQL", "127.0.0.1", 5432)
    import psycopg

    schemas = [f"t_{uuid.uuid4().hex[:12]}" for _ in range(2)]
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        for schema in schemas:
            conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        a, b = (f"{PG_URL}?options=-csearch_path%3D{schema}" for schema in schemas)
        yield a, b
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            for schema in schemas:
                conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def make_world(
    tmp_path: Path,
    database_url: str,
    runtime_factory: Callable[[Settings], Runtime],
    settings_factory: Any,
) -> tuple[Runtime, MemoryCRM]:
    mappings_dir = tmp_path / "mappings"  # one for both worlds: requests name their file
    if not mappings_dir.exists():
        shutil.copytree(DATA, mappings_dir)
    runtime = runtime_factory(settings_factory(mappings_dir=str(mappings_dir), database_url=database_url))
    crm = MemoryCRM(records={f"D-{i}": deal(i) for i in range(12)})
    runtime.set_adapter("sandbox", crm)
    attach_pipeline(runtime, MappingSet.load(mappings_dir))
    return runtime, crm


def burst() -> list[RecordChangeEvent]:
    """Ten records changed, one of them twice (its amount again: the request restarts within
    the batch), one with no change the second time, one the rules leave alone."""

    def change(n: int, record: int, amount: int, stage: str = "negotiation") -> RecordChangeEvent:
        values = deal(record) | {"amount": amount, "stage": stage}
        return RecordChangeEvent(
            source="sandbox",
            connection="sandbox",
            object_type="deal",
            record_id=f"D-{record}",
            event_id=f"e{n}",
            occurred_at=datetime.now(UTC),
            dedupe_key=f"sandbox:burst:{n}",
            changed_fields=("amount",),
            values=values,
            values_signed=True,
        )

    events = [change(i, i, 150000 + i) for i in range(10)]
    events.append(change(10, 2, 175000))  # restarts D-2's request opened earlier in the batch
    events.append(change(11, 4, 150004))  # nothing changed
    events.append(change(12, 11, 50))  # under the threshold: no rule matches
    return events


def normalised(runtime: Runtime) -> dict[str, Any]:
    """Every row an opened request writes, with request ids named after their record and the
    generated ids and clocks left out; the audit log's kinds and details in chain order."""
    with runtime.sessions() as session:
        names = {
            row.id: f"<request of {row.record_id} #{n}>"
            for n, row in enumerate(
                session.execute(
                    select(ApprovalRequestRow.id, ApprovalRequestRow.record_id).order_by(
                        ApprovalRequestRow.record_id, ApprovalRequestRow.submitted_at
                    )
                )
            )
        }

        def without_clocks(value: Any) -> Any:
            if isinstance(value, dict):
                return {
                    k: without_clocks(v)
                    for k, v in value.items()
                    if k not in ("id", "at") and not k.endswith(("_at", "_until"))
                }
            return value

        def clean(row: dict[str, Any]) -> str:
            dumped = json.dumps(without_clocks(row), sort_keys=True, default=str)
            for request_id, name in names.items():
                dumped = dumped.replace(request_id, name)
            return dumped

        tables = {
            table: sorted(
                clean(dict(row._mapping)) for row in session.execute(text(f"SELECT * FROM {table}"))
            )
            for table in TABLES
        }
        columns = [audit.AuditEntry.__table__.c[name] for name in audit.CONTENT_COLUMNS]
        entries = session.execute(select(*columns).order_by(audit.AuditEntry.id))
        # every content column but the clocks (and the hashes, which cover them): the ids too,
        # so that the chain holds the same entries in the same order
        tables["audit_log"] = [
            clean({k: v for k, v in row._mapping.items() if k != "prev_hash"} | {"entry": row.id})
            for row in entries
        ]
    return tables


def test_a_batch_writes_the_same_rows_as_one_event_at_a_time(
    tmp_path: Path,
    database_urls: tuple[str, str],
    runtime_factory: Callable[[Settings], Runtime],
    settings_factory: Any,
) -> None:
    batched, _ = make_world(tmp_path, database_urls[0], runtime_factory, settings_factory)
    single, _ = make_world(tmp_path, database_urls[1], runtime_factory, settings_factory)
    for runtime in (batched, single):
        accept(runtime.sessions, burst())
    assert batched.processor is not None and single.processor is not None
    assert process_pending(batched.sessions, batched.processor).done == 13
    with single.sessions() as session:
        ids = session.scalars(select(InboxEvent.id).order_by(InboxEvent.id)).all()
    assert [process_one(single.sessions, single.processor, i) for i in ids] == ["done"] * 13

    got, expected = normalised(batched), normalised(single)
    for table in (*TABLES, "audit_log"):
        assert got[table] == expected[table], table
    assert len(got["approval_requests"]) == 10  # D-0..D-9, D-2's restarted in place
    assert any('"restarted"' in row for row in got["approval_transitions"])
    for runtime in (batched, single):
        assert audit.verify(runtime.sessions).ok


def world(
    tmp_path: Path, runtime_factory: Callable[[Settings], Runtime], settings_factory: Any
) -> tuple[Runtime, MemoryCRM]:
    return make_world(tmp_path, f"sqlite:///{tmp_path}/w.db", runtime_factory, settings_factory)


def count(session: Session, model: Any) -> int:
    return int(session.scalar(select(func.count()).select_from(model)) or 0)


def outbox_values(key: str) -> dict[str, Any]:
    return {"fields": {"approval_status": "Pending"}, "reason": "test", "idempotency_key": key}


def test_buffered_rows_are_in_the_database_before_the_next_read(
    tmp_path: Path, runtime_factory: Callable[[Settings], Runtime], settings_factory: Any
) -> None:
    runtime, _ = world(tmp_path, runtime_factory, settings_factory)
    with transaction(runtime.sessions) as session:
        pending = batch_writes.start(session)
        assert enqueue_update(session, "sandbox", "deal", "D-1", **outbox_values("k1"), later=True) is None
        assert pending  # buffered, not written
        assert count(session, OutboxUpdate) == 1  # the read wrote it first
        assert not pending and pending.written == 1
    with runtime.sessions() as session:
        assert count(session, OutboxUpdate) == 1


def test_a_rolled_back_batch_writes_nothing_and_the_next_transaction_buffers_nothing(
    tmp_path: Path, runtime_factory: Callable[[Settings], Runtime], settings_factory: Any
) -> None:
    runtime, _ = world(tmp_path, runtime_factory, settings_factory)
    with pytest.raises(RuntimeError, match="boom"), transaction(runtime.sessions) as session:
        batch_writes.start(session)
        enqueue_update(session, "sandbox", "deal", "D-1", **outbox_values("k1"), later=True)
        raise RuntimeError("boom")
    with transaction(runtime.sessions) as session:
        assert batch_writes.of(session) is None
        assert count(session, OutboxUpdate) == 0


def test_an_outbox_key_already_used_is_written_once(
    tmp_path: Path, runtime_factory: Callable[[Settings], Runtime], settings_factory: Any
) -> None:
    runtime, _ = world(tmp_path, runtime_factory, settings_factory)
    with transaction(runtime.sessions) as session:
        enqueue_update(session, "sandbox", "deal", "D-1", **outbox_values("used"))
    with transaction(runtime.sessions) as session:
        batch_writes.start(session)
        for key in ("used", "new", "new"):  # in the database, then twice in the buffer
            enqueue_update(session, "sandbox", "deal", "D-1", **outbox_values(key), later=True)
    with runtime.sessions() as session:
        keys = session.scalars(select(OutboxUpdate.idempotency_key).order_by(OutboxUpdate.id)).all()
    assert keys == ["used", "new"]


def test_a_savepoint_takes_the_buffered_rows_first_or_refuses_to_start(
    tmp_path: Path, runtime_factory: Callable[[Settings], Runtime], settings_factory: Any
) -> None:
    runtime, _ = world(tmp_path, runtime_factory, settings_factory)
    with transaction(runtime.sessions) as session:
        batch_writes.start(session)
        enqueue_update(session, "sandbox", "deal", "D-1", **outbox_values("a"), later=True)
        batch_writes.before_savepoint(session)
        with pytest.raises(LookupError), session.begin_nested():
            enqueue_update(session, "sandbox", "deal", "D-2", **outbox_values("b"), later=True)
            raise LookupError("the savepoint rolls back")
        enqueue_update(session, "sandbox", "deal", "D-3", **outbox_values("c"), later=True)
        with pytest.raises(RuntimeError, match="before_savepoint"):
            session.begin_nested()
    with runtime.sessions() as session:  # "b" went with its savepoint; "c" waited for the commit
        keys = session.scalars(select(OutboxUpdate.idempotency_key).order_by(OutboxUpdate.id)).all()
    assert keys == ["a", "c"]


def test_a_batch_of_new_requests_costs_a_few_statements_in_all(
    tmp_path: Path, runtime_factory: Callable[[Settings], Runtime], settings_factory: Any
) -> None:
    runtime, _ = world(tmp_path, runtime_factory, settings_factory)
    events = burst()[:10]
    accept(runtime.sessions, events)
    assert runtime.processor is not None
    with counting_statements(runtime.engine) as statements:
        assert process_pending(runtime.sessions, runtime.processor).done == 10
    inserts = [s for s in statements if s.lstrip().upper().startswith("INSERT")]
    # one INSERT per table for the whole batch: requests, steps, transitions, assignees, waiting,
    # outbox, notifications, snapshots, audit, not one per request
    assert len(inserts) <= 10, inserts
    with runtime.sessions() as session:
        assert count(session, ApprovalRequestRow) == 10


@pytest.mark.parametrize(
    "moment",
    [
        datetime(2026, 12, 1, 1, 2, 3, tzinfo=UTC),  # no microseconds: still six digits
        datetime(2026, 12, 1, 1, 2, 3, 4560, tzinfo=UTC),
        datetime(2026, 12, 1, 3, 2, 3, 999999, tzinfo=timezone(timedelta(hours=2))),  # not UTC
    ],
)
def test_bulk_rows_store_clocks_and_json_nulls_as_the_orm_does(
    tmp_path: Path, runtime_factory: Callable[[Settings], Runtime], settings_factory: Any, moment: datetime
) -> None:
    runtime, _ = world(tmp_path, runtime_factory, settings_factory)
    values = {
        "connection": "sandbox",
        "object_type": "deal",
        "record_id": "D-1",
        "fields": None,
        "reason": None,
        "status": "pending",
        "attempts": 0,
        "created_at": moment,
    }
    with transaction(runtime.sessions) as session:
        session.add(OutboxUpdate(idempotency_key="orm", **values))
        session.flush()
        batch_writes.start(session)
        batch_writes.add_outbox(session, {**values, "idempotency_key": "bulk"})
    with runtime.sessions() as session:
        stored = session.execute(
            text("SELECT idempotency_key, created_at, fields FROM outbox_updates ORDER BY id")
        ).all()
        read = session.scalars(select(OutboxUpdate.created_at).order_by(OutboxUpdate.id)).all()
    assert stored[0][1:] == stored[1][1:]  # e.g. '2026-12-01 01:02:03.000000', 'null'
    assert [row[0] for row in stored] == ["orm", "bulk"]
    assert read[0] == read[1] == moment  # the same instant back, whatever zone it was given in


def test_a_naive_clock_is_refused_in_bulk_as_by_the_orm(
    tmp_path: Path, runtime_factory: Callable[[Settings], Runtime], settings_factory: Any
) -> None:
    runtime, _ = world(tmp_path, runtime_factory, settings_factory)
    with pytest.raises(Exception, match="naive datetime"), transaction(runtime.sessions) as session:
        batch_writes.start(session)
        batch_writes.add_outbox(
            session,
            {"connection": "sandbox", "object_type": "deal", "record_id": "D-1", "status": "pending",
             "attempts": 0, "created_at": datetime(2026, 12, 1), "idempotency_key": "naive"},
        )  # fmt: skip


def test_the_commit_hook_appends_the_rows_append_would(
    database_urls: tuple[str, str],
    runtime_factory: Callable[[Settings], Runtime],
    settings_factory: Any,
) -> None:
    """The commit hook writes with `audit.append_many` (multi-row INSERTs, hashes from cached
    canonical pieces); `audit.append`, one executemany of `row_hash`ed rows, is the reference:
    the same ids, clocks, content and hashes, whatever the details hold."""
    hooked, reference = (runtime_factory(settings_factory(database_url=url)) for url in database_urls)
    shared = {"rule": "deal-approval", "fields": {"Status": "Approved"}}  # one object, many entries
    transactions: list[list[tuple[str, dict[str, Any]]]] = [
        [
            ("webhook_received", {"connection": "sandbox", "object_type": "deal", "record_id": "D-1"}),
            ("rule_matched", {"record_id": "D-1", "mapping_hash": "ab" * 32, **shared}),
            ("rule_matched", {"record_id": "D-2", "mapping_hash": "ab" * 32, **shared}),
        ],
        [
            (
                "vote",
                {
                    "request_id": "R-1",
                    "actor": "u-mgr-boris",
                    "amount": Decimal("150000.50"),
                    "whole": 1.0,
                    "big": 1e20,
                    "small": 1.5e-7,
                    "nested": {"list": [1, 2.5, None, True], "text": "Ünïcode ✓"},
                    "when": date(2026, 12, 31),
                    "nan": float("nan"),
                    "names": ("a", "b"),
                },
            ),
            ("transition", {"request_id": "R-1", "from_status": "pending", "to_status": "approved"}),
        ],
        [("writeback_result", {})],
    ]
    for recorded in transactions:
        with transaction(hooked.sessions) as session:
            for kind, values in recorded:
                audit.record(session, kind, **values)
            entries = [entry for _owner, entry in session.info[audit._PENDING]]
        with transaction(reference.sessions) as session:
            audit.append(session, entries)

    def stored(runtime: Runtime) -> list[dict[str, Any]]:
        with runtime.sessions() as session:
            rows = session.execute(select(audit.AuditEntry.__table__).order_by(audit.AuditEntry.id))
            return [dict(row._mapping) for row in rows]

    got, expected = stored(hooked), stored(reference)
    assert len(got) == 6
    assert got == expected  # details equal as values (1.0 == 1: stored canonical, hashed alike)
    for runtime in (hooked, reference):
        assert audit.verify(runtime.sessions).ok
