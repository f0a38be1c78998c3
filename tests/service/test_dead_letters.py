"""Dead letters and replay (connector/service/dead_letters.py): listing with filters, retry
that sends a refused write-back exactly once, inbox retries and replays that never open
anything twice, discard, and the WARNING line each new dead letter gets."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from itertools import count
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from connector.clock import utcnow
from connector.config import Settings
from connector.events import RecordChangeEvent
from connector.rules import MappingSet
from connector.runtime import Runtime
from connector.service import dead_letters as service
from connector.service.pipeline import Pipeline
from connector.storage.approval_store import RecordKey
from connector.storage.db import transaction
from connector.storage.dead_letters import DeadLetterFilter
from connector.storage.inbox import accept, process_pending
from connector.storage.models import ApprovalRequestRow, DeadLetter, InboxEvent, OutboxUpdate
from connector.storage.outbox import enqueue_update, flush
from tests.fakes import MemoryCRM

DATA = Path(__file__).parents[1] / "data" / "pipeline"
DEAL = {
    "amount": 150000,
    "stage": "negotiation",
    "owner_id": "u-rep",
    "owner_manager_id": "u-mgr",
    "company.credit_score": 80,
    "approval_status": None,
    "approval_expires_on": None,
    "approval_comment": None,
}
_ids = count()


@pytest.fixture
def world(tmp_path: Path, runtime_factory: Callable[[Settings], Runtime], settings_factory: Any) -> Any:
    mappings_dir = tmp_path / "mappings"
    shutil.copytree(DATA, mappings_dir)
    runtime = runtime_factory(settings_factory(mappings_dir=str(mappings_dir)))
    crm = MemoryCRM(records={"D-1": dict(DEAL)})
    runtime.set_adapter("sandbox", crm)
    pipeline = Pipeline(runtime, MappingSet.load(mappings_dir))
    runtime.processor = pipeline
    return runtime, crm, pipeline


def enqueue(runtime: Runtime, record_id: str, fields: dict[str, Any], object_type: str = "deal") -> int:
    with transaction(runtime.sessions) as session:
        row = enqueue_update(session, "sandbox", object_type, record_id, fields, reason="request r1: approve")
        assert row is not None
        return row.id


def letters(runtime: Runtime) -> list[DeadLetter]:
    with runtime.sessions() as session:
        return list(session.scalars(select(DeadLetter).order_by(DeadLetter.id)))


def refused_write_back(runtime: Runtime, crm: MemoryCRM, record_id: str = "D-2") -> DeadLetter:
    crm.reject[record_id] = "FIELD_CUSTOM_VALIDATION_EXCEPTION"
    enqueue(runtime, record_id, {"approval_status": "Approved"})
    assert flush(runtime.sessions, runtime.adapter).dead == 1
    return letters(runtime)[-1]


def event(values: dict[str, Any] | None, changed: tuple[str, ...] = ("amount",)) -> RecordChangeEvent:
    n = next(_ids)
    return RecordChangeEvent(
        source="sandbox",
        connection="sandbox",
        object_type="deal",
        record_id="D-1",
        event_id=f"dl{n}",
        occurred_at=datetime.now(UTC),
        dedupe_key=f"sandbox:dl:{n}",
        changed_fields=changed,
        values=values,
    )


def deliver(runtime: Runtime, values: dict[str, Any]) -> int:
    e = event(values)
    accept(runtime.sessions, [e])
    assert runtime.processor is not None
    process_pending(runtime.sessions, runtime.processor)
    with runtime.sessions() as session:
        return session.scalars(select(InboxEvent.id).where(InboxEvent.dedupe_key == e.dedupe_key)).one()


def inbox_row(runtime: Runtime, event_id: int) -> InboxEvent:
    with runtime.sessions() as session:
        row = session.get(InboxEvent, event_id)
        assert row is not None
        return row


def requests(runtime: Runtime) -> list[ApprovalRequestRow]:
    with runtime.sessions() as session:
        return list(session.scalars(select(ApprovalRequestRow).order_by(ApprovalRequestRow.submitted_at)))


# --- outbox dead letters -------------------------------------------------------------------


def test_a_refused_write_back_is_logged_at_warning_with_the_crm_message(
    world: Any, caplog: pytest.LogCaptureFixture
) -> None:
    runtime, crm, _ = world
    with caplog.at_level(logging.WARNING):
        letter = refused_write_back(runtime, crm)
    [line] = [r for r in caplog.records if getattr(r, "event", None) == "dead_letter"]
    assert line.levelno == logging.WARNING
    assert "FIELD_CUSTOM_VALIDATION_EXCEPTION on D-2" in line.getMessage()  # the CRM's own words
    assert f"dead letter {letter.id}" in line.getMessage() and "sandbox:deal:D-2" in line.getMessage()
    assert line.event_fields["dead_letter_id"] == letter.id  # type: ignore[attr-defined]


def test_retry_after_the_crm_is_fixed_sends_the_write_back_exactly_once(world: Any) -> None:
    runtime, crm, _ = world
    letter = refused_write_back(runtime, crm)
    crm.reject.clear()  # the CRM's validation rule was fixed
    calls_before = len(crm.update_calls)

    [action] = service.retry(runtime.sessions, DeadLetterFilter(ids=(letter.id,)))
    assert (action.action, action.kind, action.record) == ("requeued", "outbox", "sandbox:deal:D-2")
    assert "approval_status = 'Approved'" in action.detail
    # Retrying again, by id or by a filter, queues nothing more.
    [again] = service.retry(runtime.sessions, DeadLetterFilter(ids=(letter.id,)))
    assert again.action == "skipped" and "already resolved (retried" in again.detail
    assert service.retry(runtime.sessions, DeadLetterFilter(code="FIELD_CUSTOM_VALIDATION_EXCEPTION")) == []

    assert flush(runtime.sessions, runtime.adapter).done == 1
    flush(runtime.sessions, runtime.adapter)
    sent = [u for call in crm.update_calls[calls_before:] for u in call]
    assert [(u.record_id, dict(u.fields)) for u in sent] == [("D-2", {"approval_status": "Approved"})]
    assert crm.records["D-2"] == {"approval_status": "Approved"}
    [resolved] = letters(runtime)
    assert resolved.resolution == "retried" and resolved.resolved_at is not None
    with runtime.sessions() as session:
        row = session.get(OutboxUpdate, action.outbox_id)
        assert row is not None and row.idempotency_key == f"dead-letter:{letter.id}"
        assert row.reason == "retry of dead letter 1: request r1: approve"


def test_a_retry_refused_again_makes_a_new_dead_letter(world: Any) -> None:
    runtime, crm, _ = world
    letter = refused_write_back(runtime, crm)
    service.retry(runtime.sessions, DeadLetterFilter(ids=(letter.id,)))
    flush(runtime.sessions, runtime.adapter)
    first, second = letters(runtime)
    assert first.resolution == "retried" and second.resolved_at is None
    assert second.error_code == "FIELD_CUSTOM_VALIDATION_EXCEPTION"


def test_retry_leaves_out_fields_a_later_write_back_has_set(world: Any) -> None:
    runtime, crm, _ = world
    crm.reject["D-2"] = "FIELD_CUSTOM_VALIDATION_EXCEPTION"
    enqueue(runtime, "D-2", {"approval_status": "Approved", "approval_expires_on": "2027-05-30"})
    flush(runtime.sessions, runtime.adapter)
    crm.reject.clear()
    enqueue(runtime, "D-2", {"approval_status": "Pending"})  # a newer request's submit went out
    flush(runtime.sessions, runtime.adapter)
    [letter] = letters(runtime)

    [planned] = service.retry(runtime.sessions, DeadLetterFilter(ids=(letter.id,)), dry_run=True)
    assert planned.action == "requeued" and "would send approval_expires_on = '2027-05-30'" in planned.detail
    assert "approval_status left out" in planned.detail
    assert letters(runtime)[0].resolved_at is None  # a dry run changes nothing
    service.retry(runtime.sessions, DeadLetterFilter(ids=(letter.id,)))
    flush(runtime.sessions, runtime.adapter)
    assert crm.records["D-2"] == {"approval_status": "Pending", "approval_expires_on": "2027-05-30"}


def test_retry_of_a_fully_superseded_write_back_sends_nothing(world: Any) -> None:
    runtime, crm, _ = world
    letter = refused_write_back(runtime, crm)
    crm.reject.clear()
    enqueue(runtime, "D-2", {"approval_status": "Pending"})
    flush(runtime.sessions, runtime.adapter)
    calls = len(crm.update_calls)
    [action] = service.retry(runtime.sessions, DeadLetterFilter(ids=(letter.id,)))
    assert action.action == "superseded" and action.outbox_id is None
    flush(runtime.sessions, runtime.adapter)
    assert len(crm.update_calls) == calls
    assert letters(runtime)[0].resolution == "superseded"


def test_discard_resolves_without_sending_and_blocks_a_later_retry(world: Any) -> None:
    runtime, crm, _ = world
    letter = refused_write_back(runtime, crm)
    crm.reject.clear()
    [planned] = service.discard(runtime.sessions, DeadLetterFilter(ids=(letter.id,)), dry_run=True)
    assert planned.action == "discarded" and letters(runtime)[0].resolved_at is None
    [done] = service.discard(runtime.sessions, DeadLetterFilter(ids=(letter.id,)))
    assert done.action == "discarded" and letters(runtime)[0].resolution == "discarded"
    [retried] = service.retry(runtime.sessions, DeadLetterFilter(ids=(letter.id,)))
    assert retried.action == "skipped" and "discarded" in retried.detail
    calls = len(crm.update_calls)
    flush(runtime.sessions, runtime.adapter)
    assert len(crm.update_calls) == calls


def test_unknown_ids_are_reported(world: Any) -> None:
    runtime, _, _ = world
    [action] = service.retry(runtime.sessions, DeadLetterFilter(ids=(99,)))
    assert (action.letter_id, action.action, action.detail) == (99, "skipped", "no such dead letter")


def test_list_filters_by_connection_object_code_kind_age_and_state_and_pages(world: Any) -> None:
    runtime, crm, _ = world
    crm.reject.update({"D-2": "FIELD_CUSTOM_VALIDATION_EXCEPTION", "C-1": "INVALID_FIELD"})
    enqueue(runtime, "D-2", {"approval_status": "Approved"})
    enqueue(runtime, "C-1", {"approval_status": "Approved"}, object_type="company")
    flush(runtime.sessions, runtime.adapter)
    d2, c1 = letters(runtime)
    with transaction(runtime.sessions) as session:  # D-2's letter is three hours old
        row = session.get(DeadLetter, d2.id)
        assert row is not None
        row.created_at = utcnow() - timedelta(hours=3)

    def ids(**criteria: Any) -> list[int]:
        return [x.id for x in service.list_letters(runtime.sessions, DeadLetterFilter(**criteria)).items]

    assert ids() == [d2.id, c1.id]
    assert ids(object_type="COMPANY") == [c1.id]
    assert ids(code="field_custom_validation_exception") == [d2.id]
    assert ids(connection="other") == []
    assert ids(kind="inbox") == []
    assert ids(older_than=timedelta(hours=2)) == [d2.id]
    assert ids(newer_than=timedelta(hours=2)) == [c1.id]
    page = service.list_letters(runtime.sessions, DeadLetterFilter(), limit=1, offset=1)
    assert ([x.id for x in page.items], page.total) == ([c1.id], 2)
    service.discard(runtime.sessions, DeadLetterFilter(ids=(d2.id,)))
    assert ids() == [c1.id]
    assert ids(state="resolved") == [d2.id]
    assert ids(state="all") == [d2.id, c1.id]


def test_a_filter_must_be_valid() -> None:
    with pytest.raises(ValueError, match="state must be one of open, resolved, all"):
        DeadLetterFilter(state="closed")
    with pytest.raises(ValueError, match="kind must be one of outbox, inbox"):
        DeadLetterFilter(kind="webhook")
    assert not DeadLetterFilter().narrows and DeadLetterFilter(code="X").narrows


# --- inbox dead letters and replay ---------------------------------------------------------


def test_inbox_dead_letter_retried_after_the_mapping_fix_opens_the_request_once(
    world: Any, tmp_path: Path
) -> None:
    runtime, _, pipeline = world
    event_id = deliver_dead(runtime)
    [letter] = letters(runtime)
    assert letter.kind == "inbox" and letter.ref_id == event_id
    fix_manager_step(tmp_path, pipeline)

    [action] = service.retry(runtime.sessions, DeadLetterFilter(kind="inbox"))
    assert (action.action, action.event_id) == ("requeued", event_id)
    report = service.run_now(runtime, event_ids=[event_id])
    status, result = report.events[event_id]
    assert status == "done" and "big-deal: opened" in (result or "")
    assert [r.status for r in requests(runtime)] == ["pending"]
    assert letters(runtime)[0].resolution == "retried"

    # Again, and as a replay of the same event: nothing new is opened.
    assert service.retry(runtime.sessions, DeadLetterFilter(ids=(letter.id,)))[0].action == "skipped"
    [replayed] = service.replay(runtime.sessions, service.EventSelection(ids=(event_id,)))
    assert replayed.status_before == "done"
    report = service.run_now(runtime, event_ids=[event_id])
    assert "opened since the event; left as it is" in (report.events[event_id][1] or "")
    assert len(requests(runtime)) == 1


def deliver_dead(runtime: Runtime) -> int:
    e = event({**DEAL, "owner_manager_id": None})  # the manager step resolves to nobody
    accept(runtime.sessions, [e])
    assert runtime.processor is not None
    assert process_pending(runtime.sessions, runtime.processor).dead == 1
    with runtime.sessions() as session:
        return session.scalars(select(InboxEvent.id).where(InboxEvent.dedupe_key == e.dedupe_key)).one()


def fix_manager_step(tmp_path: Path, pipeline: Pipeline) -> None:
    """The mapping fix: the manager step falls back to the general manager."""
    mapping = tmp_path / "mappings" / "deals.yaml"
    mapping.write_text(
        mapping.read_text().replace(
            "approvers: [{field: owner_manager}]",
            "approvers: [{field: owner_manager}, {role: general_manager}]",
        )
    )
    pipeline.mappings.reload()


def test_replay_after_a_mapping_fix_opens_what_the_rules_now_say_once(world: Any, tmp_path: Path) -> None:
    runtime, _, pipeline = world
    mapping = tmp_path / "mappings" / "deals.yaml"
    good = mapping.read_text()
    mapping.write_text(good.replace("gt: 100000", "gt: 500000"))  # a wrong threshold went live
    pipeline.mappings.reload()
    event_id = deliver(runtime, dict(DEAL))
    assert inbox_row(runtime, event_id).result == "no rule matched"
    mapping.write_text(good)  # fixed
    pipeline.mappings.reload()

    selection = service.EventSelection(record=RecordKey("sandbox", "DEAL", "D-1"))
    [planned] = service.replay(runtime.sessions, selection, dry_run=True)
    assert (planned.event_id, planned.status_before, planned.result) == (event_id, "done", "no rule matched")
    assert inbox_row(runtime, event_id).status == "done"  # the dry run changed nothing

    service.replay(runtime.sessions, selection)
    row = inbox_row(runtime, event_id)
    assert row.status == "pending" and row.replayed_at is not None
    service.run_now(runtime, event_ids=[event_id])
    assert "big-deal: opened" in (inbox_row(runtime, event_id).result or "")
    assert len(requests(runtime)) == 1

    service.replay(runtime.sessions, selection)
    service.run_now(runtime, event_ids=[event_id])
    assert len(requests(runtime)) == 1  # idempotent


def test_replay_of_an_event_that_already_opened_its_request_changes_nothing(world: Any) -> None:
    runtime, _, _ = world
    event_id = deliver(runtime, dict(DEAL))
    with runtime.sessions() as session:
        outbox_before = len(list(session.scalars(select(OutboxUpdate))))
    service.replay(runtime.sessions, service.EventSelection(ids=(event_id,)))
    service.run_now(runtime, event_ids=[event_id])
    assert len(requests(runtime)) == 1
    with runtime.sessions() as session:
        assert len(list(session.scalars(select(OutboxUpdate)))) == outbox_before


def test_replay_selects_by_time_range_and_status_and_skips_pending(world: Any) -> None:
    runtime, _, _ = world
    early = deliver(runtime, {**DEAL, "amount": 5000})
    late = deliver(runtime, {**DEAL, "amount": 6000})
    with transaction(runtime.sessions) as session:
        row = session.get(InboxEvent, early)
        assert row is not None
        row.received_at = utcnow() - timedelta(days=2)
    accept(runtime.sessions, [event({**DEAL, "amount": 7000})])  # pending: processed anyway

    def chosen(**criteria: Any) -> list[int]:
        selection = service.EventSelection(**criteria)
        return [r.event_id for r in service.replay(runtime.sessions, selection, dry_run=True)]

    assert chosen(since=utcnow() - timedelta(days=1)) == [late]
    assert chosen(until=utcnow() - timedelta(days=1)) == [early]
    assert chosen(since=utcnow() - timedelta(days=3)) == [early, late]
    assert chosen(since=utcnow() - timedelta(days=3), statuses=("dead",)) == []


def test_replaying_a_dead_event_resolves_its_dead_letter(world: Any, tmp_path: Path) -> None:
    runtime, _, pipeline = world
    event_id = deliver_dead(runtime)
    fix_manager_step(tmp_path, pipeline)
    service.replay(runtime.sessions, service.EventSelection(ids=(event_id,), statuses=("dead",)))
    assert letters(runtime)[0].resolution == "retried"
    service.run_now(runtime, event_ids=[event_id])
    assert inbox_row(runtime, event_id).status == "done" and len(requests(runtime)) == 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", timedelta(seconds=90)),
        ("30m", timedelta(minutes=30)),
        ("2h", timedelta(hours=2)),
        ("3d", timedelta(days=3)),
        ("1w", timedelta(weeks=1)),
    ],
)
def test_ages(text: str, expected: timedelta) -> None:
    assert service.parse_age(text) == expected


def test_times_and_records_are_read_or_refused_clearly() -> None:
    now = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    assert service.parse_time("2h", now) == datetime(2026, 11, 30, 10, 0, tzinfo=UTC)
    assert service.parse_time("2026-11-23", now) == datetime(2026, 11, 23, tzinfo=UTC)
    assert service.parse_time("2026-11-23T10:00:00+01:00", now) == datetime(2026, 11, 23, 9, tzinfo=UTC)
    with pytest.raises(ValueError, match="is not an ISO date or time"):
        service.parse_time("yesterday", now)
    with pytest.raises(ValueError, match=r"is not an age such as 90s, 30m"):
        service.parse_age("2 months")
    assert service.parse_record("sandbox:deal:D:1") == RecordKey("sandbox", "deal", "D:1")
    with pytest.raises(ValueError, match="CONNECTION:OBJECT:ID"):
        service.parse_record("D-1")


def test_replay_does_not_reopen_a_request_that_was_rejected_since(world: Any) -> None:
    runtime, _, pipeline = world
    event_id = deliver(runtime, dict(DEAL))
    [request] = requests(runtime)
    pipeline.approvals.vote(
        runtime.sessions, request.id, user="u-mgr", decision="reject", step_index=0, comment="Too risky"
    )
    service.replay(runtime.sessions, service.EventSelection(ids=(event_id,)))
    report = service.run_now(runtime, event_ids=[event_id])
    assert "left as it is" in (report.events[event_id][1] or "")
    assert [r.status for r in requests(runtime)] == ["rejected"]
