"""Cross-record dependencies (issue 12) through the real pipeline and database: a contract
whose company has no approval opens it once (even for several contracts, concurrently, on
SQLite and PostgreSQL) and waits; the company's decision releases or rejects it; a rejected
company is written back as "Non-valid company" and later contracts are refused with its reason;
`company.approval` criteria read the related record's state."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from connector.events import RecordChangeEvent
from connector.rules import MappingSet
from connector.service.approval_service import ApprovalService
from connector.storage import approval_store as store
from connector.storage.approval_store import RecordKey
from connector.storage.company_models import RequestDependency
from connector.storage.db import transaction
from connector.storage.models import ApprovalRequestRow, OutboxUpdate
from connector.wiring import attach_pipeline
from tests.fakes import MemoryCRM

COMPANY_YAML = """\
connection: sandbox
object: company
fields:
  name: name
  owner: {api: owner_id, type: user}
  status: approval_status
  comment: approval_comment
roles:
  cfo: [u-cfo]
rules:
  - name: company-approval
    when: {name: {eq: never-on-its-own}}
    expires_after: 180d
    steps:
      - {name: cfo, mode: one, approvers: [{role: cfo}]}
    on:
      approve: {set: {status: Approved}}
      reject: {set: {status: Non-valid company, comment: "{{ comment }}"}}
"""
CONTRACT_YAML = """\
connection: sandbox
object: contract
related:
  company: {field: company_id, object: company}
fields:
  name: name
  company_id: company_id
  owner: {api: owner_id, type: user}
  status: approval_status
  comment: approval_comment
roles:
  lawyer: [u-lawyer]
rules:
  - name: contract-approval
    requires: [{related: company, rule: company-approval}]
    steps:
      - name: lawyer
        mode: one
        approvers: [{role: lawyer}]
      - name: cfo-for-unapproved-companies
        when: {company.approval: {is: none}}
        mode: one
        approvers: [{user: u-cfo}]
    on:
      reject: {set: {status: Rejected, comment: "{{ comment }}"}}
"""
RECORDS = {
    "C-1": {"name": "Acme", "owner_id": "u-rep"},
    "K-1": {"name": "Supply", "company_id": "C-1", "owner_id": "u-rep"},
    "K-2": {"name": "Service", "company_id": "C-1", "owner_id": "u-rep"},
    "K-3": {"name": "Licence", "company_id": "C-1", "owner_id": "u-rep"},
}


class World:
    def __init__(self, runtime: Any, tmp_path: Path, contract_yaml: str = CONTRACT_YAML) -> None:
        mappings = tmp_path / "mappings"
        mappings.mkdir(exist_ok=True)
        (mappings / "company.yaml").write_text(COMPANY_YAML)
        (mappings / "contract.yaml").write_text(contract_yaml)
        loaded = MappingSet.load(mappings)
        assert not loaded.errors, loaded.errors
        self.runtime = runtime
        self.crm = MemoryCRM(records={k: dict(v) for k, v in RECORDS.items()})
        runtime.set_adapter("sandbox", self.crm)
        self.pipeline = attach_pipeline(runtime, loaded)
        self.approvals: ApprovalService = self.pipeline.approvals

    def event(self, object_type: str, record_id: str) -> RecordChangeEvent:
        key = uuid.uuid4().hex
        return RecordChangeEvent(
            source="sandbox",
            connection="sandbox",
            object_type=object_type,
            record_id=record_id,
            event_id=key,
            occurred_at=datetime.now(UTC),
            dedupe_key=key,
            changed_fields=("name",),
            values=None,
            values_signed=False,
        )

    def change(
        self, object_type: str, record_id: str, hold: float = 0.0, ready: threading.Event | None = None
    ) -> str:
        event = self.event(object_type, record_id)
        prepared = self.pipeline.prepare(event)
        with transaction(self.runtime.sessions) as session:
            summary = self.pipeline.apply(session, event, prepared)
            if ready is not None:
                ready.set()
            time.sleep(hold)  # keep the transaction open: a concurrent opener meets it
        return summary

    def latest(self, object_type: str, record_id: str, rule: str) -> Any:
        with self.runtime.sessions() as session:
            return store.find_latest(session, RecordKey("sandbox", object_type, record_id), rule)

    def vote(self, request_id: str, user: str, decision: str = "approve", comment: str = "ok") -> Any:
        return self.approvals.vote(
            self.runtime.sessions, request_id, user=user, decision=decision, comment=comment
        )

    def count(self, rule: str) -> int:
        with self.runtime.sessions() as session:
            return (
                session.scalar(
                    select(func.count())
                    .select_from(ApprovalRequestRow)
                    .where(ApprovalRequestRow.rule_name == rule)
                )
                or 0
            )


@pytest.fixture
def world(tmp_path: Path, settings_factory: Callable[..., Any], runtime_factory: Callable[..., Any]) -> World:
    return World(runtime_factory(settings_factory()), tmp_path)


def test_a_contract_of_an_unapproved_company_opens_its_approval_and_waits(world: World) -> None:
    assert "opened" in world.change("contract", "K-1")
    contract = world.latest("contract", "K-1", "contract-approval").request
    company = world.latest("company", "C-1", "company-approval").request
    assert (contract.status, company.status) == ("waiting", "pending")
    assert contract.transitions[-1].kind == "waiting"
    assert f"company C-1 (request {company.id})" in (contract.transitions[-1].comment or "")
    assert contract.record["company.approval"] == "none"
    with world.runtime.sessions() as session:
        assert session.scalars(select(RequestDependency.depends_on)).all() == [company.id]


def test_many_contracts_of_one_company_open_its_approval_once(world: World) -> None:
    for contract in ("K-1", "K-2", "K-3"):
        world.change("contract", contract)
    assert world.count("company-approval") == 1
    assert world.count("contract-approval") == 3


def test_approving_the_company_releases_every_waiting_contract(world: World) -> None:
    world.change("contract", "K-1")
    world.change("contract", "K-2")
    company = world.latest("company", "C-1", "company-approval").request
    world.vote(company.id, "u-cfo")
    for contract_id in ("K-1", "K-2"):
        contract = world.latest("contract", contract_id, "contract-approval").request
        assert (contract.status, contract.current_step) == ("pending", 0)
        resumed = [t for t in contract.transitions if t.kind == "resumed"]
        assert resumed and f"approved (request {company.id})" in (resumed[0].comment or "")
        assert contract.record["company.approval"] == "approved"
    # the step for companies without approval was judged on the state at release: skipped
    contract = world.latest("contract", "K-1", "contract-approval").request
    assert world.vote(contract.id, "u-lawyer").request.status == "approved"


def test_a_rejected_company_rejects_waiting_contracts_with_its_reason_and_is_marked_non_valid(
    world: World,
) -> None:
    world.change("contract", "K-1")
    company = world.latest("company", "C-1", "company-approval").request
    world.vote(company.id, "u-cfo", "reject", "on a sanctions list")
    contract = world.latest("contract", "K-1", "contract-approval").request
    assert contract.status == "rejected"
    assert contract.transitions[-1].comment == (
        "company-approval of company C-1 was rejected: on a sanctions list"
    )
    with world.runtime.sessions() as session:
        writes = {
            (o.record_id, o.fields.get("approval_status")) for o in session.scalars(select(OutboxUpdate))
        }
    assert ("C-1", "Non-valid company") in writes and ("K-1", "Rejected") in writes
    # a later contract of that company cannot proceed either, and opens no new company approval
    world.change("contract", "K-2")
    later = world.latest("contract", "K-2", "contract-approval").request
    assert later.status == "rejected" and "was rejected" in (later.transitions[-1].comment or "")
    assert world.count("company-approval") == 1


def test_a_contract_of_an_approved_company_starts_at_once(world: World) -> None:
    world.change("contract", "K-1")
    world.vote(world.latest("company", "C-1", "company-approval").request.id, "u-cfo")
    world.change("contract", "K-2")
    contract = world.latest("contract", "K-2", "contract-approval").request
    assert (contract.status, contract.record["company.approval"]) == ("pending", "approved")
    assert not any(t.kind == "waiting" for t in contract.transitions)


def test_an_expired_company_approval_is_asked_for_again(world: World) -> None:
    world.change("contract", "K-1")
    first = world.latest("company", "C-1", "company-approval").request
    world.vote(first.id, "u-cfo")
    world.approvals.clock = lambda: datetime.now(UTC) + timedelta(days=181)
    world.approvals.expire_due(world.runtime.sessions)
    world.change("contract", "K-2")
    second = world.latest("company", "C-1", "company-approval").request
    assert second.id != first.id and second.status == "pending"
    assert world.latest("contract", "K-2", "contract-approval").request.status == "waiting"


def test_a_contract_without_a_company_is_rejected_saying_so(world: World) -> None:
    world.crm.records["K-1"]["company_id"] = None
    world.change("contract", "K-1")
    contract = world.latest("contract", "K-1", "contract-approval").request
    assert contract.status == "rejected"
    assert contract.transitions[-1].comment == "no company is linked (`company_id` is empty)"


def test_a_waiting_contract_recalled_is_not_released(world: World) -> None:
    world.change("contract", "K-1")
    contract = world.latest("contract", "K-1", "contract-approval").request
    world.approvals.recall(world.runtime.sessions, contract.id, user="u-rep", comment=None, is_admin=False)
    world.vote(world.latest("company", "C-1", "company-approval").request.id, "u-cfo")
    assert world.latest("contract", "K-1", "contract-approval").request.status == "recalled"


def concurrent_openers(world: World) -> None:
    """Contract K-1 opens the company approval and keeps its transaction open for a moment; K-2,
    processed meanwhile in another thread, must wait for it and use that approval."""
    ready = threading.Event()
    errors: list[BaseException] = []

    def first() -> None:
        try:
            world.change("contract", "K-1", hold=0.5, ready=ready)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=first)
    thread.start()
    assert ready.wait(10)
    world.change("contract", "K-2")
    thread.join(10)
    assert not errors, errors
    assert world.count("company-approval") == 1
    company = world.latest("company", "C-1", "company-approval").request
    for contract_id in ("K-1", "K-2"):
        contract = world.latest("contract", contract_id, "contract-approval").request
        assert contract.status == "waiting" and company.id in (contract.transitions[-1].comment or "")


def test_concurrent_contracts_open_the_company_approval_once_on_sqlite(world: World) -> None:
    concurrent_openers(world)


def test_concurrent_contracts_open_the_company_approval_once_on_postgresql(
    tmp_path: Path,
    pg_url: str,
    settings_factory: Callable[..., Any],
    runtime_factory: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="connector.service.dependencies")
    concurrent_openers(World(runtime_factory(settings_factory(database_url=pg_url)), tmp_path))
    # PostgreSQL let both transactions run: the second insert met the unique active key
    assert "was opened concurrently" in caplog.text


def test_a_contract_that_cannot_start_is_rejected_saying_why_and_the_company_vote_stands(
    tmp_path: Path, settings_factory: Callable[..., Any], runtime_factory: Callable[..., Any]
) -> None:
    # the contract's first step applies only for approved companies, and its approver is empty
    broken = CONTRACT_YAML.replace(
        "  owner: {api: owner_id, type: user}\n",
        "  owner: {api: owner_id, type: user}\n  manager: {api: manager_id, type: user}\n",
    ).replace(
        "      - name: lawyer\n        mode: one\n        approvers: [{role: lawyer}]",
        "      - name: lawyer\n        when: {company.approval: {is: approved}}\n        mode: one\n"
        "        approvers: [{field: manager}]",
    )
    assert broken.count("manager") == 3
    world = World(runtime_factory(settings_factory()), tmp_path, contract_yaml=broken)
    world.change("contract", "K-1")
    company = world.latest("company", "C-1", "company-approval").request
    assert world.vote(company.id, "u-cfo").request.status == "approved"
    contract = world.latest("contract", "K-1", "contract-approval").request
    assert contract.status == "rejected"
    assert "could not start after company-approval" in (contract.transitions[-1].comment or "")
    assert "resolved to nobody" in (contract.transitions[-1].comment or "")
