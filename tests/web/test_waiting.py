"""The web app shows requests held for a related approval (issue 12): the submitter's "my
requests" and the request page say "Waiting for a related approval" with what it waits for;
the admin list filters on it; the history shows the release."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from connector.config import Settings
from connector.runtime import Runtime
from tests.service.test_dependencies import World
from tests.web.helpers import ADMIN, SECRET, signed_in, text


@pytest.fixture
def world(
    tmp_path: Path,
    settings_factory: Callable[..., Settings],
    runtime_factory: Callable[[Settings], Runtime],
    app_factory: Callable[[Runtime], Any],
) -> Any:
    runtime = runtime_factory(settings_factory(secret_key=SECRET, admin_users=(ADMIN,)))
    world = World(runtime, tmp_path)
    return SimpleNamespace(deps=world, runtime=runtime, app=app_factory(runtime))


def test_a_waiting_contract_shows_what_it_waits_for_and_then_its_release(world: Any) -> None:
    world.deps.change("contract", "K-1")
    contract = world.deps.latest("contract", "K-1", "contract-approval").request
    company = world.deps.latest("company", "C-1", "company-approval").request
    page = text(signed_in(world, "u-rep").get(f"/app/requests/{contract.id}"))
    assert "Waiting for a related approval" in page
    assert f"waiting for company-approval of company C-1 (request {company.id})" in page
    assert "The chain starts when the related approval it waits for is granted" in page
    mine = text(signed_in(world, "u-rep").get("/app/mine"))
    assert "Waiting for a related approval" in mine, mine
    admin = signed_in(world, ADMIN)
    listed = admin.get("/app/admin?status=waiting").get_data(as_text=True)
    assert set(re.findall(r"/app/requests/([0-9a-f]+)", listed)) == {contract.id}

    world.deps.vote(company.id, "u-cfo")
    page = text(signed_in(world, "u-rep").get(f"/app/requests/{contract.id}"))
    assert "Resumed: the related approval was granted" in page
    assert f"company-approval of company C-1 approved (request {company.id})" in page
    assert "lawyer" in page


def test_an_open_service_step_says_the_service_decides_it(
    tmp_path: Path,
    settings_factory: Callable[..., Settings],
    runtime_factory: Callable[[Settings], Runtime],
    app_factory: Callable[[Runtime], Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.service.test_service_steps import make_world, submit

    runtime = make_world(
        tmp_path,
        settings_factory,
        runtime_factory,
        monkeypatch,
        "sync",
        secret_key=SECRET,
        admin_users=(ADMIN,),
    )
    request_id = submit(runtime)  # the check step is open; no worker has run it yet
    world = SimpleNamespace(runtime=runtime, app=app_factory(runtime))
    page = text(signed_in(world, ADMIN).get(f"/app/requests/{request_id}"))
    assert "decided by the service (an automatic check)" in page
