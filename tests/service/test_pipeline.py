"""The worker pipeline: webhook event -> rules -> approval request -> write-back, with
echoes of our own write-back ignored and the record's last-seen values remembered."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from itertools import count
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from connector.config import Settings
from connector.events import RecordChangeEvent
from connector.rules import MappingSet
from connector.runtime import Runtime
from connector.service.approval_service import ApprovalService
from connector.service.pipeline import effective_changes
from connector.storage.inbox import accept, process_pending
from connector.storage.models import AuditEntry, DeadLetter, InboxEvent, OutboxUpdate
from connector.storage.outbox import flush
from connector.wiring import attach_pipeline
from tests.fakes import MemoryCRM

DATA = Path(__file__).parents[1] / "data" / "pipeline"
_ids = count()

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


@pytest.fixture
def world(tmp_path: Path, runtime_factory: Callable[[Settings], Runtime], settings_factory: Any) -> Any:
    mappings_dir = tmp_path / "mappings"
    shutil.copytree(DATA, mappings_dir)
    runtime = runtime_factory(settings_factory(mappings_dir=str(mappings_dir)))
    crm = MemoryCRM(records={"D-1": dict(DEAL)})
    runtime.set_adapter("sandbox", crm)
    pipeline = attach_pipeline(runtime, MappingSet.load(mappings_dir))
    return runtime, crm, pipeline


def change(
    changed: tuple[str, ...], values: dict[str, Any] | None, origin: str | None = None
) -> RecordChangeEvent:
    n = next(_ids)
    return RecordChangeEvent(
        source="sandbox",
        connection="sandbox",
        object_type="deal",
        record_id="D-1",
        event_id=f"m{n}",
        occurred_at=datetime.now(UTC),
        dedupe_key=f"sandbox:test:{n}",
        changed_fields=changed,
        values=values,
        origin=origin,
    )


def deliver(
    runtime: Runtime, changed: tuple[str, ...], values: dict[str, Any] | None, origin: str | None = None
) -> str:
    event = change(changed, values, origin)
    accept(runtime.sessions, [event])
    assert runtime.processor is not None
    process_pending(runtime.sessions, runtime.processor)
    with runtime.sessions() as session:
        row = session.scalars(select(InboxEvent).where(InboxEvent.event_id == event.event_id)).one()
        assert row.status == "done", row.last_error
        return row.result or ""


def outbox_fields(runtime: Runtime) -> list[dict[str, Any]]:
    with runtime.sessions() as session:
        return [r.fields for r in session.scalars(select(OutboxUpdate).order_by(OutboxUpdate.id))]


def test_matching_change_opens_a_request_and_queues_the_submit_action(world: Any) -> None:
    runtime, crm, _ = world
    result = deliver(runtime, ("amount",), dict(DEAL))
    assert "big-deal: opened" in result
    assert outbox_fields(runtime) == [{"approval_status": "Pending"}]
    assert crm.reads == 0  # the webhook carried every mapped field


def test_missing_fields_are_fetched_from_the_crm(world: Any) -> None:
    runtime, crm, _ = world
    result = deliver(runtime, ("amount",), {"amount": 150000})
    assert crm.reads == 1
    assert "opened" in result


def test_non_matching_change_opens_nothing(world: Any) -> None:
    runtime, _, _ = world
    assert deliver(runtime, ("amount",), {**DEAL, "amount": 5000}) == "no rule matched"
    assert outbox_fields(runtime) == []


def test_re_edit_while_pending_does_not_open_a_second_request(world: Any) -> None:
    runtime, _, _ = world
    deliver(runtime, ("amount",), dict(DEAL))
    result = deliver(runtime, ("stage",), {**DEAL, "stage": "proposal"})
    assert "already pending" in result
    assert len(outbox_fields(runtime)) == 1


def test_change_of_a_restart_field_restarts_the_pending_request(world: Any) -> None:
    runtime, _, _ = world
    deliver(runtime, ("amount",), dict(DEAL))
    result = deliver(runtime, ("amount",), {**DEAL, "amount": 250000})
    assert "restarted" in result
    assert outbox_fields(runtime) == [{"approval_status": "Pending"}, {"approval_status": "Pending"}]


def test_echo_of_our_own_write_back_is_ignored(world: Any) -> None:
    runtime, crm, _ = world
    deliver(runtime, ("amount",), dict(DEAL))
    flush(runtime.sessions, runtime.adapter)
    assert crm.records["D-1"]["approval_status"] == "Pending"
    # The CRM tells us about the change we just made, without saying who made it.
    result = deliver(runtime, ("approval_status",), {**DEAL, "approval_status": "Pending"})
    assert result == "echo of our own write-back; ignored"
    with runtime.sessions() as session:
        kinds = [a.kind for a in session.scalars(select(AuditEntry))]
    assert "echo_ignored" in kinds


def test_adapter_verdict_on_origin_wins(world: Any) -> None:
    runtime, _, _ = world
    runtime.set_adapter("sandbox", OriginAwareCRM(records={"D-1": dict(DEAL)}))
    assert deliver(runtime, ("amount",), dict(DEAL), origin="api") == "echo of our own write-back; ignored"
    assert "opened" in deliver(runtime, ("amount",), {**DEAL, "amount": 150001}, origin="user")


class OriginAwareCRM(MemoryCRM):
    def is_own_change(self, event: RecordChangeEvent) -> bool | None:
        return {"api": True, "user": False}.get(event.origin or "")


def test_a_person_changing_a_field_we_wrote_is_not_an_echo(world: Any) -> None:
    runtime, _, _ = world
    deliver(runtime, ("amount",), dict(DEAL))
    flush(runtime.sessions, runtime.adapter)
    result = deliver(
        runtime, ("approval_status",), {**DEAL, "approval_status": "Approved"}
    )  # typed by a person
    assert "echo" not in result


def test_redelivered_values_with_nothing_changed_do_nothing(world: Any) -> None:
    runtime, _, _ = world
    deliver(runtime, ("amount",), dict(DEAL))
    assert deliver(runtime, ("amount",), dict(DEAL)) == "no field changed since last seen"


def test_changed_from_sees_the_last_seen_value(world: Any) -> None:
    assert effective_changes(
        ("amount", "stage"), {"amount": 2, "stage": "a"}, {"amount": 1, "stage": "a"}
    ) == {"amount"}
    assert effective_changes((), {"amount": 2, "stage": "a"}, {"amount": 1, "stage": "a"}) == {"amount"}
    assert effective_changes(("amount",), {"amount": 2}, None) == {"amount"}


def approve_all(runtime: Runtime, service: ApprovalService, request_id: str) -> None:
    for step_index, user in ((0, "u-mgr"), (1, "u-gm")):
        service.vote(runtime.sessions, request_id, user=user, decision="approve", step_index=step_index)


def opened_request_id(runtime: Runtime) -> str:
    with runtime.sessions() as session:
        entry = session.scalars(select(AuditEntry).where(AuditEntry.kind == "rule_matched")).first()
        assert entry is not None and entry.mapping_hash
        return session.scalars(
            select(AuditEntry.request_id).where(AuditEntry.kind == "transition").limit(1)
        ).one()  # type: ignore[return-value]


def test_approval_writes_status_and_expiry_then_the_sweep_expires_it(world: Any) -> None:
    runtime, crm, pipeline = world
    deliver(runtime, ("amount",), dict(DEAL))
    request_id = opened_request_id(runtime)
    approve_all(runtime, pipeline.approvals, request_id)
    flush(runtime.sessions, runtime.adapter)
    expected_expiry = (datetime.now(UTC).date() + timedelta(days=180)).isoformat()
    assert crm.records["D-1"]["approval_status"] == "Approved"
    assert crm.records["D-1"]["approval_expires_on"] == expected_expiry
    assert len(crm.update_calls) == 1  # Pending and Approved merged into one request

    assert pipeline.approvals.expire_due(runtime.sessions) == 0  # not yet
    pipeline.approvals.clock = lambda: datetime.now(UTC) + timedelta(days=181)
    assert pipeline.approvals.expire_due(runtime.sessions) == 1
    assert pipeline.approvals.expire_due(runtime.sessions) == 0  # idempotent
    flush(runtime.sessions, runtime.adapter)
    assert crm.records["D-1"]["approval_status"] == "Expired"
    assert crm.records["D-1"]["approval_expires_on"] is None


def test_approved_record_is_not_reapproved_until_a_restart_field_changes(world: Any) -> None:
    runtime, _, pipeline = world
    deliver(runtime, ("amount",), dict(DEAL))
    approve_all(runtime, pipeline.approvals, opened_request_id(runtime))
    assert "already approved" in deliver(runtime, ("stage",), {**DEAL, "stage": "proposal"})
    assert "opened" in deliver(runtime, ("amount",), {**DEAL, "stage": "proposal", "amount": 900000})


def test_nobody_to_approve_dead_letters_the_event_with_the_reason(world: Any) -> None:
    runtime, _, _ = world
    event = change(("amount",), {**DEAL, "owner_manager_id": None})
    accept(runtime.sessions, [event])
    assert process_pending(runtime.sessions, runtime.processor).dead == 1
    with runtime.sessions() as session:
        letter = session.scalars(select(DeadLetter)).one()
    assert "manager" in letter.error_message and "deals.yaml" in letter.error_message
    assert outbox_fields(runtime) == []  # nothing half-written


def test_edited_mapping_is_picked_up_and_a_broken_edit_keeps_the_last_good_set(
    world: Any, tmp_path: Path
) -> None:
    runtime, _, pipeline = world
    mapping = tmp_path / "mappings" / "deals.yaml"
    good = mapping.read_text()
    mapping.write_text(good.replace("gt: 100000", "gt: 500000"))
    pipeline.mappings._checked_at = 0.0  # skip the 2-second check interval
    assert deliver(runtime, ("amount",), dict(DEAL)) == "no rule matched"  # 150,000 is now below the bar

    mapping.write_text(good.replace("gt: 500000", "gtt: 500000").replace("gt: 100000", "gtt: 100000"))
    pipeline.mappings._checked_at = 0.0
    assert deliver(runtime, ("amount",), {**DEAL, "amount": 600000}).startswith("big-deal: opened")
    assert pipeline.mappings.errors and "gtt" in str(pipeline.mappings.errors[0])


def test_healthz_reports_mapping_errors(world: Any, tmp_path: Path, app_factory: Any) -> None:
    runtime, _, pipeline = world
    (tmp_path / "mappings" / "deals.yaml").write_text("connection: sandbox\nobject: deal\nrulez: []\n")
    pipeline.mappings.reload()
    body = app_factory(runtime).test_client().get("/healthz").get_json()
    assert body["status"] == "ok"
    assert any("rulez" in e for e in body["mapping_errors"])
