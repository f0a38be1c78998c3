"""Deputies, reassignment and hierarchy/queue approvers through the database, the API
(/api/v1/delegations, /requests/<id>/reassign) and the CLI (connector/service/delegation.py)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import select

from connector.cli import main
from connector.config import Settings
from connector.crm.base import CRMQueue, CRMUser
from connector.directory.service import store_queues, store_users
from connector.runtime import Runtime
from connector.service.delegation import sweep
from connector.storage.db import transaction
from connector.storage.models import AuditEntry
from connector.storage.tokens import create_token
from tests.webhooks.test_api import MAPPING_HEAD, World, build_world, error_of


def today() -> date:
    """Read when used, not at import: a run that crosses midnight UTC must not use yesterday."""
    return datetime.now(UTC).date()


@pytest.fixture
def world(
    tmp_path: Path, settings_factory: Callable[..., Settings], runtime_factory: Callable[[Settings], Runtime]
) -> World:
    return build_world(tmp_path, settings_factory, runtime_factory)


def away(
    world: World, user: str, deputy: str, *, by: str | None = None, days: int = 5, start: int = 0, **more: Any
) -> Any:
    body = {
        "deputy": deputy,
        "starts_on": (today() + timedelta(days=start)).isoformat(),
        "ends_on": (today() + timedelta(days=start + days)).isoformat(),
        **more,
    }
    if by is not None and by != user:
        body["user"] = user
    return world.post(by or user, "/delegations", body)


def detail(world: World, request_id: str) -> Any:
    response = world.get("u-admin", f"/requests/{request_id}")
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def open_step(world: World, request_id: str) -> Any:
    body = detail(world, request_id)
    return next(s for s in body["steps"] if s["status"] == "pending")


# --- deputies for new and open steps ---------------------------------------------------------


def test_a_new_step_goes_to_the_deputy_and_the_vote_is_on_behalf_of_the_approver(world: World) -> None:
    response = away(world, "u-mgr", "u-board-1", note="holiday")
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["in_force"] is True
    request_id = world.submit()
    step = open_step(world, request_id)
    assert step["approvers"] == ["u-board-1"] and step["on_behalf_of"] == {"u-board-1": "u-mgr"}
    assert world.vote("u-mgr", request_id).status_code == 403  # the place is the deputy's now
    voted = world.vote("u-board-1", request_id)
    assert voted.status_code == 200, voted.get_json()
    (vote,) = voted.get_json()["votes"]
    assert (vote["approver"], vote["on_behalf_of"]) == ("u-board-1", "u-mgr")
    kinds = [t["kind"] for t in voted.get_json()["transitions"]]
    assert kinds[:3] == ["submitted", "entered", "delegated"]
    with world.runtime.sessions() as session:
        entry = session.scalars(select(AuditEntry).where(AuditEntry.kind == "vote")).one()
    assert entry.detail["on_behalf_of"] == "u-mgr" and entry.actor == "u-board-1"
    # the person away still sees the request
    assert world.get("u-mgr", f"/requests/{request_id}").status_code == 200


def test_open_steps_move_when_the_delegation_is_set_and_only_once(world: World) -> None:
    request_id = world.submit()
    assert open_step(world, request_id)["approvers"] == ["u-mgr"]
    assert away(world, "u-mgr", "u-board-1").status_code == 200
    step = open_step(world, request_id)
    assert step["approvers"] == ["u-board-1"]
    assert sweep(world.runtime) == {"handed_over": []}  # idempotent
    delegated = [t for t in detail(world, request_id)["transitions"] if t["kind"] == "delegated"]
    assert len(delegated) == 1 and "u-mgr -> u-board-1" in delegated[0]["comment"]


def test_a_delegation_starting_later_moves_open_steps_on_the_sweep_of_that_day(world: World) -> None:
    request_id = world.submit()
    assert away(world, "u-mgr", "u-board-1", start=1).status_code == 200
    assert open_step(world, request_id)["approvers"] == ["u-mgr"]
    approvals = world.pipeline.approvals
    approvals.clock = lambda: datetime.now(UTC) + timedelta(days=1)
    handed = sweep(world.runtime)["handed_over"]
    assert handed == [f"sandbox:deal:D-1 (request {request_id})"]
    assert open_step(world, request_id)["approvers"] == ["u-board-1"]


def test_deputies_chain_and_a_cancelled_delegation_routes_to_the_user_again(world: World) -> None:
    first = away(world, "u-mgr", "u-board-1").get_json()
    assert away(world, "u-board-1", "u-board-2").status_code == 200
    request_id = world.submit("D-1")
    assert open_step(world, request_id)["on_behalf_of"] == {"u-board-2": "u-mgr"}
    cancelled = world.post("u-mgr", f"/delegations/{first['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.get_json()["cancelled_at"] is not None
    later = world.submit("D-2")
    assert open_step(world, later)["approvers"] == ["u-mgr"]
    assert open_step(world, request_id)["approvers"] == ["u-board-2"]  # already handed over: stays


def test_a_cycle_is_refused_with_both_delegations_named(world: World) -> None:
    assert away(world, "u-mgr", "u-gm").status_code == 200
    refused = away(world, "u-gm", "u-mgr", days=2)
    body = error_of(refused, 400, "delegation_cycle")
    assert "u-gm -> u-mgr" in body["message"] and "-> u-gm" in body["message"]
    assert "cancel" in body["hint"]
    # not overlapping in time: no cycle
    assert away(world, "u-gm", "u-mgr", start=10, days=2).status_code == 200


@pytest.mark.parametrize(
    ("body", "code", "fragment"),
    [
        ({"deputy": "u-mgr"}, "invalid_delegation", "own deputy"),
        (
            {"deputy": "u-gm", "ends_on": "2000-01-01", "starts_on": "1999-12-01"},
            "invalid_delegation",
            "before today",
        ),
        ({"deputy": "u-gm", "rule": "big-dael"}, "invalid_delegation", "no rule 'big-dael'"),
        ({"deputy": "u-gm", "connection": "nope"}, "unknown_connection", "no connection"),
        ({"deputy": "u-gm", "starts_on": "2026-13-01"}, "invalid_starts_on", "month value"),
        ({"deputy": "u-gm", "extra": 1}, "unknown_field", "extra"),
    ],
)
def test_bad_delegations_are_400_saying_what_to_fix(
    world: World, body: dict[str, Any], code: str, fragment: str
) -> None:
    full = {"starts_on": today().isoformat(), "ends_on": (today() + timedelta(days=3)).isoformat(), **body}
    response = world.post("u-mgr", "/delegations", full)
    assert response.status_code == 400, response.get_json()
    error = response.get_json()["error"]
    assert error["code"] == code and fragment in error["message"], error
    if code == "invalid_delegation" and "rule" in body:
        assert "big-deal" in error["hint"]


def test_only_admins_set_or_see_other_peoples_delegations(world: World) -> None:
    error_of(away(world, "u-mgr", "u-gm", by="u-rep"), 403, "delegation_not_allowed")
    set_by_admin = away(world, "u-mgr", "u-gm", by="u-admin")
    assert set_by_admin.status_code == 200 and set_by_admin.get_json()["created_by"] == "u-admin"
    mine = world.get("u-mgr", "/delegations").get_json()["delegations"]
    assert [(d["user"], d["deputy"]) for d in mine] == [("u-mgr", "u-gm")]
    as_deputy = world.get("u-gm", "/delegations").get_json()["delegations"]
    assert len(as_deputy) == 1
    assert world.get("u-rep", "/delegations").get_json()["delegations"] == []
    error_of(world.get("u-rep", "/delegations?all=true"), 403, "admin_only")
    assert len(world.get("u-admin", "/delegations?all=true").get_json()["delegations"]) == 1
    error_of(
        world.post("u-rep", f"/delegations/{set_by_admin.get_json()['id']}/cancel"),
        404,
        "delegation_not_found",
    )
    error_of(world.post("u-rep", "/delegations/2147483648/cancel"), 400, "invalid_delegation_id")


def test_admins_reassign_an_open_step_and_others_may_not(world: World) -> None:
    request_id = world.submit()
    body = {"step_index": 0, "from_user": "u-mgr", "to_user": "u-gm"}
    error_of(world.post("u-mgr", f"/requests/{request_id}/reassign", body), 403, "reassign_not_allowed")
    moved = world.post("u-admin", f"/requests/{request_id}/reassign", {**body, "comment": "on leave"})
    assert moved.status_code == 200, moved.get_json()
    assert open_step(world, request_id)["approvers"] == ["u-gm"]
    last = moved.get_json()["transitions"][-1]
    assert last["kind"] == "reassigned" and last["comment"] == "u-mgr -> u-gm: on leave"
    error_of(world.post("u-admin", f"/requests/{request_id}/reassign", body), 403, "not_an_approver")


def test_the_new_routes_are_in_the_openapi_document(world: World) -> None:
    paths = world.client.get("/api/v1/openapi.json").get_json()["paths"]
    assert {"post", "get"} <= set(paths["/api/v1/delegations"])
    assert "post" in paths["/api/v1/delegations/{delegation_id}/cancel"]
    assert "post" in paths["/api/v1/requests/{request_id}/reassign"]


# --- approvers from the directory: the manager chain and CRM queues ---------------------------

HIERARCHY_RULE = """
  - name: big-deal
    when: {amount: {gt: 100000}}
    same_approver: ask_once
    steps:
      - name: managers
        mode: all
        approvers: [{manager_of: owner, levels: 2}]
      - name: finance
        mode: any
        approvers: [{queue: Finance desk}]
      - name: top
        mode: one
        approvers: [{manager_of: owner, levels: 1}]
"""


def test_manager_chain_past_an_inactive_manager_queue_members_and_ask_once(world: World) -> None:
    world.mapping_file.write_text(MAPPING_HEAD + HIERARCHY_RULE)
    assert world.pipeline.mappings.reload() == []
    now = datetime.now(UTC)
    users = [
        CRMUser("u-rep", "Rep", manager_id="u-mgr"),
        CRMUser("u-mgr", "Manager (left)", manager_id="u-gm", active=False),
        CRMUser("u-gm", "GM", manager_id="u-ceo"),
        CRMUser("u-ceo", "CEO"),
        CRMUser("u-fin-1", "Fin 1"),
        CRMUser("u-fin-2", "Fin 2 (left)", active=False),
    ]
    with transaction(world.runtime.sessions) as session:
        store_users(session, "sandbox", users, now)
        store_queues(session, "sandbox", [CRMQueue("q1", "Finance desk", ("u-fin-1", "u-fin-2"))], now)
    request_id = world.submit()
    assert open_step(world, request_id)["approvers"] == ["u-gm", "u-ceo"]
    with transaction(world.runtime.sessions) as session:
        world.tokens["u-ceo"] = create_token(session, "u-ceo", "ceo")[1]
    world.approve_steps(request_id, "u-gm", "u-ceo")
    assert open_step(world, request_id)["approvers"] == ["u-fin-1"]
    done = world.vote("u-fin-1", request_id).get_json()
    assert done["status"] == "approved"  # step top: u-gm approved "managers", asked once
    auto = [v for v in done["votes"] if v["step_index"] == 2]
    assert len(auto) == 1 and auto[0]["approver"] == "u-gm" and "same approver" in auto[0]["auto_reason"]


# --- the CLI ------------------------------------------------------------------------------------


@pytest.fixture
def cli(world: World, tmp_path: Path) -> Callable[..., Result]:
    env = tmp_path / ".env"
    env.write_text(
        f"DATABASE_URL={world.runtime.settings.database_url}\nQUEUE_URL=memory://\n"
        f"MAPPINGS_DIR={world.mapping_file.parent}\nSANDBOX_API_TOKEN=sbx-test-token\n"
    )

    def run(*args: str) -> Result:
        return CliRunner().invoke(main, ["--env-file", str(env), *args], catch_exceptions=False)

    return run


def test_cli_sets_lists_cancels_and_refuses_a_cycle(world: World, cli: Callable[..., Result]) -> None:
    start, end = today().isoformat(), (today() + timedelta(days=3)).isoformat()
    request_id = world.submit()
    made = cli("delegation", "set", "--user", "u-mgr", "--deputy", "u-gm", "--from", start, "--until", end)
    assert made.exit_code == 0, made.output
    assert "u-mgr -> u-gm" in made.output
    assert open_step(world, request_id)["approvers"] == ["u-gm"]
    cycle = cli("delegation", "set", "--user", "u-gm", "--deputy", "u-mgr", "--from", start, "--until", end)
    assert cycle.exit_code == 1 and "hand u-gm's approvals back" in cycle.output and "hint:" in cycle.output
    listed = cli("delegation", "list")
    assert "u-mgr -> u-gm" in listed.output and "in force" in listed.output
    delegation_id = listed.output.split()[0]
    assert cli("delegation", "cancel", delegation_id).exit_code == 0
    assert "no delegations" in cli("delegation", "list").output
    assert "cancelled" in cli("delegation", "list", "--all").output


def test_cli_reassigns_the_open_step(world: World, cli: Callable[..., Result]) -> None:
    request_id = world.submit()
    result = cli("reassign", request_id, "--from", "u-mgr", "--to", "u-gm", "--comment", "away")
    assert result.exit_code == 0, result.output
    assert open_step(world, request_id)["approvers"] == ["u-gm"]
    again = cli("reassign", request_id, "--from", "u-mgr", "--to", "u-gm")
    assert again.exit_code == 1 and "not an approver" in again.output


def test_the_cli_refuses_a_date_it_cannot_read(cli: Callable[..., Result]) -> None:
    result = cli(
        "delegation", "set", "--user", "u-mgr", "--deputy", "u-gm", "--from", "tomorrow", "--until", "x"
    )
    assert result.exit_code == 2 and "'--from'" in result.output and "%Y-%m-%d" in result.output


def test_the_deputy_is_told_of_a_step_handed_over_and_nobody_twice(world: World) -> None:
    from connector.notify.models import Notification

    request_id = world.submit()
    assert away(world, "u-mgr", "u-board-1").status_code == 200
    sweep(world.runtime)
    with world.runtime.sessions() as session:
        rows = session.scalars(
            select(Notification).where(
                Notification.request_id == request_id, Notification.template == "step_opened"
            )
        ).all()
    told = sorted(row.user_id for row in rows)
    assert told == ["u-board-1", "u-mgr"], told  # u-mgr when the step opened, the deputy when handed over


def test_on_postgresql_too(
    tmp_path: Path,
    settings_factory: Callable[..., Settings],
    runtime_factory: Callable[[Settings], Runtime],
    pg_url: str,
) -> None:
    """JSONB on_behalf_of (visibility of the person away), the migration's columns, the hand-over."""
    world = build_world(tmp_path, settings_factory, runtime_factory, database_url=pg_url)
    request_id = world.submit()
    assert away(world, "u-mgr", "u-board-1").status_code == 200
    assert open_step(world, request_id)["on_behalf_of"] == {"u-board-1": "u-mgr"}
    assert world.vote("u-board-1", request_id).get_json()["votes"][0]["on_behalf_of"] == "u-mgr"
    assert world.get("u-mgr", f"/requests/{request_id}").status_code == 200
    assert world.get("u-rep", "/requests?all=true").status_code == 200
    error_of(away(world, "u-board-1", "u-mgr"), 400, "delegation_cycle")


def test_a_delegation_without_a_body_is_400_naming_what_is_missing(world: World) -> None:
    response = world.client.post("/api/v1/delegations", headers=world.auth("u-mgr"))
    assert response.status_code == 400, response.get_data(as_text=True)
    assert "deputy" in response.get_json()["error"]["message"]
