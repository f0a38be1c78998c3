"""The write-back outbox: batching, merging, per-record results, dead letters, and
exactly-once when the worker dies between sending and committing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from connector import errors
from connector.clock import utcnow
from connector.config import ConfigError
from connector.crm.base import RecordUpdate, UpdateResult
from connector.crm.retry import NO_WAIT
from connector.runtime import Runtime
from connector.storage.db import transaction
from connector.storage.models import DeadLetter, OutboxUpdate
from connector.storage.outbox import enqueue_update, flush, same_values
from tests.fakes import MemoryCRM

ROOT = Path(__file__).resolve().parents[2]


def enqueue(runtime: Runtime, record_id: str, fields: dict, **kwargs: object) -> None:
    with transaction(runtime.sessions) as session:
        enqueue_update(session, "sandbox", "deal", record_id, fields, **kwargs)  # type: ignore[arg-type]


def statuses(runtime: Runtime) -> dict[int, str]:
    with runtime.sessions() as session:
        return {r.id: r.status for r in session.scalars(select(OutboxUpdate))}


def test_updates_are_sent_in_batches_of_the_crm_limit(runtime: Runtime) -> None:
    crm = MemoryCRM()
    for i in range(7):
        enqueue(runtime, f"D-{i}", {"Status": "Approved"})
    report = flush(runtime.sessions, lambda _name: crm)
    assert [len(call) for call in crm.update_calls] == [3, 3, 1]
    assert report.done == 7
    assert set(statuses(runtime).values()) == {"done"}
    assert crm.records["D-6"] == {"Status": "Approved"}


def test_full_batches_only_sends_the_full_calls_and_leaves_the_remainder_pending(runtime: Runtime) -> None:
    """Mid-burst (connector/worker.py): a partial call now would cost an extra call later."""
    crm = MemoryCRM()
    for i in range(7):
        enqueue(runtime, f"D-{i}", {"Status": "Approved"})
    report = flush(runtime.sessions, lambda _name: crm, full_batches_only=True)
    assert [len(call) for call in crm.update_calls] == [3, 3]
    assert report.done == 6
    assert sorted(statuses(runtime).values()) == ["done"] * 6 + ["pending"]
    flush(runtime.sessions, lambda _name: crm)  # the end of the burst: the remainder
    assert [len(call) for call in crm.update_calls] == [3, 3, 1]


def test_a_call_s_results_are_recorded_in_a_few_statements_not_per_record(runtime: Runtime) -> None:
    from tests.service.test_batching import counting_statements

    crm = MemoryCRM()
    crm.batch_limit = 60
    for i in range(60):
        enqueue(runtime, f"D-{i}", {"Status": "Approved"})
    with counting_statements(runtime.engine) as statements:
        assert flush(runtime.sessions, lambda _name: crm).done == 60
    assert len(crm.update_calls) == 1
    # look-ups, the claim, the call's rows read once and updated in one executemany, the
    # audit: 17 in all; one select and one update per record made it 135
    assert len(statements) <= 25, statements


def test_a_row_is_tried_once_per_flush_even_when_due_again_at_once(either: Runtime) -> None:
    """A flush dated later than its retries' backoff would find them due again: it must not
    send them a second time."""
    crm = MemoryCRM()
    crm.fail_calls = 100  # every call fails, retriably
    for i in range(4):
        enqueue(either, f"D-{i}", {"Status": "Approved"})
    report = flush(either.sessions, lambda _name: crm, now=utcnow() + timedelta(hours=2))
    assert report.retried == 4
    # two calls (3 + 1 records), each tried as often as the adapter's retry policy says
    assert len(crm.update_calls) == 2 * NO_WAIT.attempts
    assert set(statuses(either).values()) == {"pending"}


def test_a_flush_s_look_ups_do_not_carry_the_rows_it_has_sent(either: Runtime) -> None:
    """The rows a flush has written back are done: its look-ups for the next call need not
    exclude them by id (they carried every id sent so far, thousands by the end of a burst)."""
    from sqlalchemy import event

    crm = MemoryCRM()
    for i in range(30):
        enqueue(either, f"D-{i}", {"Status": "Approved"})
    largest: list[int] = [0]

    def count(_conn: object, _cursor: object, statement: str, parameters: object, *_args: object) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "outbox_updates" in statement:
            largest[0] = max(largest[0], len(parameters) if isinstance(parameters, Sequence | dict) else 0)

    event.listen(either.engine, "before_cursor_execute", count)
    try:
        assert flush(either.sessions, lambda _name: crm).done == 30
    finally:
        event.remove(either.engine, "before_cursor_execute", count)
    assert len(crm.update_calls) == 10
    assert 0 < largest[0] <= 12, largest  # not the 27 ids sent before the last call


def test_pending_updates_to_one_record_merge_into_one_request_later_values_winning(runtime: Runtime) -> None:
    crm = MemoryCRM()
    enqueue(runtime, "D-1", {"Status": "Pending", "Comment": "submitted"})
    enqueue(runtime, "D-1", {"Status": "Approved", "Expires": "2027-05-22"})
    flush(runtime.sessions, lambda _name: crm)
    [[update]] = crm.update_calls
    assert dict(update.fields) == {"Status": "Approved", "Comment": "submitted", "Expires": "2027-05-22"}
    assert set(statuses(runtime).values()) == {"done"}


def test_fatal_per_record_error_goes_to_dead_letters_with_the_crm_message(runtime: Runtime) -> None:
    crm = MemoryCRM()
    crm.reject["D-2"] = "FIELD_CUSTOM_VALIDATION_EXCEPTION"
    enqueue(runtime, "D-1", {"Status": "Approved"})
    enqueue(runtime, "D-2", {"Status": "Approved"}, reason="request 7: approve")
    report = flush(runtime.sessions, lambda _name: crm)
    assert (report.done, report.dead) == (1, 1)
    with runtime.sessions() as session:
        [letter] = session.scalars(select(DeadLetter)).all()
    assert letter.record_id == "D-2"
    assert letter.error_code == "FIELD_CUSTOM_VALIDATION_EXCEPTION"
    assert "FIELD_CUSTOM_VALIDATION_EXCEPTION on D-2" in letter.error_message
    assert letter.payload == {"fields": {"Status": "Approved"}, "reason": "request 7: approve"}
    assert len(crm.update_calls) == 1  # never retried


def test_retriable_failure_keeps_the_update_pending_with_backoff(runtime: Runtime) -> None:
    crm = MemoryCRM()
    crm.fail_calls = 10  # more than the retry policy's attempts
    enqueue(runtime, "D-1", {"Status": "Approved"})
    report = flush(runtime.sessions, lambda _name: crm)
    assert report.retried == 1
    with runtime.sessions() as session:
        row = session.scalars(select(OutboxUpdate)).one()
    assert row.status == "pending" and row.attempts == 1 and row.next_attempt_at is not None
    assert "503" in (row.last_error or "")
    crm.fail_calls = 0
    assert flush(runtime.sessions, lambda _name: crm).done == 0  # not due yet
    assert flush(runtime.sessions, lambda _name: crm, now=utcnow() + timedelta(hours=2)).done == 1


def test_retriable_failures_dead_letter_after_max_attempts(runtime: Runtime) -> None:
    crm = MemoryCRM()
    crm.fail_calls = 100
    enqueue(runtime, "D-1", {"Status": "Approved"})
    later = utcnow()
    for _ in range(3):
        later += timedelta(hours=2)
        flush(runtime.sessions, lambda _name: crm, max_attempts=3, now=later)
    assert statuses(runtime) == {1: "dead"}


class FailingCRM(MemoryCRM):
    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    def _update_batch(self, object_type: str, updates: Sequence[RecordUpdate]) -> list[UpdateResult]:
        self.update_calls.append(list(updates))
        raise self.error


def test_a_fatal_error_of_any_origin_dead_letters_the_batch(runtime: Runtime) -> None:
    crm = FailingCRM(ConfigError("SANDBOX_API_TOKEN is not set; copy it from the sandbox page"))
    enqueue(runtime, "D-1", {"Status": "Approved"})
    assert flush(runtime.sessions, lambda _name: crm).dead == 1
    with runtime.sessions() as session:
        letter = session.scalars(select(DeadLetter)).one()
    assert (letter.error_code, letter.error_fields) == ("config_error", [])
    assert letter.error_message == "SANDBOX_API_TOKEN is not set; copy it from the sandbox page"
    assert len(crm.update_calls) == 1


def test_a_retriable_error_of_any_origin_keeps_the_update_pending(runtime: Runtime) -> None:
    crm = FailingCRM(errors.RetriableError("the token service is busy", retry_after=900))
    enqueue(runtime, "D-1", {"Status": "Approved"})
    assert flush(runtime.sessions, lambda _name: crm).retried == 1
    with runtime.sessions() as session:
        row = session.scalars(select(OutboxUpdate)).one()
    assert (row.status, row.last_error) == ("pending", "the token service is busy")
    assert row.next_attempt_at is not None and row.next_attempt_at > utcnow() + timedelta(seconds=890)
    assert len(crm.update_calls) == NO_WAIT.attempts  # the adapter's retry policy retries it too


def test_idempotency_key_enqueues_once(runtime: Runtime) -> None:
    enqueue(runtime, "D-1", {"Status": "Expired"}, idempotency_key="expire:request:1")
    enqueue(runtime, "D-1", {"Status": "Expired"}, idempotency_key="expire:request:1")
    assert len(statuses(runtime)) == 1


def test_worker_dying_after_the_crm_applied_the_batch_does_not_resend(runtime: Runtime) -> None:
    crm = MemoryCRM(records={"D-1": {"Status": "Draft"}})
    crm.crash_after_apply = True
    enqueue(runtime, "D-1", {"Status": "Approved"})
    with pytest.raises(SystemExit):
        flush(runtime.sessions, lambda _name: crm, lease_seconds=60)
    assert statuses(runtime) == {1: "sending"}  # in doubt: sent, outcome never committed
    crm.crash_after_apply = False
    # Before the lease runs out nothing touches it (the first worker might still be alive).
    flush(runtime.sessions, lambda _name: crm)
    assert len(crm.update_calls) == 1
    report = flush(runtime.sessions, lambda _name: crm, now=utcnow() + timedelta(minutes=5))
    assert report.confirmed_by_read_back == 1
    assert len(crm.update_calls) == 1  # confirmed by reading back, not sent again
    assert statuses(runtime) == {1: "done"}


def test_worker_dying_before_the_crm_applied_the_batch_resends_once(runtime: Runtime) -> None:
    crm = MemoryCRM(records={"D-1": {"Status": "Draft"}})
    enqueue(runtime, "D-1", {"Status": "Approved"})
    with transaction(runtime.sessions) as session:  # what a claim that died before sending leaves
        row = session.scalars(select(OutboxUpdate)).one()
        row.status, row.batch_id, row.lease_expires_at = (
            "sending",
            "dead-batch",
            utcnow() - timedelta(seconds=1),
        )
    report = flush(runtime.sessions, lambda _name: crm)
    assert report.confirmed_by_read_back == 0
    assert [len(c) for c in crm.update_calls] == [1]
    assert crm.records["D-1"]["Status"] == "Approved"
    assert statuses(runtime) == {1: "done"}


def test_record_with_a_batch_in_flight_is_not_claimed_again(runtime: Runtime) -> None:
    crm = MemoryCRM(records={"D-1": {"Status": "Draft"}})
    enqueue(runtime, "D-1", {"Status": "Pending"})
    with transaction(runtime.sessions) as session:
        row = session.scalars(select(OutboxUpdate)).one()
        row.status, row.batch_id, row.lease_expires_at = (
            "sending",
            "live-batch",
            utcnow() + timedelta(minutes=1),
        )
    enqueue(runtime, "D-1", {"Status": "Approved"})
    flush(runtime.sessions, lambda _name: crm)
    assert crm.update_calls == []  # would otherwise race the in-flight write and reorder them


@pytest.mark.parametrize(
    ("wanted", "current", "same"),
    [
        ({"Amount": "150000"}, {"Amount": 150000.0}, True),
        ({"Status": "Approved"}, {"status": "Approved"}, True),
        ({"Expires": None}, {"Expires": ""}, True),
        ({"Flag": True}, {"Flag": "true"}, True),
        ({"Status": "Approved"}, {"Status": "Pending"}, False),
        ({"Status": "Approved"}, {}, False),
        ({"At": "2026-05-22T10:00:00+00:00"}, {"At": "2026-05-22T10:00:00.000+0000"}, True),
        ({"At": "2026-05-22T10:00:00+00:00"}, {"At": "2026-05-22T12:00:00+02:00"}, True),
        ({"At": "2026-05-22T10:00:00+00:00"}, {"At": "2026-05-22T10:00:01Z"}, False),
        ({"On": "2026-05-22"}, {"On": "2026-05-22"}, True),
        ({"Note": "T-shirts"}, {"Note": "T-shirts"}, True),
    ],
)
def test_read_back_comparison(wanted: dict, current: dict, same: bool) -> None:
    assert same_values(wanted, current) is same


def test_a_flush_claims_one_call_at_a_time(runtime: Runtime) -> None:
    crm = MemoryCRM()
    for i in range(5):
        enqueue(runtime, f"D-{i}", {"Status": "Approved"})
    seen: list[dict[int, str]] = []
    original = crm._update_batch

    def watching(object_type: str, updates: list) -> list:  # what the table holds while a call is out
        seen.append(statuses(runtime))
        return original(object_type, updates)

    crm._update_batch = watching  # type: ignore[method-assign]
    flush(runtime.sessions, lambda _name: crm)
    assert list(seen[0].values()) == ["sending"] * 3 + ["pending"] * 2
    assert list(seen[1].values()) == ["done"] * 3 + ["sending"] * 2


@pytest.mark.slow
def test_worker_killed_with_a_call_in_flight_leaves_the_unsent_rows_to_the_next_flush(
    runtime: Runtime, tmp_path: Path
) -> None:
    for i in range(10):
        enqueue(runtime, f"D-{i}", {"Status": "Approved"})
    marker = tmp_path / "in-flight"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    worker = subprocess.Popen(
        [sys.executable, "-m", "tests.outbox_kill_target", runtime.settings.database_url, str(marker)],
        env=env,
        cwd=ROOT,
    )
    try:
        deadline = time.time() + 60
        while not marker.exists() and time.time() < deadline and worker.poll() is None:
            time.sleep(0.02)
        assert marker.exists(), "the second call never started"
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    assert marker.read_text() == "D-3,D-4,D-5"
    assert list(statuses(runtime).values()) == ["done"] * 3 + ["sending"] * 3 + ["pending"] * 4

    # The next flush, at once (no lease has run out), sends every row the dead worker never reached.
    crm = MemoryCRM()
    report = flush(runtime.sessions, lambda _name: crm)
    assert [[u.record_id for u in call] for call in crm.update_calls] == [["D-6", "D-7", "D-8"], ["D-9"]]
    assert report.done == 4
    assert list(statuses(runtime).values()) == ["done"] * 3 + ["sending"] * 3 + ["done"] * 4
    # Only the one call that was in flight waits for its lease, then is read back and sent once.
    report = flush(runtime.sessions, lambda _name: crm, now=utcnow() + timedelta(seconds=601))
    assert report.done == 3 and len(crm.update_calls) == 3
    assert [u.record_id for u in crm.update_calls[-1]] == ["D-3", "D-4", "D-5"]
    assert set(statuses(runtime).values()) == {"done"}


def test_the_records_the_crm_took_are_marked_done_together_and_a_failure_keeps_its_error(
    either: Runtime,
) -> None:
    """The call's accepted records' rows: done in one UPDATE (an id array on PostgreSQL),
    their lease and an earlier error cleared; a rejected record's row is settled as before."""
    from sqlalchemy import event

    crm = MemoryCRM()
    crm.batch_limit = 60
    for i in range(50):
        enqueue(either, f"D-{i}", {"Status": "Approved"})
    crm.fail_calls = NO_WAIT.attempts  # a first flush fails retriably: every row carries its error
    flush(either.sessions, lambda _name: crm)
    crm.reject["D-7"] = "FIELD_CUSTOM_VALIDATION_EXCEPTION"
    updates: list[tuple[str, object]] = []

    def look(_conn: object, _cursor: object, statement: str, parameters: object, *_args: object) -> None:
        if statement.lstrip().upper().startswith("UPDATE") and "outbox_updates" in statement:
            updates.append((statement, parameters))

    event.listen(either.engine, "before_cursor_execute", look)
    try:
        report = flush(either.sessions, lambda _name: crm, now=utcnow() + timedelta(hours=1))
    finally:
        event.remove(either.engine, "before_cursor_execute", look)
    assert (report.done, report.dead) == (49, 1)
    with either.sessions() as session:
        rows = {row.record_id: row for row in session.scalars(select(OutboxUpdate))}
    for record_id, row in rows.items():
        if record_id == "D-7":
            assert row.status == "dead" and "FIELD_CUSTOM_VALIDATION_EXCEPTION" in (row.last_error or "")
        else:
            assert (row.status, row.last_error, row.lease_expires_at) == ("done", None, None)
            assert row.done_at is not None and row.attempts == 1
    # the claim, the one done-UPDATE of 49 rows and the rejected row's own
    assert len(updates) == 3, [u[0] for u in updates]
    if either.engine.dialect.name == "postgresql":
        assert all(len(parameters) <= 8 for _statement, parameters in updates)  # type: ignore[arg-type]


class _RecoveredMeanwhile(MemoryCRM):
    """A CRM during whose call a recovery settles one of the call's rows (as when the call
    outlived its lease): the row must keep what the recovery gave it."""

    def __init__(self, runtime: Runtime) -> None:
        super().__init__()
        self.runtime = runtime

    def _update_batch(self, object_type: str, updates: Sequence[RecordUpdate]) -> list[UpdateResult]:
        with transaction(self.runtime.sessions) as session:
            row = session.scalars(select(OutboxUpdate).where(OutboxUpdate.record_id == "D-1")).one()
            row.status, row.batch_id = "pending", None
        return super()._update_batch(object_type, updates)


def test_a_row_settled_meanwhile_is_not_marked_done_nor_sent_again_in_the_flush(either: Runtime) -> None:
    crm = _RecoveredMeanwhile(either)
    for i in range(3):
        enqueue(either, f"D-{i}", {"Status": "Approved"})
    report = flush(either.sessions, lambda _name: crm)
    assert report.done == 3  # the CRM took all three
    assert len(crm.update_calls) == 1  # D-1, pending again, waits for the next flush
    with either.sessions() as session:
        rows = {row.record_id: row.status for row in session.scalars(select(OutboxUpdate))}
    assert rows == {"D-0": "done", "D-1": "pending", "D-2": "done"}
