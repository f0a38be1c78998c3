"""The approvals REST API: listing, history, votes, recall, every 4xx, and real concurrent votes.

Requests are opened the real way: record-change events go through the inbox and the worker
pipeline against mapping files in a temp directory.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import count
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select
from werkzeug.serving import make_server

from connector.approvals.errors import (
    ApprovalError,
    ChainError,
    InvalidDecisionError,
    RuleMismatchError,
)
from connector.config import Settings
from connector.events import RecordChangeEvent
from connector.rules import MappingSet
from connector.runtime import Runtime
from connector.service.approval_service import RuleGoneError
from connector.service.pipeline import Pipeline
from connector.storage import approval_store as store
from connector.storage.approval_store import RecordKey, StaleRequestError
from connector.storage.db import transaction
from connector.storage.inbox import accept, process_pending
from connector.storage.models import (
    ApprovalTransitionRow,
    ApprovalVoteRow,
    AuditEntry,
    InboxEvent,
    OutboxUpdate,
)
from connector.storage.tokens import create_token, revoke_token
from connector.wiring import attach_pipeline
from connector.worker import Tasks, make_huey
from webhooks.app import create_app
from webhooks.errors import http_status

BIG_DEAL_RULE = """
  - name: big-deal
    when: {amount: {gt: 100000}}
    restart_on_change: [amount]
    expires_after: 30d
    steps:
      - name: manager
        mode: one
        approvers: [{field: owner_manager}]
      - name: general-manager
        mode: one
        approvers: [{role: general_manager}]
      - name: finance
        mode: any
        approvers: [{group: finance}]
    on:
      submit: {set: {status: Pending}}
      approve: {set: {status: Approved}}
      reject: {set: {status: Rejected, comment: "{{ comment }}"}}
      recall: {set: {status: null}}
"""
BOARD_RULE = """
  - name: board-review
    when: {amount: {gt: 50000}}
    steps:
      - name: board
        mode: all
        approvers: [{group: board}]
    on:
      submit: {set: {status: Pending}}
      approve: {set: {status: Approved}}
"""
MAPPING_HEAD = """
connection: sandbox
object: deal
match: first
fields:
  amount: {api: amount, type: money}
  stage: stage
  owner: {api: owner_id, type: user}
  owner_manager: {api: owner_manager_id, type: user}
  status: approval_status
  comment: approval_comment
roles:
  general_manager: [u-gm]
groups:
  finance: [u-fin-1, u-fin-2, u-fin-3, u-fin-4]
  board: [u-board-1, u-board-2]
rules:
"""
DEAL = {
    "amount": 150000,
    "stage": "negotiation",
    "owner_id": "u-rep",
    "owner_manager_id": "u-mgr",
    "approval_status": None,
    "approval_comment": None,
}
USERS = ("u-rep", "u-mgr", "u-gm", "u-fin-1", "u-fin-2", "u-fin-3", "u-fin-4", "u-board-1", "u-board-2")
CONFLICT_CODES = {"duplicate_vote", "request_closed", "step_closed", "stale_request", "concurrent_change"}
_event_ids = count()


@dataclass
class World:
    runtime: Runtime
    pipeline: Pipeline
    app: Flask
    client: FlaskClient
    mapping_file: Path
    tokens: dict[str, str] = field(default_factory=dict)  # user id -> bearer token

    def auth(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[user]}"}

    def get(self, user: str, path: str) -> Any:
        return self.client.get(f"/api/v1{path}", headers=self.auth(user))

    def post(self, user: str, path: str, body: Any = None) -> Any:
        if body is None:
            return self.client.post(f"/api/v1{path}", headers=self.auth(user))
        return self.client.post(f"/api/v1{path}", headers=self.auth(user), json=body)

    def vote(self, user: str, request_id: str, decision: str = "approve", **body: Any) -> Any:
        return self.post(user, f"/requests/{request_id}/{decision}", body or None)

    def submit(self, record_id: str = "D-1", **values: Any) -> str:
        """A record change through the inbox and the pipeline; returns the request it opened."""
        n = next(_event_ids)
        event = RecordChangeEvent(
            source="sandbox",
            connection="sandbox",
            object_type="deal",
            record_id=record_id,
            event_id=f"evt-{n}",
            occurred_at=datetime.now(UTC),
            dedupe_key=f"sandbox:test:{n}",
            changed_fields=("amount",),
            values={**DEAL, **values},
            origin="user",
        )
        accept(self.runtime.sessions, [event])
        process_pending(self.runtime.sessions, self.pipeline)
        with self.runtime.sessions() as session:
            inbox = session.scalars(select(InboxEvent).where(InboxEvent.event_id == f"evt-{n}")).one()
            assert inbox.status == "done", inbox.last_error
            rule = "big-deal" if float(values.get("amount", DEAL["amount"])) > 100000 else "board-review"
            stored = store.find_active(session, RecordKey("sandbox", "deal", record_id), rule)
            assert stored is not None, inbox.result
            return stored.request.id

    def approve_steps(self, request_id: str, *users: str) -> None:
        for user in users:
            response = self.vote(user, request_id)
            assert response.status_code == 200, response.get_json()


def write_mapping(path: Path, *rules: str) -> None:
    path.write_text(MAPPING_HEAD + "".join(rules))


def build_world(
    tmp_path: Path,
    settings_factory: Callable[..., Settings],
    runtime_factory: Callable[[Settings], Runtime],
    tasks_factory: Callable[[Runtime], Tasks] | None = None,
    env: dict[str, str] | None = None,
    **overrides: Any,
) -> World:
    mappings_dir = tmp_path / "mappings"
    mappings_dir.mkdir(exist_ok=True)
    mapping_file = mappings_dir / "deals.yaml"
    write_mapping(mapping_file, BIG_DEAL_RULE, BOARD_RULE)
    settings = settings_factory(
        env={"SANDBOX_API_TOKEN": "sbx-test-token", **(env or {})},
        mappings_dir=str(mappings_dir),
        **overrides,
    )
    runtime = runtime_factory(settings)
    mappings = MappingSet.load(mappings_dir)
    assert not mappings.errors, mappings.errors
    pipeline = attach_pipeline(runtime, mappings)
    tasks = tasks_factory(runtime) if tasks_factory else Tasks(runtime, make_huey("memory://"))
    app = create_app(runtime, tasks)
    app.testing = True
    world = World(runtime, pipeline, app, app.test_client(), mapping_file)
    with transaction(runtime.sessions) as session:
        for user in USERS:
            world.tokens[user] = create_token(session, user, f"{user} test")[1]
        world.tokens["u-admin"] = create_token(session, "u-admin", "ops", is_admin=True)[1]
        world.tokens["u-nobody"] = create_token(session, "u-nobody", "not involved")[1]
    return world


@pytest.fixture
def world(
    tmp_path: Path,
    settings_factory: Callable[..., Settings],
    runtime_factory: Callable[[Settings], Runtime],
) -> World:
    return build_world(tmp_path, settings_factory, runtime_factory)


def written_rows(runtime: Runtime) -> tuple[int, int, int, int]:
    """Votes, transitions, outbox rows and audit entries: what a refused call must not add."""
    with runtime.sessions() as session:
        return tuple(  # type: ignore[return-value]
            session.scalar(select(func.count()).select_from(model))
            for model in (ApprovalVoteRow, ApprovalTransitionRow, OutboxUpdate, AuditEntry)
        )


def outbox_for(runtime: Runtime, request_id: str) -> list[tuple[str, dict[str, Any]]]:
    with runtime.sessions() as session:
        rows = session.scalars(
            select(OutboxUpdate)
            .where(OutboxUpdate.reason.like(f"request {request_id}:%"))
            .order_by(OutboxUpdate.id)
        )
        return [(row.reason.rsplit(": ", 1)[-1], row.fields) for row in rows]  # type: ignore[union-attr]


def error_of(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.is_json
    error = response.get_json()["error"]
    assert error["code"] == code, error
    assert error["message"]
    return error  # type: ignore[no-any-return]


# --- listing and reading ---------------------------------------------------------------


def test_pending_list_shows_each_approver_what_waits_for_them(world: World) -> None:
    first = world.submit("D-1")
    second = world.submit("D-2", amount=200000)

    listed = world.get("u-mgr", "/requests?pending_for=me").get_json()
    assert [r["id"] for r in listed["requests"]] == [second, first]  # newest first
    item = listed["requests"][1]
    assert item["record"] == {
        "connection": "sandbox",
        "object": "deal",
        "id": "D-1",
        "ref": "sandbox:deal:D-1",
    }
    assert item["rule"] == "big-deal"
    assert item["status"] == "pending"
    assert item["submitter"] == "u-rep"
    assert item["submitted_at"]
    assert item["values"]["amount"] == 150000
    assert item["values"]["owner_manager"] == "u-mgr"
    step = item["current_step"]
    assert (step["name"], step["index"], step["round"], step["mode"]) == ("manager", 0, 1, "one")
    assert (step["approvers"], step["required"], step["votes"]) == (["u-mgr"], 1, [])
    assert world.get("u-gm", "/requests").get_json()["requests"] == []  # pending_for=me is the default

    world.approve_steps(first, "u-mgr")
    assert [r["id"] for r in world.get("u-mgr", "/requests").get_json()["requests"]] == [second]
    gm_list = world.get("u-gm", "/requests?pending_for=me").get_json()["requests"]
    assert [r["id"] for r in gm_list] == [first]
    assert gm_list[0]["current_step"]["name"] == "general-manager"


def test_only_admins_list_what_someone_else_must_approve(world: World) -> None:
    request_id = world.submit()
    listed = world.get("u-admin", "/requests?pending_for=u-mgr").get_json()
    assert [r["id"] for r in listed["requests"]] == [request_id]
    error = error_of(world.get("u-gm", "/requests?pending_for=u-mgr"), 403, "admin_only")
    assert "pending_for=me" in error["hint"]


def test_record_query_shows_submitters_approvers_and_admins_only(world: World) -> None:
    request_id = world.submit("D-7")

    def seen_by(user: str) -> list[str]:
        found = world.get(user, "/requests?record=sandbox:deal:D-7").get_json()["requests"]
        return [r["id"] for r in found]

    for user in ("u-admin", "u-rep", "u-mgr"):
        assert seen_by(user) == [request_id], user
    assert seen_by("u-nobody") == []
    assert seen_by("u-fin-3") == []  # finance is assigned only when the chain reaches it
    world.approve_steps(request_id, "u-mgr", "u-gm")
    assert seen_by("u-fin-3") == [request_id]
    assert world.get("u-fin-3", f"/requests/{request_id}").status_code == 200
    assert world.get("u-admin", "/requests?record=sandbox:deal:D-8").get_json()["requests"] == []
    error = error_of(world.get("u-admin", "/requests?record=D-7"), 400, "invalid_record")
    assert "CONNECTION:OBJECT:ID" in error["message"]
    error_of(world.get("u-admin", "/requests?limit=0"), 400, "invalid_limit")


def test_full_history_of_an_approved_request(world: World) -> None:
    request_id = world.submit()
    world.vote("u-mgr", request_id, comment="ok from sales")
    world.vote("u-gm", request_id)
    world.vote("u-fin-2", request_id, comment="budget fine")

    detail = world.get("u-rep", f"/requests/{request_id}").get_json()
    assert detail["status"] == "approved"
    assert detail["current_step"] is None
    assert detail["approved_at"] and detail["closed_at"]
    assert detail["expires_at"] > detail["approved_at"]  # expires_after: 30d
    assert detail["mapping"]["path"].endswith("deals.yaml")
    assert len(detail["mapping"]["hash"]) == 64
    assert [(s["name"], s["status"], s["round"]) for s in detail["steps"]] == [
        ("manager", "approved", 1),
        ("general-manager", "approved", 1),
        ("finance", "approved", 1),
    ]
    assert all(s["entered_at"] and s["left_at"] for s in detail["steps"])
    assert detail["steps"][2]["votes"][0]["approver"] == "u-fin-2"
    assert [(v["approver"], v["decision"], v["comment"]) for v in detail["votes"]] == [
        ("u-mgr", "approve", "ok from sales"),
        ("u-gm", "approve", None),
        ("u-fin-2", "approve", "budget fine"),
    ]
    kinds = [(t["seq"], t["kind"], t["step_index"], t["actor"]) for t in detail["transitions"]]
    assert kinds == [
        (1, "submitted", None, "u-rep"),
        (2, "entered", 0, None),
        (3, "step_approved", 0, "u-mgr"),
        (4, "entered", 1, None),
        (5, "step_approved", 1, "u-gm"),
        (6, "entered", 2, None),
        (7, "step_approved", 2, "u-fin-2"),
        (8, "approved", None, "u-fin-2"),
    ]
    assert detail["transitions"][-1]["from_status"] == "pending"
    assert detail["transitions"][-1]["to_status"] == "approved"
    assert detail["transitions"][2]["comment"] == "ok from sales"


def test_request_outside_ones_view_or_unknown_is_404(world: World) -> None:
    request_id = world.submit()
    error_of(world.get("u-nobody", f"/requests/{request_id}"), 404, "request_not_found")
    assert world.get("u-admin", f"/requests/{request_id}").status_code == 200
    error_of(world.get("u-admin", "/requests/no-such-id"), 404, "request_not_found")


def test_me_names_the_identity_of_the_token(world: World) -> None:
    assert world.get("u-admin", "/me").get_json()["user_id"] == "u-admin"
    assert world.get("u-admin", "/me").get_json()["is_admin"] is True
    assert world.get("u-mgr", "/me").get_json()["is_admin"] is False


# --- voting -------------------------------------------------------------------------------


def test_approve_through_a_three_step_chain_queues_the_write_back(world: World) -> None:
    request_id = world.submit()
    for user, expected_step in (("u-mgr", "general-manager"), ("u-gm", "finance")):
        body = world.vote(user, request_id, comment=f"ok by {user}").get_json()
        assert body["status"] == "pending"
        assert body["current_step"]["name"] == expected_step
    body = world.vote("u-fin-4", request_id).get_json()
    assert body["status"] == "approved"
    assert outbox_for(world.runtime, request_id) == [
        ("submit", {"approval_status": "Pending"}),
        ("approve", {"approval_status": "Approved"}),
    ]


def test_vote_nudges_the_write_back_flush_after_commit(world: World) -> None:
    request_id = world.submit()
    tasks = world.app.extensions["crm_approvals"].tasks
    before = [t.name for t in tasks.huey.pending()]
    world.approve_steps(request_id, "u-mgr")
    assert [t.name for t in tasks.huey.pending()] == [*before, "flush_outbox"]


def test_a_failing_nudge_is_logged_and_the_vote_still_stands(
    tmp_path: Path,
    settings_factory: Callable[..., Settings],
    runtime_factory: Callable[[Settings], Runtime],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A queue nobody listens on: enqueueing fails with a real connection error.
    world = build_world(
        tmp_path, settings_factory, runtime_factory, lambda rt: Tasks(rt, make_huey("redis://127.0.0.1:1/0"))
    )
    request_id = world.submit()
    with caplog.at_level(logging.WARNING, logger="webhooks.api"):
        response = world.vote("u-mgr", request_id)
    assert response.status_code == 200
    assert response.get_json()["current_step"]["name"] == "general-manager"
    assert "could not enqueue the write-back flush" in caplog.text


def test_reject_closes_the_request_with_the_comment_written_back(world: World) -> None:
    request_id = world.submit()
    body = world.vote("u-mgr", request_id, "reject", comment="margin too thin").get_json()
    assert body["status"] == "rejected"
    assert body["transitions"][-1]["kind"] == "rejected"
    assert body["transitions"][-1]["comment"] == "margin too thin"
    assert outbox_for(world.runtime, request_id)[-1] == (
        "reject",
        {"approval_status": "Rejected", "approval_comment": "margin too thin"},
    )


def test_admin_vote_decides_the_step_and_is_marked(world: World) -> None:
    request_id = world.submit()
    body = world.vote("u-admin", request_id, comment="manager on leave").get_json()
    assert body["current_step"]["name"] == "general-manager"
    assert body["votes"][0]["approver"] == "u-admin"
    assert body["votes"][0]["acting_admin"] is True
    assert body["transitions"][-2]["acting_admin"] is True


def test_explicit_step_index_is_accepted_when_current(world: World) -> None:
    request_id = world.submit()
    assert world.vote("u-mgr", request_id, step_index=0).status_code == 200


# --- recall -------------------------------------------------------------------------------


def test_submitter_recalls_with_a_comment(world: World) -> None:
    request_id = world.submit()
    response = world.post("u-rep", f"/requests/{request_id}/recall", {"comment": "wrong amount"})
    body = response.get_json()
    assert response.status_code == 200
    assert body["status"] == "recalled"
    assert body["transitions"][-1]["actor"] == "u-rep"
    assert body["transitions"][-1]["comment"] == "wrong amount"
    assert outbox_for(world.runtime, request_id)[-1] == ("recall", {"approval_status": None})
    assert world.get("u-mgr", "/requests").get_json()["requests"] == []


def test_recall_by_someone_else_is_403_and_by_an_admin_allowed(world: World) -> None:
    request_id = world.submit()
    before = written_rows(world.runtime)
    error = error_of(world.post("u-mgr", f"/requests/{request_id}/recall"), 403, "recall_not_allowed")
    assert "submitter" in error["hint"]
    assert written_rows(world.runtime) == before
    body = world.post("u-admin", f"/requests/{request_id}/recall", {"comment": "duplicate"}).get_json()
    assert body["status"] == "recalled"
    assert body["transitions"][-1]["acting_admin"] is True


# --- every refusal: a 4xx JSON error, and nothing written -----------------------------------


@pytest.fixture
def opened(world: World) -> Iterator[tuple[World, str]]:
    request_id = world.submit()
    world.approve_steps(request_id, "u-mgr")  # now at step 1 (general-manager)
    before = written_rows(world.runtime)
    yield world, request_id
    assert written_rows(world.runtime) == before, "a refused call wrote something"


def test_voting_twice_on_an_all_step_is_409_duplicate_vote(world: World) -> None:
    request_id = world.submit("D-9", amount=60000)  # board-review: both board members must approve
    world.approve_steps(request_id, "u-board-1")
    before = written_rows(world.runtime)
    error = error_of(world.vote("u-board-1", request_id), 409, "duplicate_vote")
    assert "already voted" in error["message"]
    assert written_rows(world.runtime) == before


def test_vote_naming_a_decided_step_is_409_step_closed(opened: tuple[World, str]) -> None:
    world, request_id = opened
    error = error_of(world.vote("u-gm", request_id, step_index=0), 409, "step_closed")
    assert "reload" in error["hint"]


def test_vote_naming_a_step_not_reached_is_409_stale_step(opened: tuple[World, str]) -> None:
    world, request_id = opened
    error_of(world.vote("u-gm", request_id, step_index=2), 409, "stale_step")


def test_vote_by_someone_not_assigned_is_403(opened: tuple[World, str]) -> None:
    world, request_id = opened
    error = error_of(world.vote("u-mgr", request_id), 403, "not_an_approver")
    assert "current_step.approvers" in error["hint"]
    # Someone not involved at all may not learn that the request exists (issue 8 item 7).
    error_of(world.vote("u-nobody", request_id), 404, "request_not_found")


def test_vote_on_a_closed_request_is_409(world: World) -> None:
    request_id = world.submit()
    world.vote("u-mgr", request_id, "reject", comment="not now")
    before = written_rows(world.runtime)
    # u-mgr, who may see it (u-gm's step never opened, so for u-gm it is 404, as for anyone uninvolved)
    error_of(world.vote("u-mgr", request_id), 409, "request_closed")
    error_of(world.vote("u-gm", request_id), 404, "request_not_found")
    error_of(world.post("u-rep", f"/requests/{request_id}/recall"), 409, "request_closed")
    assert written_rows(world.runtime) == before


def test_vote_on_an_unknown_request_is_404(world: World) -> None:
    error = error_of(world.vote("u-mgr", "no-such-id"), 404, "request_not_found")
    assert "pending_for=me" in error["hint"]
    error_of(world.post("u-rep", "/requests/no-such-id/recall"), 404, "request_not_found")


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"data": "{not json", "content_type": "application/json"}, 400, "malformed_json"),
        ({"data": '{"comment": "x"}', "content_type": "text/plain"}, 415, "unsupported_content_type"),
        ({"json": ["approve"]}, 400, "invalid_body"),
        ({"json": {"comment": "x", "stepIndex": 1}}, 400, "unknown_field"),
        ({"json": {"step_index": "1"}}, 400, "invalid_step_index"),
        ({"json": {"step_index": True}}, 400, "invalid_step_index"),
        ({"json": {"step_index": -1}}, 400, "invalid_step_index"),
        ({"json": {"comment": 42}}, 400, "invalid_comment"),
        ({"json": {"comment": "x" * 4001}}, 400, "invalid_comment"),
    ],
)
def test_malformed_vote_bodies_are_4xx(
    opened: tuple[World, str], kwargs: dict[str, Any], status: int, code: str
) -> None:
    world, request_id = opened
    response = world.client.post(
        f"/api/v1/requests/{request_id}/approve", headers=world.auth("u-gm"), **kwargs
    )
    error_of(response, status, code)


def test_a_body_over_the_size_limit_is_413(opened: tuple[World, str]) -> None:
    world, request_id = opened
    body = {"comment": "x" * (world.runtime.settings.webhook_max_body_bytes + 1)}
    error = error_of(world.vote("u-gm", request_id, **body), 413, "body_too_large")
    assert "WEBHOOK_MAX_BODY_BYTES" in error["hint"]


def test_recall_accepts_only_a_comment(opened: tuple[World, str]) -> None:
    world, request_id = opened
    error_of(world.post("u-rep", f"/requests/{request_id}/recall", {"step_index": 1}), 400, "unknown_field")


def test_unknown_decision_is_400(opened: tuple[World, str]) -> None:
    world, request_id = opened
    error = error_of(world.vote("u-gm", request_id, "approved"), 400, "invalid_decision")
    assert "approve" in error["hint"]


def test_vote_after_the_rule_left_the_mappings_is_409_rule_gone(opened: tuple[World, str]) -> None:
    world, request_id = opened
    write_mapping(world.mapping_file, BOARD_RULE)
    assert world.pipeline.mappings.reload() == []
    error = error_of(world.vote("u-gm", request_id), 409, "rule_gone")
    assert "big-deal" in error["message"]
    assert "restore" in error["hint"]


def test_a_failing_action_template_at_vote_time_is_503_naming_the_field(world: World) -> None:
    """An admin's template, not the voter's request, is at fault (docs/api.md, Errors)."""
    request_id = world.submit()
    world.approve_steps(request_id, "u-mgr", "u-gm")  # finance is next; its vote approves
    broken = BIG_DEAL_RULE.replace("{set: {status: Approved}}", "{set: {status: \"{{ today + 'x' }}\"}}")
    write_mapping(world.mapping_file, broken, BOARD_RULE)
    assert world.pipeline.mappings.reload() == []
    before = written_rows(world.runtime)
    error = error_of(world.vote("u-fin-1", request_id), 503, "action_render_error")
    assert "'status'" in error["message"] and "an admin must fix" in error["hint"]
    assert written_rows(world.runtime) == before
    assert world.get("u-admin", f"/requests/{request_id}").get_json()["status"] == "pending"


def test_without_the_approval_engine_changes_are_503(
    runtime: Runtime, app_factory: Callable[[Runtime], Flask]
) -> None:
    with transaction(runtime.sessions) as session:
        token = create_token(session, "u-mgr")[1]
    client = app_factory(runtime).test_client()  # runtime.processor is None
    response = client.post("/api/v1/requests/x/approve", headers={"Authorization": f"Bearer {token}"})
    error_of(response, 503, "approvals_unavailable")


# --- authentication ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "code"),
    [
        (None, "missing_token"),
        ("Basic dXNlcjpwYXNz", "invalid_authorization"),
        ("Bearer", "invalid_authorization"),
        ("Bearer cra_not-a-real-token", "invalid_token"),
    ],
)
def test_missing_or_invalid_token_is_401_with_a_hint(world: World, header: str | None, code: str) -> None:
    headers = {"Authorization": header} if header is not None else {}
    for response in (
        world.client.get("/api/v1/requests", headers=headers),
        world.client.post("/api/v1/requests/x/approve", headers=headers),
    ):
        error = error_of(response, 401, code)
        assert "crm-approvals token create --user" in error["hint"]
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_revoked_token_is_401(world: World) -> None:
    with transaction(world.runtime.sessions) as session:
        info, token = create_token(session, "u-mgr", "to revoke")
    headers = {"Authorization": f"Bearer {token}"}
    assert world.client.get("/api/v1/me", headers=headers).status_code == 200
    with transaction(world.runtime.sessions) as session:
        revoke_token(session, info.id)
    error = error_of(world.client.get("/api/v1/me", headers=headers), 401, "revoked_token")
    assert token not in str(error)


def test_tokens_never_reach_the_logs(world: World, caplog: pytest.LogCaptureFixture) -> None:
    request_id = world.submit()
    with caplog.at_level(logging.DEBUG):
        world.vote("u-gm", request_id)  # refused: not this step
        world.vote("u-mgr", request_id)
        world.client.get("/api/v1/me", headers={"Authorization": "Bearer cra_guessed-token-value"})
    assert "api request rejected" in caplog.text
    for token in world.tokens.values():
        assert token not in caplog.text
    assert "cra_guessed-token-value" not in caplog.text


# --- real concurrent requests -------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def concurrent_world(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    settings_factory: Callable[..., Settings],
    runtime_factory: Callable[[Settings], Runtime],
) -> Iterator[tuple[World, str]]:
    """The app on a real socket with a threaded server, over a file database or PostgreSQL."""
    overrides = {"database_url": request.getfixturevalue("pg_url")} if request.param == "postgresql" else {}
    world = build_world(tmp_path, settings_factory, runtime_factory, **overrides)
    server = make_server("127.0.0.1", 0, world.app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield world, f"http://127.0.0.1:{server.server_port}/api/v1"
    finally:
        server.shutdown()
        thread.join(timeout=10)


def fire_together(base_url: str, request_id: str, tokens: list[str]) -> list[requests.Response]:
    barrier = threading.Barrier(len(tokens))
    responses: list[requests.Response | None] = [None] * len(tokens)

    def approve(n: int) -> None:
        barrier.wait()
        responses[n] = requests.post(
            f"{base_url}/requests/{request_id}/approve",
            headers={"Authorization": f"Bearer {tokens[n]}"},
            json={"comment": f"vote {n}"},
            timeout=60,
        )

    threads = [threading.Thread(target=approve, args=(n,)) for n in range(len(tokens))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert all(r is not None for r in responses)
    return responses  # type: ignore[return-value]


def assert_exactly_one_decision(world: World, request_id: str, responses: list[requests.Response]) -> None:
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] + [409] * (len(responses) - 1), [r.text for r in responses]
    assert {r.json()["error"]["code"] for r in responses if r.status_code == 409} <= CONFLICT_CODES
    detail = world.get("u-admin", f"/requests/{request_id}").get_json()
    assert detail["status"] == "approved"
    assert [t["kind"] for t in detail["transitions"]].count("approved") == 1
    assert [(t["kind"], t["step_index"]) for t in detail["transitions"]].count(("step_approved", 2)) == 1
    assert len([v for v in detail["votes"] if v["step_index"] == 2]) == 1
    assert [event for event, _ in outbox_for(world.runtime, request_id)] == ["submit", "approve"]


def test_concurrent_votes_of_the_same_approver_count_once(concurrent_world: tuple[World, str]) -> None:
    world, base_url = concurrent_world
    request_id = world.submit()
    world.approve_steps(request_id, "u-mgr", "u-gm")
    responses = fire_together(base_url, request_id, [world.tokens["u-fin-1"]] * 5)
    assert_exactly_one_decision(world, request_id, responses)


def test_concurrent_votes_of_different_approvers_of_an_any_step_decide_once(
    concurrent_world: tuple[World, str],
) -> None:
    world, base_url = concurrent_world
    request_id = world.submit()
    world.approve_steps(request_id, "u-mgr", "u-gm")
    tokens = [world.tokens[f"u-fin-{n}"] for n in range(1, 5)]
    responses = fire_together(base_url, request_id, tokens)
    assert_exactly_one_decision(world, request_id, responses)


def test_vote_racing_a_committed_duplicate_is_409_not_500(
    tmp_path: Path,
    settings_factory: Callable[..., Settings],
    runtime_factory: Callable[[Settings], Runtime],
    pg_url: str,
) -> None:
    """PostgreSQL: a writer that bypassed the version check inserts the same vote first; the
    unique vote key stops our insert (IntegrityError) and the API answers 409, changing nothing."""
    world = build_world(tmp_path, settings_factory, runtime_factory, database_url=pg_url)
    request_id = world.submit()
    world.approve_steps(request_id, "u-mgr", "u-gm")
    other = world.runtime.sessions()
    other.add(
        ApprovalVoteRow(
            request_id=request_id,
            step_index=2,
            round=1,
            approver="u-fin-1",
            decision="approve",
            at=datetime.now(UTC),
        )
    )
    other.flush()  # holds the unique key until it commits
    result: dict[str, Any] = {}
    voter = threading.Thread(target=lambda: result.update(response=world.vote("u-fin-1", request_id)))
    voter.start()
    voter.join(timeout=1)
    assert voter.is_alive(), "the vote should wait on the other writer's uncommitted key"
    other.commit()
    other.close()
    voter.join(timeout=30)
    error_of(result["response"], 409, "concurrent_change")
    detail = world.get("u-admin", f"/requests/{request_id}").get_json()
    assert detail["status"] == "pending"
    assert [event for event, _ in outbox_for(world.runtime, request_id)] == ["submit"]


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (ChainError("finance", "group 'finance'", "nobody resolved"), 422),
        (RuleMismatchError("step renamed"), 409),
        (InvalidDecisionError("maybe"), 400),
        (StaleRequestError("moved on"), 409),
        (RuleGoneError("gone"), 409),
    ],
)
def test_engine_errors_that_requests_cannot_easily_provoke_map_to_4xx(
    error: ApprovalError, status: int
) -> None:
    assert http_status(error) == status


# --- no existence oracle; no self-approval ----------------------------------------------------


@pytest.mark.parametrize("action", ["approve", "reject", "recall"])
def test_every_action_on_a_request_one_may_not_see_is_404_like_an_unknown_id(
    world: World, action: str
) -> None:
    request_id = world.submit()
    before = written_rows(world.runtime)
    body = {"comment": "no"} if action == "reject" else None
    hidden = error_of(
        world.post("u-nobody", f"/requests/{request_id}/{action}", body), 404, "request_not_found"
    )
    unknown = error_of(
        world.post("u-nobody", f"/requests/no-such-id/{action}", body), 404, "request_not_found"
    )
    assert "u-rep" not in hidden["message"] + hidden["hint"]  # the submitter is not named
    assert hidden["hint"] == unknown["hint"]
    assert written_rows(world.runtime) == before


def test_a_submitter_who_is_also_an_approver_may_not_approve_their_own_request(world: World) -> None:
    request_id = world.submit("D-self", owner_id="u-fin-1")  # u-fin-1 submits; finance is its third step
    world.approve_steps(request_id, "u-mgr", "u-gm")
    before = written_rows(world.runtime)
    error = error_of(world.vote("u-fin-1", request_id), 403, "self_approval_not_allowed")
    assert "allow_self_approval" in error["message"] + error["hint"]
    error_of(world.vote("u-fin-1", request_id, "reject", comment="mine"), 403, "self_approval_not_allowed")
    assert written_rows(world.runtime) == before
    assert world.vote("u-fin-2", request_id).get_json()["status"] == "approved"


def test_allow_self_approval_lets_the_submitter_vote(world: World) -> None:
    write_mapping(
        world.mapping_file,
        BIG_DEAL_RULE.replace("    steps:", "    allow_self_approval: true\n    steps:", 1),
    )
    world.pipeline.refresh_mappings(min_interval=0)
    request_id = world.submit("D-self", owner_id="u-fin-1")
    world.approve_steps(request_id, "u-mgr", "u-gm", "u-fin-1")
    assert world.get("u-fin-1", f"/requests/{request_id}").get_json()["status"] == "approved"


def test_a_step_only_the_submitter_could_decide_refuses_the_request_naming_rule_and_step(
    world: World,
) -> None:
    """u-gm submits; the general-manager step has nobody else: a ChainError at open time (the
    event dead-letters with the rule and step named), not a silent re-route."""
    event = RecordChangeEvent(
        source="sandbox",
        connection="sandbox",
        object_type="deal",
        record_id="D-gm",
        event_id="evt-self-gm",
        occurred_at=datetime.now(UTC),
        dedupe_key="sandbox:test:self-gm",
        changed_fields=("amount",),
        values={**DEAL, "owner_id": "u-gm"},
        origin="user",
    )
    accept(world.runtime.sessions, [event])
    process_pending(world.runtime.sessions, world.pipeline)
    with world.runtime.sessions() as session:
        inbox = session.scalars(select(InboxEvent).where(InboxEvent.event_id == "evt-self-gm")).one()
        assert store.find_active(session, RecordKey("sandbox", "deal", "D-gm"), "big-deal") is None
    assert inbox.status == "dead"
    error = inbox.last_error or ""
    assert "general-manager" in error and "big-deal" in error and "allow_self_approval" in error
