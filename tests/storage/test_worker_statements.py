"""The worker's statements of few parameters: `db.in_ids` of a list of ids (one array on
PostgreSQL), the inbox's claim and its DONE marks of a batch in one statement, and the
garbage collector paused per applied chunk (`db.collector_paused`)."""

from __future__ import annotations

import gc
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event, select

from connector.events import RecordChangeEvent
from connector.runtime import Runtime
from connector.storage.db import collector_paused, in_ids, transaction
from connector.storage.inbox import accept, process_pending
from connector.storage.inbox_batch import claim, mark_done, release
from connector.storage.models import DONE, PENDING, InboxEvent


def _event(i: int) -> RecordChangeEvent:
    return RecordChangeEvent(
        source="sandbox",
        connection="sandbox",
        object_type="deal",
        record_id=f"D-{i}",
        event_id=f"msg-{i}",
        occurred_at=datetime(2026, 11, 23, 10, 0, tzinfo=UTC),
        dedupe_key=f"sandbox:std:msg-{i}",
        changed_fields=("amount",),
        values={"amount": 1000 + i},
    )


class _Statements:
    """The statements the engine sends that mention `inbox_events`, with their parameters."""

    def __init__(self, runtime: Runtime) -> None:
        self.engine = runtime.engine
        self.seen: list[tuple[str, Any]] = []

    def _look(self, _conn: Any, _cursor: Any, statement: str, parameters: Any, *_args: Any) -> None:
        if "inbox_events" in statement:
            self.seen.append((statement, parameters))

    def __enter__(self) -> _Statements:
        event.listen(self.engine, "before_cursor_execute", self._look)
        return self

    def __exit__(self, *_exc: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._look)


def _ids(runtime: Runtime) -> list[int]:
    with runtime.sessions() as session:
        return list(session.scalars(select(InboxEvent.id).order_by(InboxEvent.id)))


def test_in_ids_of_given_ids_selects_exactly_them_with_one_statement_text(either: Runtime) -> None:
    accept(either.sessions, [_event(i) for i in range(80)])
    ids = _ids(either)
    column = InboxEvent.__table__.c.id
    found = []
    with _Statements(either) as statements:
        for wanted in (ids[::2], ids[5:7] + [10**6], []):
            with either.sessions() as session:
                dialect = session.get_bind().dialect.name
                query = select(column).where(in_ids(column, dialect, wanted)).order_by(column)
                found.append(list(session.scalars(query)))
    assert found == [ids[::2], ids[5:7], []]
    if dialect == "postgresql":  # one array parameter, whatever the number of ids
        assert len({text for text, _parameters in statements.seen}) == 1
        assert [len(parameters) for _text, parameters in statements.seen] == [1, 1, 1]


def test_claim_and_release_hold_exactly_the_claimed_rows(either: Runtime) -> None:
    accept(either.sessions, [_event(i) for i in range(60)])
    now = datetime.now(UTC)
    first = claim(either.sessions, 25, now)
    second = claim(either.sessions, 100, now)
    assert [c.event.record_id for c in first] == [f"D-{i}" for i in range(25)]
    assert [c.event.values for c in second] == [{"amount": 1000 + i} for i in range(25, 60)]
    assert second[0].event == _event(25) and second[0].received_at.tzinfo is not None
    assert claim(either.sessions, 100, now) == []  # every row is held
    release(either.sessions, second[:10])
    assert [c.event.record_id for c in claim(either.sessions, 100, now)] == [f"D-{i}" for i in range(25, 35)]
    later = claim(either.sessions, 100, now + timedelta(hours=1))  # the leases have ended
    assert len(later) == 60


def test_mark_done_marks_a_batch_in_one_statement(either: Runtime) -> None:
    accept(either.sessions, [_event(i) for i in range(70)])
    ids = _ids(either)
    now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    claim(either.sessions, 70, now)
    with transaction(either.sessions) as session:
        session.get(InboxEvent, ids[0]).attempts = 3  # type: ignore[union-attr]
    with _Statements(either) as statements, transaction(either.sessions) as session:
        mark_done(session, [(ids[0], 3, "first")] + [(i, 0, f"r{i}" * 3) for i in ids[1:60]], now)
    assert len(statements.seen) == 1
    with either.sessions() as session:
        rows = {row.id: row for row in session.scalars(select(InboxEvent))}
    assert rows[ids[0]].status == DONE and rows[ids[0]].attempts == 4 and rows[ids[0]].result == "first"
    for i in ids[1:60]:
        row = rows[i]
        assert (row.status, row.attempts, row.result) == (DONE, 1, f"r{i}" * 3)
        assert row.processed_at == now and row.claimed_until is None
    for i in ids[60:]:  # not in the batch: untouched, still claimed
        assert rows[i].status == PENDING and rows[i].attempts == 0 and rows[i].claimed_until is not None


def test_a_pass_marks_its_events_done_once_each(either: Runtime) -> None:
    from tests.processors import CountingProcessor

    accept(either.sessions, [_event(i) for i in range(120)])
    processor = CountingProcessor()
    report = process_pending(either.sessions, processor, limit=500)
    assert report.done == 120
    with either.sessions() as session:
        rows = list(session.scalars(select(InboxEvent)))
    assert {(r.status, r.attempts, r.claimed_until) for r in rows} == {(DONE, 1, None)}
    assert all(r.result and r.processed_at is not None for r in rows)


def test_collector_paused_turns_the_collector_back_on_after_an_exception() -> None:
    assert gc.isenabled()
    with pytest.raises(ZeroDivisionError), collector_paused():
        assert not gc.isenabled()
        1 / 0  # noqa: B018
    assert gc.isenabled()


def test_collector_paused_stays_off_until_the_last_overlapping_section_ends() -> None:
    inside, leave = threading.Event(), threading.Event()

    def other() -> None:
        with collector_paused():
            inside.set()
            leave.wait(10)

    thread = threading.Thread(target=other)
    with collector_paused():
        thread.start()
        inside.wait(10)
    assert not gc.isenabled()  # the other thread's section is still in progress
    leave.set()
    thread.join(10)
    assert gc.isenabled()


def test_collector_paused_leaves_a_collector_that_was_off_off() -> None:
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


class _CollectorWatcher:
    """A processor that notes whether the collector runs while it applies, and can fail."""

    def __init__(self, fail: str | None = None) -> None:
        self.fail = fail
        self.enabled: list[bool] = []

    def prepare(self, event: RecordChangeEvent) -> Any:
        return None

    def apply(self, session: Any, event: RecordChangeEvent, prepared: Any) -> str:
        self.enabled.append(gc.isenabled())
        if event.record_id == self.fail:
            raise RuntimeError("processing bug")
        return "ok"


@pytest.mark.parametrize("fail", [None, "D-3"])
def test_the_collector_is_paused_while_a_chunk_is_applied_and_back_on_after(
    runtime: Runtime, fail: str | None
) -> None:
    accept(runtime.sessions, [_event(i) for i in range(10)])
    processor = _CollectorWatcher(fail)
    report = process_pending(runtime.sessions, processor)
    assert report.done == (10 if fail is None else 9)
    # applied together: paused; after a failure, one by one (no chunk): as the process has it
    assert processor.enabled[:4] == [False] * 4
    assert gc.isenabled()
