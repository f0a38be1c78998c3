"""Issue 11 items 4-6 through the worker pipeline: votes cast from a CRM field (by the
right and the wrong user), locked fields (revert and flag), smart re-approval after a
restart and after a rejected record is resubmitted."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from itertools import count
from pathlib import Path
from typing import Any, ClassVar

import pytest
from sqlalchemy import select

from connector.config import Settings
from connector.events import RecordChangeEvent
from connector.rules import MappingSet
from connector.runtime import Runtime
from connector.storage import approval_store as store
from connector.storage.approval_store import RecordKey, StoredRequest
from connector.storage.inbox import accept, process_pending
from connector.storage.models import InboxEvent, OutboxUpdate
from connector.storage.outbox import flush
from connector.storage.tokens import create_token
from connector.wiring import attach_pipeline
from tests.fakes import MemoryCRM
from tests.web.helpers import SECRET

MAPPING = Path(__file__).parents[1] / "data" / "pending" / "deals.yaml"
RECORD = RecordKey("sandbox", "deal", "D-1")
_ids = count()

DEAL = {
    "amount": 60000,
    "region": "EU",
    "stage": "negotiation",
    "owner_id": "u-rep",
    "owner_manager_id": "u-mgr",
    "approval_decision": None,
    "approval_decision_comment": None,
    "approval_status": None,
    "modified_by": "u-rep",
}


class ModifierCRM(MemoryCRM):
    """A CRM keeping who changed a record last, as Salesforce's LastModifiedById does."""

    last_modified_by_field: ClassVar[str | None] = "modified_by"


@pytest.fixture
def make_world(
    tmp_path: Path, runtime_factory: Callable[[Settings], Runtime], settings_factory: Any
) -> Callable[..., Any]:
    def make(lock_mode: str = "revert", when: str = "{amount: {gt: 1000}}") -> Any:
        mappings_dir = tmp_path / "mappings"
        mappings_dir.mkdir()
        text = MAPPING.read_text().replace("mode: revert}", f"mode: {lock_mode}}}")
        text = text.replace("when: {amount: {gt: 1000}}", f"when: {when}")
        (mappings_dir / "deals.yaml").write_text(text)
        settings = settings_factory(
            mappings_dir=str(mappings_dir), admin_users=("u-admin",), secret_key=SECRET
        )
        runtime = runtime_factory(settings)
        crm = ModifierCRM(records={"D-1": dict(DEAL)})
        runtime.set_adapter("sandbox", crm)
        pipeline = attach_pipeline(runtime, MappingSet.load(mappings_dir))
        return runtime, crm, pipeline

    return make


@pytest.fixture
def world(make_world: Callable[..., Any]) -> Any:
    return make_world()


def edit(runtime: Runtime, crm: ModifierCRM, by: str | None, signed: bool = True, **fields: Any) -> str:
    """A user edits the record in the CRM; the CRM sends the change (naming the user when
    `signed`; an unsigned delivery makes the worker read the record, modified_by included)."""
    record = crm.records["D-1"]
    record.update(fields)
    record["modified_by"] = by
    n = next(_ids)
    event = RecordChangeEvent(
        source="sandbox",
        connection="sandbox",
        object_type="deal",
        record_id="D-1",
        event_id=f"e{n}",
        occurred_at=datetime.now(UTC),
        dedupe_key=f"sandbox:pending:{n}",
        changed_fields=tuple(fields),
        values=dict(record) if signed else {k: record[k] for k in fields},
        values_signed=signed,
        modified_by=by if signed else None,
    )
    accept(runtime.sessions, [event])
    assert runtime.processor is not None
    process_pending(runtime.sessions, runtime.processor)
    with runtime.sessions() as session:
        row = session.scalars(select(InboxEvent).where(InboxEvent.event_id == event.event_id)).one()
        assert row.status == "done", row.last_error
        return row.result or ""


def latest(runtime: Runtime) -> StoredRequest:
    with runtime.sessions() as session:
        found = store.find_latest(session, RECORD, "big-deal")
    assert found is not None
    return found


def history(runtime: Runtime) -> list[tuple[str, int | None, str | None]]:
    return [(t.kind, t.step_index, t.actor) for t in latest(runtime).request.transitions]


def comments(runtime: Runtime, kind: str) -> list[str]:
    return [t.comment or "" for t in latest(runtime).request.transitions if t.kind == kind]


def outbox(runtime: Runtime) -> list[dict[str, Any]]:
    with runtime.sessions() as session:
        return [r.fields for r in session.scalars(select(OutboxUpdate).order_by(OutboxUpdate.id))]


def vote(
    pipeline: Any, runtime: Runtime, user: str, decision: str = "approve", comment: str | None = None
) -> None:
    request_id = latest(runtime).request.id
    pipeline.approvals.vote(runtime.sessions, request_id, user=user, decision=decision, comment=comment)


def open_request(runtime: Runtime, crm: ModifierCRM) -> StoredRequest:
    assert "opened" in edit(runtime, crm, "u-rep", amount=60000)
    stored = latest(runtime)
    assert stored.request.current_step == 0  # legal
    return stored


# --- item 4: voting from inside the CRM -------------------------------------------------


def test_the_current_approver_votes_by_setting_the_decision_field(world: Any) -> None:
    runtime, crm, _ = world
    open_request(runtime, crm)
    result = edit(runtime, crm, "u-legal", approval_decision="Approved", approval_decision_comment="fine")
    assert "vote from the CRM by u-legal" in result
    request = latest(runtime).request
    [cast] = request.votes
    assert (cast.approver, cast.decision, cast.comment, cast.step_index) == ("u-legal", "approve", "fine", 0)
    assert request.current_step == 1  # finance opened
    # The decision and comment fields are cleared through the outbox, ready for the next step.
    assert outbox(runtime)[-1] == {"approval_decision": None, "approval_decision_comment": None}
    flush(runtime.sessions, runtime.adapter)
    assert crm.records["D-1"]["approval_decision"] is None


def test_the_voter_is_who_the_crm_says_changed_the_record_read_when_unsigned(world: Any) -> None:
    runtime, crm, _ = world
    open_request(runtime, crm)
    reads = crm.reads
    edit(runtime, crm, "u-legal", signed=False, approval_decision="Approve")
    assert crm.reads == reads + 1  # modified_by read from the record, not taken from the delivery
    assert [v.approver for v in latest(runtime).request.votes] == ["u-legal"]


def test_a_decision_set_by_someone_else_is_reverted_and_flagged(world: Any) -> None:
    runtime, crm, _ = world
    open_request(runtime, crm)
    # The comment names the approver, but a colleague made the change: no vote, whatever the fields say.
    result = edit(
        runtime, crm, "u-colleague", approval_decision="Approve", approval_decision_comment="u-legal ok"
    )
    assert "CRM vote refused" in result
    request = latest(runtime).request
    assert request.votes == [] and request.current_step == 0
    assert history(runtime)[-1] == ("crm_vote_refused", 0, "u-colleague")
    [note] = comments(runtime, "crm_vote_refused")
    assert "u-colleague set decision = 'Approve'" in note and "not an approver" in note
    assert outbox(runtime)[-1] == {"approval_decision": None, "approval_decision_comment": None}
    flush(runtime.sessions, runtime.adapter)
    assert crm.records["D-1"]["approval_decision"] is None


def test_the_submitter_cannot_vote_on_their_own_request_from_the_crm(world: Any) -> None:
    runtime, crm, pipeline = world
    open_request(runtime, crm)
    vote(pipeline, runtime, "u-legal")
    vote(pipeline, runtime, "u-fin")
    assert latest(runtime).request.current_step == 2  # manager: u-mgr
    edit(runtime, crm, "u-rep", approval_decision="Approve")
    assert latest(runtime).request.current_step == 2
    assert "submitted this request" in comments(runtime, "crm_vote_refused")[-1]


def test_an_unknown_decision_value_is_flagged_and_cleared_not_an_error(world: Any) -> None:
    runtime, crm, _ = world
    open_request(runtime, crm)
    edit(runtime, crm, "u-legal", approval_decision="Maybe")
    assert latest(runtime).request.votes == []
    [note] = comments(runtime, "crm_vote_refused")
    assert "'Maybe' is not a decision" in note and "'Approve' or 'Approved' or 'Reject'" in note
    assert outbox(runtime)[-1] == {"approval_decision": None, "approval_decision_comment": None}


def test_a_rejection_from_the_crm_needs_the_comment_the_rule_asks_for(world: Any) -> None:
    runtime, crm, _ = world
    open_request(runtime, crm)
    edit(runtime, crm, "u-legal", approval_decision="reject")
    assert latest(runtime).request.status == "pending"
    assert "needs a comment" in comments(runtime, "crm_vote_refused")[-1]
    crm.records["D-1"]["approval_decision"] = None  # the write-back reverted it
    edit(runtime, crm, "u-legal", approval_decision="Reject", approval_decision_comment="no DPA")
    request = latest(runtime).request
    assert request.status == "rejected" and request.votes[-1].comment == "no DPA"


def test_clearing_the_decision_field_is_no_vote(world: Any) -> None:
    runtime, crm, _ = world
    open_request(runtime, crm)
    edit(runtime, crm, "u-legal", approval_decision="Approve")
    before = len(latest(runtime).request.transitions)
    edit(runtime, crm, "u-legal", approval_decision="")
    assert len(latest(runtime).request.transitions) == before


# --- item 5: record locking ---------------------------------------------------------------


def test_revert_lock_writes_back_the_value_the_request_was_opened_with(world: Any) -> None:
    runtime, crm, _ = world
    open_request(runtime, crm)
    result = edit(runtime, crm, "u-rep", stage="closing")
    assert "locked field edit reverted" in result
    assert outbox(runtime)[-1] == {"stage": "negotiation"}
    [note] = comments(runtime, "lock_reverted")
    assert "stage: 'negotiation' -> 'closing'" in note and "u-rep" in note
    flush(runtime.sessions, runtime.adapter)
    assert crm.records["D-1"]["stage"] == "negotiation"
    assert latest(runtime).request.status == "pending"


def test_a_locked_edit_that_makes_the_rule_stop_matching_is_still_reverted(
    make_world: Callable[..., Any],
) -> None:
    runtime, crm, _ = make_world(when="{all: [{amount: {gt: 1000}}, {not: {stage: {eq: lost}}}]}")
    open_request(runtime, crm)
    result = edit(runtime, crm, "u-rep", stage="lost")
    assert "locked field edit reverted" in result
    assert outbox(runtime)[-1] == {"stage": "negotiation"}
    assert latest(runtime).request.status == "pending"


def test_admins_may_edit_locked_fields(world: Any) -> None:
    runtime, crm, _ = world
    open_request(runtime, crm)
    writes = len(outbox(runtime))
    assert "already pending" in edit(runtime, crm, "u-admin", stage="closing")
    assert len(outbox(runtime)) == writes and comments(runtime, "lock_reverted") == []


def test_a_locked_restart_field_restarts_instead_of_reverting(world: Any) -> None:
    runtime, crm, _ = world
    open_request(runtime, crm)
    assert "restarted" in edit(runtime, crm, "u-rep", amount=70000)
    assert comments(runtime, "lock_reverted") == []
    assert {"amount": 60000} not in outbox(runtime)


def test_flag_lock_records_the_edit_for_the_approvers(
    make_world: Callable[..., Any], app_factory: Any
) -> None:
    runtime, crm, _ = make_world("flag")
    stored = open_request(runtime, crm)
    writes = len(outbox(runtime))
    assert "locked field edit flagged" in edit(runtime, crm, "u-rep", stage="closing")
    assert len(outbox(runtime)) == writes  # the CRM keeps the edit
    [note] = comments(runtime, "lock_flagged")
    assert "stage: 'negotiation' -> 'closing'" in note and "shown to the approvers" in note
    # A redelivery or a later unrelated edit does not flag the same edit again.
    edit(runtime, crm, "u-rep", owner_id="u-rep")
    assert len(comments(runtime, "lock_flagged")) == 1
    # The API's request view shows it to the approver.
    client = app_factory(runtime).test_client()
    token = runtime_token(runtime, "u-legal")
    body = client.get(f"/api/v1/requests/{stored.request.id}", headers={"Authorization": f"Bearer {token}"})
    assert body.status_code == 200, body.data
    detail = body.get_json()
    assert "lock_flagged" in [t["kind"] for t in detail["transitions"]]
    assert [f["comment"] for f in detail["flags"]] == [note]
    # And the web request page, above the record, for the approver to read before deciding.
    page = client_as(app_factory(runtime), "u-legal").get(f"/app/requests/{stored.request.id}")
    html = page.get_data(as_text=True)
    assert page.status_code == 200
    flags = html[html.index('id="flags-h"') : html.index('id="record-h"')]
    assert "Locked field edited while pending" in flags and "negotiation" in flags and "closing" in flags


def client_as(app: Any, user: str) -> Any:
    client = app.test_client()
    with client.session_transaction() as session:
        session["uid"] = user
    return client


def runtime_token(runtime: Runtime, user: str) -> str:
    with runtime.sessions.begin() as session:
        return create_token(session, user)[1]


# --- item 6: smart re-approval ------------------------------------------------------------


def test_restart_keeps_the_approval_of_steps_whose_inputs_did_not_change(world: Any) -> None:
    runtime, crm, pipeline = world
    open_request(runtime, crm)
    vote(pipeline, runtime, "u-legal")
    vote(pipeline, runtime, "u-fin")
    assert latest(runtime).request.current_step == 2
    # The amount is read by finance's criteria only: legal keeps its approval, finance is asked again.
    assert "restarted" in edit(runtime, crm, "u-rep", amount=80000)
    request = latest(runtime).request
    tail = history(runtime)[-3:]
    assert tail == [("restarted", None, None), ("carried_over", 0, None), ("entered", 1, None)]
    [why] = comments(runtime, "carried_over")
    assert "approved by u-legal" in why and "unchanged inputs: region" in why
    assert request.current_step == 1
    vote(pipeline, runtime, "u-fin")
    assert latest(runtime).request.current_step == 2  # the manager never voted: asked as before


def test_an_approved_step_whose_input_changed_is_not_carried_over(world: Any) -> None:
    runtime, crm, pipeline = world
    open_request(runtime, crm)
    vote(pipeline, runtime, "u-legal")
    edit(runtime, crm, "u-rep", region="DE")  # legal's criteria read the region: it no longer applies
    assert comments(runtime, "carried_over") == []
    assert history(runtime)[-3:] == [("restarted", None, None), ("skipped", 0, None), ("entered", 1, None)]


def test_a_resubmitted_rejected_record_keeps_the_unchanged_approvals(world: Any) -> None:
    runtime, crm, pipeline = world
    open_request(runtime, crm)
    vote(pipeline, runtime, "u-legal")
    vote(pipeline, runtime, "u-fin")
    vote(pipeline, runtime, "u-mgr", decision="reject", comment="discount too deep")
    rejected = latest(runtime).request
    assert rejected.status == "rejected"
    # The rep resubmits without touching any step's inputs: legal and finance keep their approvals.
    assert "opened" in edit(runtime, crm, "u-rep", stage="proposal")
    request = latest(runtime).request
    assert request.id != rejected.id
    assert [(k, i) for k, i, _ in history(runtime)] == [
        ("submitted", None),
        ("carried_over", 0),
        ("carried_over", 1),
        ("entered", 2),
    ]
    assert all(rejected.id in why for why in comments(runtime, "carried_over"))


def test_without_smart_reapproval_a_restart_asks_everyone(
    make_world: Callable[..., Any], tmp_path: Path
) -> None:
    runtime, crm, pipeline = make_world()
    path = tmp_path / "mappings" / "deals.yaml"
    path.write_text(path.read_text().replace("smart_reapproval: true", "smart_reapproval: false"))
    pipeline.mappings.reload()
    open_request(runtime, crm)
    vote(pipeline, runtime, "u-legal")
    edit(runtime, crm, "u-rep", amount=80000)
    assert comments(runtime, "carried_over") == []
    assert latest(runtime).request.current_step == 0
