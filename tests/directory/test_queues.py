"""Approver queues in the directory: read from the CRM with the people, looked up by id or
name, members as records name them (HubSpot user ids -> owner ids), a failed queue read keeps
the last queues without stopping the people refresh; `crm-approvals directory queues`."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from connector.cli import main
from connector.crm.base import CRMQueue, CRMUser
from connector.crm.errors import FatalError
from connector.directory import Directory
from connector.directory.org import DirectoryOrg
from connector.runtime import Runtime
from tests.fakes import MemoryCRM

ANA = CRMUser("41629779", "Ana Lopez", other_ids=("9586504",))  # HubSpot: owner id, user id
BO = CRMUser("41629780", "Bo Chen", other_ids=("9586505",), active=False)


@pytest.fixture
def crm(runtime: Runtime) -> MemoryCRM:
    crm = MemoryCRM()
    crm.users = [ANA, BO]
    crm.queues = [CRMQueue("368389", "Sales Team", ("9586504", "9586505")), CRMQueue("368390", "Empty", ())]
    runtime.set_adapter("sandbox", crm)
    return crm


def test_refresh_reads_queues_and_the_org_finds_them_by_id_or_name(runtime: Runtime, crm: MemoryCRM) -> None:
    result = Directory.from_runtime(runtime).refresh("sandbox")
    assert result.ok and result.queues == 2 and str(result).endswith(", 2 queues")
    org = DirectoryOrg(runtime.sessions, "sandbox")
    assert org.queue_members("368389") == ("41629779", "41629780")  # owner ids, as records carry
    assert org.queue_members("sales team") == ("41629779", "41629780")
    assert org.queue_members("Empty") == ()
    assert org.queue_members("Nope") is None
    assert org.queue_names() == ("Empty", "Sales Team")
    assert org.is_active("41629779") and not org.is_active("41629780")


def test_a_failed_queue_read_keeps_the_last_queues_and_the_people_refresh(
    runtime: Runtime, crm: MemoryCRM
) -> None:
    directory = Directory.from_runtime(runtime)
    directory.refresh("sandbox")
    crm.queue_error = FatalError("HTTP 403: MISSING_SCOPES: settings.users.teams.read")
    crm.users = [ANA, BO, CRMUser("41629781", "Cy New")]
    result = directory.refresh("sandbox")
    assert result.ok and result.people == 3 and result.queues is None
    assert "queues not read: HTTP 403: MISSING_SCOPES" in str(result)
    assert directory.display_name("sandbox", "41629781") == "Cy New"
    assert DirectoryOrg(runtime.sessions, "sandbox").queue_names() == ("Empty", "Sales Team")


def test_queues_command_lists_them(runtime: Runtime, crm: MemoryCRM, tmp_path: Path) -> None:
    env = tmp_path / "queues.env"
    env.write_text(f"DATABASE_URL={runtime.settings.database_url}\nQUEUE_URL=memory://\n")
    run = CliRunner()
    empty = run.invoke(
        main, ["--env-file", str(env), "directory", "queues", "sandbox"], catch_exceptions=False
    )
    assert "no queues cached for sandbox" in empty.output
    Directory.from_runtime(runtime).refresh("sandbox")
    listed = run.invoke(
        main, ["--env-file", str(env), "directory", "queues", "sandbox"], catch_exceptions=False
    )
    assert listed.exit_code == 0
    assert "368389" in listed.output and "Sales Team" in listed.output and "9586504, 9586505" in listed.output
