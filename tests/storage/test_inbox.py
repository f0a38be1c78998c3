"""The inbox: durable accept with dedupe, exactly-once processing, retries and dead letters,
and a worker killed mid-batch losing nothing and doing nothing twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from connector import errors
from connector.approvals.errors import ChainError
from connector.clock import utcnow
from connector.config import ConfigError
from connector.crm.errors import FatalError, RetriableError
from connector.events import RecordChangeEvent
from connector.runtime import Runtime
from connector.storage.approval_store import StaleRequestError
from connector.storage.inbox import accept, backoff_seconds, process_pending
from connector.storage.inbox_batch import LEASE_SECONDS
from connector.storage.models import DeadLetter, InboxEvent, OutboxUpdate
from connector.storage.outbox import enqueue_update
from tests.processors import CountingProcessor

ROOT = Path(__file__).resolve().parents[2]


def event(i: int, key: str | None = None) -> RecordChangeEvent:
    return RecordChangeEvent(
        source="sandbox",
        connection="sandbox",
        object_type="deal",
        record_id=f"D-{i}",
        event_id=f"msg-{i}",
        occurred_at=datetime(2026, 11, 23, 10, 0, tzinfo=UTC),
        dedupe_key=key or f"sandbox:std:msg-{i}",
        changed_fields=("amount",),
        values={"amount": 1000 + i},
    )


def claimed(runtime: Runtime) -> int:
    """Events held by a live or expired claim (`claimed_until` set)."""
    with runtime.sessions() as session:
        query = select(func.count()).select_from(InboxEvent).where(InboxEvent.claimed_until.is_not(None))
        return session.scalar(query) or 0


def count(runtime: Runtime, model: type, **where: object) -> int:
    with runtime.sessions() as session:
        query = select(func.count()).select_from(model)
        for name, value in where.items():
            query = query.where(getattr(model, name) == value)
        return session.scalar(query) or 0


def test_accept_drops_duplicates_within_and_across_deliveries(runtime: Runtime) -> None:
    assert accept(runtime.sessions, [event(1), event(1), event(2)]).accepted == 2
    result = accept(runtime.sessions, [event(2), event(3)])
    assert (result.accepted, result.duplicates) == (1, 1)
    assert count(runtime, InboxEvent) == 3


def test_each_event_is_processed_once_and_marked_done(runtime: Runtime) -> None:
    accept(runtime.sessions, [event(i) for i in range(5)])
    assert process_pending(runtime.sessions, CountingProcessor()).done == 5
    assert process_pending(runtime.sessions, CountingProcessor()).done == 0
    assert count(runtime, OutboxUpdate) == 5
    with runtime.sessions() as session:
        row = session.scalars(select(InboxEvent)).first()
    assert row is not None and row.status == "done" and row.result == "wrote Seen=msg-0"


def test_a_processing_bug_rolls_back_and_retries_later(runtime: Runtime) -> None:
    accept(runtime.sessions, [event(1)])
    # Fails in the batch's transaction and again alone (the batch falls back to one by one).
    processor = CountingProcessor(fail_times=2)
    assert process_pending(runtime.sessions, processor).retried == 1
    assert count(runtime, OutboxUpdate) == 0  # nothing half-written
    assert process_pending(runtime.sessions, processor).done == 0  # backing off
    assert process_pending(runtime.sessions, processor, now=utcnow() + timedelta(minutes=1)).done == 1
    assert count(runtime, OutboxUpdate) == 1


class CRMFailing(CountingProcessor):
    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    def prepare(self, event: RecordChangeEvent) -> object:
        raise self.error


def test_retriable_crm_error_while_preparing_honours_retry_after(runtime: Runtime) -> None:
    accept(runtime.sessions, [event(1)])
    process_pending(runtime.sessions, CRMFailing(RetriableError("busy", retry_after=600)))
    with runtime.sessions() as session:
        row = session.scalars(select(InboxEvent)).one()
    assert row.status == "pending"
    assert row.next_attempt_at is not None and row.next_attempt_at > utcnow() + timedelta(seconds=590)


def test_fatal_crm_error_dead_letters_the_event_with_the_crm_message(runtime: Runtime) -> None:
    accept(runtime.sessions, [event(1)])
    report = process_pending(
        runtime.sessions, CRMFailing(FatalError("entity is deleted", code="ENTITY_IS_DELETED"))
    )
    assert report.dead == 1
    with runtime.sessions() as session:
        letter = session.scalars(select(DeadLetter)).one()
    assert (letter.kind, letter.record_id, letter.error_code) == ("inbox", "D-1", "ENTITY_IS_DELETED")
    assert "entity is deleted" in letter.error_message


class ApplyFailing(CountingProcessor):
    """Fails inside the event's transaction, where the approval engine raises its errors."""

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    def apply(self, session: Session, event: RecordChangeEvent, prepared: Any) -> str:
        enqueue_update(session, event.connection, event.object_type, event.record_id, {"Seen": "x"})
        raise self.error


def with_note(error: Exception, note: str) -> Exception:
    error.add_note(note)
    return error


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (
            with_note(
                ChainError("manager", "field 'owner_manager'", "resolved to nobody"), "mappings/deals.yaml"
            ),
            "chain_error",
            "step 'manager': field 'owner_manager': resolved to nobody; mappings/deals.yaml",
        ),
        (ConfigError("SANDBOX_API_TOKEN is not set"), "config_error", "SANDBOX_API_TOKEN is not set"),
        (
            errors.FatalError("the record has no owner", code="no_owner"),
            "no_owner",
            "the record has no owner",
        ),
    ],
)
def test_a_fatal_error_of_any_origin_dead_letters_at_the_first_attempt(
    runtime: Runtime, caplog: pytest.LogCaptureFixture, error: Exception, code: str, message: str
) -> None:
    accept(runtime.sessions, [event(1)])
    assert process_pending(runtime.sessions, ApplyFailing(error)).dead == 1
    with runtime.sessions() as session:
        row = session.scalars(select(InboxEvent)).one()
        letter = session.scalars(select(DeadLetter)).one()
    assert (row.status, row.attempts) == ("dead", 1)
    assert (letter.kind, letter.error_code, letter.error_message) == ("inbox", code, message)
    assert count(runtime, OutboxUpdate) == 0  # the failed apply rolled back
    assert "processing inbox event" not in caplog.text  # expected, so not logged as a bug


@pytest.mark.parametrize(
    "error",
    [
        StaleRequestError("request R-1 changed since it was read (version 3, now 4)"),
        errors.RetriableError("the approver directory is busy", retry_after=600),
    ],
)
def test_a_retriable_error_of_any_origin_is_retried_later(
    runtime: Runtime, caplog: pytest.LogCaptureFixture, error: errors.RetriableError
) -> None:
    accept(runtime.sessions, [event(1)])
    processor = ApplyFailing(error)
    assert process_pending(runtime.sessions, processor, max_attempts=2).retried == 1
    with runtime.sessions() as session:
        row = session.scalars(select(InboxEvent)).one()
    assert (row.status, row.attempts) == ("pending", 1)
    assert row.last_error == f"{type(error).__name__}: {error}"
    wait = error.retry_after or backoff_seconds(1)  # the error's own hint, else the usual backoff
    assert row.next_attempt_at is not None
    assert wait - 5 < (row.next_attempt_at - utcnow()).total_seconds() <= wait
    assert count(runtime, OutboxUpdate) == 0 and count(runtime, DeadLetter) == 0
    assert "processing inbox event" not in caplog.text
    # Still failing at the last attempt: dead-lettered like anything else that never succeeds.
    later = utcnow() + timedelta(hours=1)
    assert process_pending(runtime.sessions, processor, now=later, max_attempts=2).dead == 1


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["", "read-ahead"])  # the second holds a batch read ahead too
def test_worker_killed_mid_batch_loses_nothing_and_processes_each_event_exactly_once(
    runtime: Runtime, mode: str
) -> None:
    total = 600
    accept(runtime.sessions, [event(i) for i in range(total)])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    worker = subprocess.Popen(
        [sys.executable, "-m", "tests.kill_target", runtime.settings.database_url, mode], env=env, cwd=ROOT
    )
    deadline = time.time() + 60
    while count(runtime, InboxEvent, status="done") < total // 4 and time.time() < deadline:
        time.sleep(0.02)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    done_at_kill = count(runtime, InboxEvent, status="done")
    assert 0 < done_at_kill < total, "the kill must land mid-batch"

    # Restarting the worker: once the dead worker's claims expire, the sweep re-drives what it left.
    after_lease = utcnow() + timedelta(seconds=LEASE_SECONDS + 1)
    process_pending(runtime.sessions, CountingProcessor(), limit=total, now=after_lease)

    assert count(runtime, InboxEvent, status="done") == total
    with runtime.sessions() as session:
        per_record = session.execute(
            select(OutboxUpdate.record_id, func.count()).group_by(OutboxUpdate.record_id)
        ).all()
    assert len(per_record) == total
    assert {n for _record, n in per_record} == {1}


class BatchRecorder(CountingProcessor):
    """Records the size of each batch it prepares; with `unit`, one CRM read call holds that
    many records (the pipeline's `read_unit`)."""

    def __init__(self, unit: int | None = None) -> None:
        super().__init__()
        self.batches: list[int] = []
        if unit is not None:
            self.read_unit = lambda: unit

    def prepare_batch(self, events: list[RecordChangeEvent]) -> list[Any]:
        self.batches.append(len(events))
        return [self.prepare(e) for e in events]


def pass_while_arriving(
    runtime: Runtime, processor: BatchRecorder, first: list[int], later: list[tuple[float, list[int]]]
) -> tuple[dict[str, int], bool]:
    """One inbox pass (linger 1 s) that finds the `first` events, while each of `later`
    arrives that many seconds after the pass began."""
    from connector.storage.inbox_batch import process_in_batches

    accept(runtime.sessions, [event(i) for i in first])
    arrivals = [
        threading.Timer(delay, lambda ids=ids: accept(runtime.sessions, [event(i) for i in ids]))
        for delay, ids in later
    ]
    for timer in arrivals:
        timer.start()
    try:
        return process_in_batches(
            runtime.sessions, processor, limit=500, max_attempts=3, now=utcnow(), linger=1.0
        )
    finally:
        for timer in arrivals:
            timer.join()


def test_a_partial_batch_lingers_for_events_still_arriving(runtime: Runtime) -> None:
    """A burst trickling in is judged in one batch (one CRM read) rather than in many."""
    processor = BatchRecorder()
    outcomes, more = pass_while_arriving(runtime, processor, [0, 1, 2], [(0.1, [3, 4, 5])])
    assert (outcomes, more, processor.batches) == ({"done": 6}, False, [6])


def test_a_batch_of_a_burst_still_arriving_is_whole_read_calls(runtime: Runtime) -> None:
    """With reads of 4 records a call: 6 events in hand while more arrive are judged as 4 now,
    and 2 handed back to be read with the next ones, not in a partial call of their own."""
    processor = BatchRecorder(unit=4)
    # 3-5 come at 0.6 s, not 0.1 s: the 2 handed back at the linger's end (1.0 s) must still be
    # under a linger old when claimed again after the 4 are judged; a slow batch of 4 (under
    # load) left them over 1 s old, judged alone: [4, 2, 2].
    outcomes, more = pass_while_arriving(runtime, processor, [0, 1, 2], [(0.6, [3, 4, 5]), (1.6, [6, 7])])
    assert (outcomes, more, processor.batches) == ({"done": 8}, False, [4, 4])  # not [6] + [2]


def test_less_than_one_read_of_a_trickle_waits_for_more(runtime: Runtime) -> None:
    """Several workers sharing a trickle each held a few events and read them in calls of
    their own: fewer than one read's worth, still arriving, is handed back and waited for
    (at most two lingers after the oldest arrived)."""
    processor = BatchRecorder(unit=4)
    outcomes, more = pass_while_arriving(runtime, processor, [0], [(0.5, [1]), (1.5, [2, 3])])
    assert (outcomes, more, processor.batches) == ({"done": 4}, False, [4])  # not [2] then [2]


def test_claimed_events_are_not_claimed_again_until_the_lease_ends(runtime: Runtime) -> None:
    from connector.storage.inbox_batch import claim

    accept(runtime.sessions, [event(i) for i in range(5)])
    now = utcnow()
    first = claim(runtime.sessions, 3, now)
    second = claim(runtime.sessions, 3, now)  # another worker: gets the rest, not the same
    assert [c.event.record_id for c in first] == ["D-0", "D-1", "D-2"]
    assert [c.event.record_id for c in second] == ["D-3", "D-4"]
    assert claim(runtime.sessions, 3, now) == []
    # A worker that died holding a claim: its events come back when the lease ends.
    after = now + timedelta(seconds=LEASE_SECONDS + 1)
    assert [c.event.record_id for c in claim(runtime.sessions, 10, after)] == [f"D-{i}" for i in range(5)]


class ReadAheadRecorder(BatchRecorder):
    """Applying the last event of the first batch waits (up to 10 s) until the second batch is
    being prepared (read), and counts the claimed events then. A pass that reads ahead claims
    the second batch before applying the first and reads it in its reader thread, which holds
    no lock the apply needs; a pass that reads after applying would wait here in vain."""

    def __init__(self, batch: int) -> None:
        super().__init__()
        self.batch = batch
        self.second_read = threading.Event()
        self.overlapped: bool | None = None
        self.claimed_while_applying = 0
        self.applied = 0

    def prepare_batch(self, events: list[RecordChangeEvent]) -> list[Any]:
        if self.batches:
            self.second_read.set()
        return super().prepare_batch(events)

    def apply(self, session: Session, event: RecordChangeEvent, prepared: Any) -> str:
        self.applied += 1
        if self.applied == self.batch:  # the first batch's last event, in its transaction
            self.overlapped = self.second_read.wait(10)
            self.claimed_while_applying = session.scalar(
                select(func.count())
                .select_from(InboxEvent)
                .where(InboxEvent.status == "pending", InboxEvent.claimed_until.is_not(None))
            )
        return super().apply(session, event, prepared)


def test_a_burst_s_next_batch_is_claimed_and_read_while_this_one_is_applied(runtime: Runtime) -> None:
    from connector.storage.inbox_batch import process_in_batches

    accept(runtime.sessions, [event(i) for i in range(8)])
    processor = ReadAheadRecorder(batch=4)
    with ThreadPoolExecutor(1) as reader:
        outcomes, more = process_in_batches(
            runtime.sessions,
            processor,
            limit=12,
            batch_size=4,
            max_attempts=3,
            now=utcnow(),
            read_ahead=reader,
        )
    assert (outcomes, more, processor.batches) == ({"done": 8}, False, [4, 4])
    assert processor.overlapped is True  # the second batch was read while the first was applied
    assert processor.claimed_while_applying == 8  # ... and claimed (by this pass) before it was read
    assert count(runtime, InboxEvent, status="done") == 8


def test_a_pass_that_fails_hands_back_the_batch_it_read_ahead(runtime: Runtime) -> None:
    """Its events are due again at once for any worker, not after the lease."""
    from connector.storage.inbox_batch import process_in_batches

    def queue_down() -> None:
        raise RuntimeError("queue down")

    accept(runtime.sessions, [event(i) for i in range(8)])
    processor = BatchRecorder()
    with ThreadPoolExecutor(1) as reader, pytest.raises(RuntimeError, match="queue down"):
        process_in_batches(
            runtime.sessions, processor, limit=12, batch_size=4, max_attempts=3, now=utcnow(),
            read_ahead=reader, after_full_batch=queue_down,
        )  # fmt: skip
    assert processor.batches == [4, 4]  # the second was read ahead ...
    assert count(runtime, InboxEvent, status="done") == 4
    assert claimed(runtime) == 0  # ... and handed back


@pytest.mark.parametrize(("burst_seconds", "done", "more"), [(60.0, 16, False), (0.0, 8, True)])
def test_a_burst_read_ahead_goes_on_past_the_pass_limit_for_its_burst_seconds(
    runtime: Runtime, burst_seconds: float, done: int, more: bool
) -> None:
    """A batch read ahead is applied by the pass that read it, never left claimed for a later
    pass; past `burst_seconds` a pass stops at its limit, reading nothing ahead."""
    from connector.storage.inbox_batch import process_in_batches

    accept(runtime.sessions, [event(i) for i in range(16)])
    processor = BatchRecorder()
    with ThreadPoolExecutor(1) as reader:
        outcomes, left = process_in_batches(
            runtime.sessions, processor, limit=8, batch_size=4, max_attempts=3, now=utcnow(),
            read_ahead=reader, burst_seconds=burst_seconds,
        )  # fmt: skip
    assert (outcomes, left) == ({"done": done}, more)
    assert sum(processor.batches) == done  # nothing read that was not applied
    assert claimed(runtime) == 0


class LeaseRecorder(BatchRecorder):
    """Records, while applying each event, the earliest lease of the events claimed: that of
    its own batch (a batch read ahead is claimed later; the events done hold none)."""

    def __init__(self) -> None:
        super().__init__()
        self.leases: list[datetime] = []

    def prepare_batch(self, events: list[RecordChangeEvent]) -> list[Any]:
        time.sleep(0.5)  # a read that takes its time
        return super().prepare_batch(events)

    def apply(self, session: Session, event: RecordChangeEvent, prepared: Any) -> str:
        self.leases.append(session.scalar(select(func.min(InboxEvent.claimed_until))))
        return super().apply(session, event, prepared)


def test_a_batch_s_lease_runs_from_its_claim_not_from_the_pass_s_start(runtime: Runtime) -> None:
    """A burst's pass goes on past its limit: the lease of a batch claimed late in it still
    covers that batch's read and apply in full."""
    from connector.storage.inbox_batch import process_in_batches

    accept(runtime.sessions, [event(i) for i in range(8)])
    processor = LeaseRecorder()
    now = utcnow()
    with ThreadPoolExecutor(1) as reader:
        process_in_batches(
            runtime.sessions, processor, limit=4, batch_size=4, max_attempts=3, now=now,
            read_ahead=reader, burst_seconds=60,
        )  # fmt: skip
    first, second = processor.leases[0], processor.leases[-1]
    # The second batch was claimed after the first one's read (0.5 s).
    assert first.replace(tzinfo=None) >= (now + timedelta(seconds=LEASE_SECONDS)).replace(tzinfo=None)
    assert (second - first).total_seconds() >= 0.5
