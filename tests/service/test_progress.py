"""Progress in the CRM (issue 10, item 6): the shipped sandbox example writes where a request
waits, with the approvers' names from the directory and the latest comment, clears both when
it stops waiting, and the submitter is who made the change when the CRM says so."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from itertools import count
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from connector.config import Settings
from connector.crm.base import CRMUser
from connector.directory import Directory
from connector.events import RecordChangeEvent
from connector.rules import MappingSet
from connector.runtime import Runtime
from connector.sandbox.seed import USERS
from connector.service.pipeline import Pipeline
from connector.storage.db import transaction
from connector.storage.inbox import accept, process_pending
from connector.storage.models import ApprovalRequestRow, OutboxUpdate

REPO = Path(__file__).resolve().parents[2]
_ids = count()
DEAL = {
    "name": "Contoso POS refresh",
    "amount": 150000,
    "currency": "GBP",
    "stage": "Proposal",
    "owner_id": "u-rep-felix",
    "owner_manager_id": "u-mgr-boris",
    "company.name": "Contoso Retail Ltd",
    "company.credit_score": 64,
    "product_lines": ["Hardware"],
    "term_months": 12,
    "close_date": "2026-12-31",
    "approval_status": None,
    "approval_expires_on": None,
    "approval_comment": "Non-valid company: old rejection",
    "approval_progress": None,
    "approval_decision": None,  # the example's crm_vote fields
    "approval_decision_comment": None,
}


class Sandbox:
    def __init__(self, runtime: Runtime, pipeline: Pipeline) -> None:
        self.runtime, self.pipeline = runtime, pipeline

    def edit(self, **values: Any) -> None:
        n = next(_ids)
        event = RecordChangeEvent(
            source="sandbox", connection="sandbox", object_type="deal", record_id="D-1002", event_id=f"e{n}",
            occurred_at=datetime.now(UTC), dedupe_key=f"progress:{n}", changed_fields=tuple(values),
            values={**DEAL, **values}, origin="user",
        )  # fmt: skip
        accept(self.runtime.sessions, [event])
        process_pending(self.runtime.sessions, self.pipeline)

    def request(self) -> ApprovalRequestRow:
        with self.runtime.sessions() as session:
            return session.scalars(
                select(ApprovalRequestRow).order_by(ApprovalRequestRow.submitted_at)
            ).all()[-1]

    def vote(self, user: str, decision: str = "approve", comment: str | None = None) -> None:
        row = self.request()
        self.pipeline.approvals.vote(
            self.runtime.sessions,
            row.id,
            user=user,
            decision=decision,
            step_index=row.current_step or 0,
            comment=comment,
        )

    def written(self) -> dict[str, Any]:
        """What the pending write-backs will set, merged as the outbox merges them; then taken."""
        merged: dict[str, Any] = {}
        with transaction(self.runtime.sessions) as session:
            for row in session.scalars(select(OutboxUpdate).where(OutboxUpdate.status == "pending")):
                merged.update(row.fields)
                row.status = "done"
        return merged


@pytest.fixture
def sandbox(tmp_path: Path, runtime_factory: Callable[[Settings], Runtime], settings_factory: Any) -> Sandbox:
    from tests.fakes import MemoryCRM

    mappings = tmp_path / "mappings"
    mappings.mkdir()
    shutil.copy(REPO / "mappings/examples/sandbox-deals.yaml", mappings)
    runtime = runtime_factory(settings_factory(mappings_dir=str(mappings)))
    crm = MemoryCRM()
    crm.users = [CRMUser(u["id"], u["name"], u["email"], u["locale"], u["manager_id"]) for u in USERS]
    runtime.set_adapter("sandbox", crm)
    Directory.from_runtime(runtime).refresh("sandbox")
    pipeline = Pipeline(runtime, MappingSet.load(mappings))
    runtime.processor = pipeline
    return Sandbox(runtime, pipeline)


def test_the_record_shows_where_the_request_waits_and_the_latest_comment(sandbox: Sandbox) -> None:
    today = datetime.now(UTC).date().isoformat()
    sandbox.edit(amount=150000)
    assert sandbox.written() == {
        "approval_status": "Pending",
        "approval_progress": f"Waiting for Manager (Boris Novak) since {today}",
        "approval_comment": None,  # the old rejection comment goes on resubmission
    }
    sandbox.vote("u-mgr-boris", comment="Fine by me")
    assert sandbox.written() == {
        "approval_progress": f"Waiting for General manager (Carla Rossi) since {today}",
        "approval_comment": "Fine by me",
    }
    sandbox.vote("u-gm-carla")
    assert sandbox.written()["approval_progress"] == f"Waiting for Finance (Dmitri Volkov) since {today}"
    sandbox.vote("u-fin-dmitri", "reject", comment="Credit score too low")
    assert sandbox.written() == {
        "approval_status": "Non-valid company",
        "approval_progress": "",  # stopped waiting: cleared
        "approval_comment": "Credit score too low",
    }


def test_an_approval_clears_the_progress_and_keeps_the_deciders_comment(sandbox: Sandbox) -> None:
    sandbox.edit(amount=90000, term_months=12, **{"company.credit_score": 90})  # nothing applies? no rule
    assert sandbox.written() == {}
    sandbox.edit(amount=90000, term_months=24, **{"company.credit_score": 90})  # term > 12: manager + legal
    sandbox.written()
    sandbox.vote("u-mgr-boris")
    assert "Waiting for Legal (Eva Lindqvist)" in sandbox.written()["approval_progress"]
    sandbox.vote("u-legal-eva", comment="Standard terms")
    written = sandbox.written()
    assert (written["approval_status"], written["approval_progress"]) == ("Approved", "")
    assert written["approval_comment"] == "Standard terms"


def test_the_submitter_is_who_made_the_change_when_the_crm_says_so(
    tmp_path: Path, runtime_factory: Callable[[Settings], Runtime], settings_factory: Any
) -> None:
    from tests.fakes import MemoryCRM

    mappings = tmp_path / "mappings"
    mappings.mkdir()
    text = (REPO / "mappings/examples/sandbox-deals.yaml").read_text()
    text = text.replace(
        "  # submitter: {api: ..., type: user}", "  submitter: {api: modified_by, type: user}"
    )
    (mappings / "deals.yaml").write_text(text)
    runtime = runtime_factory(settings_factory(mappings_dir=str(mappings)))
    crm = MemoryCRM()
    # a CRM whose "modified by" holds another id of the person (as HubSpot's user id vs owner id)
    crm.users = [CRMUser("u-rep-anna", "Anna Kowalski", "anna@x.example", other_ids=("9586504",))]
    runtime.set_adapter("sandbox", crm)
    Directory.from_runtime(runtime).refresh("sandbox")
    pipeline = Pipeline(runtime, MappingSet.load(mappings))
    runtime.processor = pipeline
    sandbox = Sandbox(runtime, pipeline)
    sandbox.edit(amount=150000, modified_by="9586504")
    assert sandbox.request().submitter == "u-rep-anna"  # the editor, by the id mapping files use
    sandbox.vote("u-mgr-boris", "reject", comment="Not this quarter")
    sandbox.edit(amount=160000, modified_by=None)  # the CRM does not say who: the owner
    assert sandbox.request().submitter == "u-rep-felix"
