"""The user directory: refresh from the CRM into the cache, lookups, the periodic refresh, and
the two places it guards ids: `validate` warnings and `token create` confirmation."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from connector.cli import main
from connector.config import Settings
from connector.crm.base import CRMUser
from connector.crm.errors import RetriableError
from connector.directory import Directory, Person
from connector.directory.service import store_users
from connector.runtime import Runtime
from connector.storage.db import transaction
from tests.fakes import MemoryCRM

BORIS = CRMUser("u-mgr-boris", "Boris Novak", "Boris.Novak@Sandbox.example", "en_US", "u-gm-carla")
CARLA = CRMUser("u-gm-carla", "Carla Rossi", "carla.rossi@sandbox.example", "zh_CN")
ANNA = CRMUser("u-rep-anna", "Anna Kowalski", "anna.kowalski@sandbox.example", "pl_PL", "u-mgr-boris")


class UnreachableCRM(MemoryCRM):
    def _users_page(self, cursor: Any) -> tuple[list[CRMUser], Any]:
        raise RetriableError("503 Service Unavailable", status=503)


@pytest.fixture
def crm(runtime: Runtime) -> MemoryCRM:
    crm = MemoryCRM()
    crm.users = [BORIS, CARLA, ANNA]
    runtime.set_adapter("sandbox", crm)
    return crm


@pytest.fixture
def directory(runtime: Runtime, crm: MemoryCRM) -> Directory:
    return Directory.from_runtime(runtime)


def test_refresh_caches_people_and_lookups_use_the_cache(directory: Directory, crm: MemoryCRM) -> None:
    result = directory.refresh("sandbox")
    assert (result.ok, result.people, result.deactivated) == (True, 3, 0)
    crm.users = []  # lookups never call the CRM
    assert directory.get("sandbox", "u-mgr-boris") == Person(
        "sandbox", "u-mgr-boris", "Boris Novak", "Boris.Novak@Sandbox.example", "en_US", "u-gm-carla", True
    )
    assert directory.display_name("sandbox", "u-rep-anna") == "Anna Kowalski"
    assert directory.display_name("sandbox", "u-nobody") == "u-nobody"  # unknown: the id itself
    assert directory.get("other", "u-mgr-boris") is None  # per connection
    assert [p.id for p in directory.find_by_email("  boris.novak@SANDBOX.example ")] == ["u-mgr-boris"]
    assert directory.find_by_email("nobody@sandbox.example") == []
    manager = directory.manager_of("sandbox", "u-rep-anna")
    assert manager is not None and manager.name == "Boris Novak"
    assert directory.manager_of("sandbox", "u-gm-carla") is None
    assert directory.known_ids("sandbox") == {"u-mgr-boris", "u-gm-carla", "u-rep-anna"}


def test_people_the_crm_stops_listing_stay_but_inactive(directory: Directory, crm: MemoryCRM) -> None:
    directory.refresh("sandbox")
    crm.users = [BORIS, CARLA]
    assert directory.refresh("sandbox").deactivated == 1
    anna = directory.get("sandbox", "u-rep-anna")
    assert (
        anna is not None and anna.active is False and anna.name == "Anna Kowalski"
    )  # old requests keep names
    assert directory.find_by_email("anna.kowalski@sandbox.example") == []
    assert [
        p.id for p in directory.find_by_email("anna.kowalski@sandbox.example", include_inactive=True)
    ] == ["u-rep-anna"]
    crm.users = [BORIS, CARLA, ANNA]  # back again
    directory.refresh("sandbox")
    assert directory.get("sandbox", "u-rep-anna").active  # type: ignore[union-attr]


def test_other_crm_ids_find_the_same_person(directory: Directory, crm: MemoryCRM, runtime: Runtime) -> None:
    crm.users = [CRMUser("41629779", "Ana Lopez", "ana@acme.example", other_ids=("9586504",))]
    directory.refresh("sandbox")
    assert directory.display_name("sandbox", "9586504") == "Ana Lopez"  # HubSpot user id -> owner
    assert directory.canonical_id("sandbox", "9586504") == "41629779"
    assert directory.canonical_id("sandbox", "41629779") == "41629779"
    assert directory.canonical_id("sandbox", "123") == "123"


def test_a_failed_refresh_keeps_the_last_good_cache(directory: Directory, runtime: Runtime) -> None:
    directory.refresh("sandbox")
    runtime.set_adapter("sandbox", UnreachableCRM())
    result = directory.refresh("sandbox")
    assert not result.ok and "503" in str(result)
    assert directory.display_name("sandbox", "u-mgr-boris") == "Boris Novak"
    last = directory.last_refresh("sandbox")
    assert last is not None and last.last_error is not None and "503" in last.last_error


def test_a_connection_never_read_successfully_knows_nobody(runtime: Runtime) -> None:
    runtime.set_adapter("sandbox", UnreachableCRM())
    directory = Directory.from_runtime(runtime)
    assert directory.ensure_loaded("sandbox") is not None  # tried, failed
    assert directory.known_ids("sandbox") is None  # so no id is called unknown


def test_the_sweep_refreshes_only_connections_that_are_due(runtime: Runtime, crm: MemoryCRM) -> None:
    now = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)
    clock = [now]
    directory = Directory(
        runtime.sessions, runtime.adapter, connections=["sandbox"], refresh_minutes=60, clock=lambda: clock[0]
    )
    assert directory.refresh_due() == ["sandbox: 3 people (0 no longer listed)"]
    crm.users = [BORIS]
    clock[0] = now + timedelta(minutes=59)
    assert directory.refresh_due() == []  # not due yet: the cache still has Anna
    assert directory.get("sandbox", "u-rep-anna").active  # type: ignore[union-attr]
    clock[0] = now + timedelta(minutes=61)
    assert directory.refresh_due() == ["sandbox: 1 people (2 no longer listed)"]


def test_the_worker_sweep_job_refreshes_the_directory(runtime: Runtime, crm: MemoryCRM) -> None:
    from connector.notify.sender import sweep

    summary = sweep(runtime)
    assert summary["directory"] == ["sandbox: 3 people (0 no longer listed)"]
    assert Directory.from_runtime(runtime).display_name("sandbox", "u-gm-carla") == "Carla Rossi"


# --- validate and token create ----------------------------------------------------------------

MAPPING = """connection: sandbox
object: deal
fields:
  amount: {api: amount, type: money}
  owner_manager: {api: owner_manager_id, type: user}
  status: approval_status
groups:
  finance: [u-fin-dmitry, u-gm-carla]
rules:
  - name: big
    when: {amount: {gt: 100}}
    steps:
      - name: manager
        mode: one
        approvers: [{field: owner_manager}, {user: u-mgr-bors}]
      - name: finance
        mode: any
        approvers: [{group: finance}]
"""


@pytest.fixture
def env_file(tmp_path: Path) -> Path:
    path = tmp_path / ".env"
    path.write_text(f"DATABASE_URL=sqlite:///{tmp_path}/people.db\nCRM_CONNECTIONS=sandbox\n")
    return path


@pytest.fixture
def cached(env_file: Path, runtime_factory: Callable[[Settings], Runtime]) -> Runtime:
    """The env file's database, migrated, with the sandbox directory cached."""
    runtime = runtime_factory(Settings.from_env({}, dotenv_path=str(env_file)))
    with transaction(runtime.sessions) as session:
        store_users(session, "sandbox", [BORIS, CARLA, ANNA], datetime.now(UTC))
    return runtime


def test_validate_warns_about_approver_ids_the_directory_does_not_know(
    cached: Runtime, env_file: Path, tmp_path: Path
) -> None:
    mapping = tmp_path / "deals.yaml"
    mapping.write_text(MAPPING)
    result = CliRunner().invoke(main, ["--env-file", str(env_file), "validate", "--no-crm", str(mapping)])
    assert result.exit_code == 0, result.output  # warnings alone do not fail
    assert (
        f"{mapping}:8: groups.finance[0]: warning: user id `u-fin-dmitry` is not in the user directory"
        in (result.output)
    )
    assert "rules[0].steps[0].approvers[1].user: warning: user id `u-mgr-bors`" in result.output
    assert "did you mean `u-mgr-boris`?" in result.output
    assert "u-gm-carla`" not in result.output  # known: no warning
    assert "all mapping files are valid" in result.output


def test_validate_without_a_directory_checks_the_files_only(env_file: Path, tmp_path: Path) -> None:
    mapping = tmp_path / "deals.yaml"
    mapping.write_text(MAPPING)
    result = CliRunner().invoke(main, ["--env-file", str(env_file), "validate", "--no-crm", str(mapping)])
    assert result.exit_code == 0
    assert "warning" not in result.output
    assert "not checked against the directory" in result.stderr  # says why (no tables yet)


def test_token_for_an_unknown_user_asks_first(cached: Runtime, env_file: Path) -> None:
    cli = ["--env-file", str(env_file), "token", "create", "--user"]
    refused = CliRunner().invoke(main, [*cli, "u-mgr-bors"], input="n\n")
    assert refused.exit_code == 1 and "Aborted" in refused.output
    assert "'u-mgr-bors' is not a user in the directory of sandbox" in refused.stderr
    assert refused.stdout == ""  # no token was made
    accepted = CliRunner().invoke(main, [*cli, "u-mgr-bors"], input="y\n")
    assert accepted.exit_code == 0 and accepted.stdout.startswith("cra_")
    forced = CliRunner().invoke(main, [*cli, "u-mgr-bors", "--yes"])
    assert forced.exit_code == 0 and "directory" not in forced.stderr
    known = CliRunner().invoke(main, [*cli, "u-mgr-boris"])
    assert known.exit_code == 0 and "directory of" not in known.stderr  # no question for a known user
