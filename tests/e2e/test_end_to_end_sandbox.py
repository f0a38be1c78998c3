"""The `make run` story, automated with no mocks of our code: in the sandbox CRM a rep
raises a deal's amount above the shipped example's threshold -> a pending approval is
visible through the API and on the sandbox page -> the approvers approve through the API
-> the sandbox page shows "Approved" with the expiry date 180 days ahead."""

from __future__ import annotations

import re
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import responses
from sqlalchemy import func, select

from connector.rules import MappingSet
from connector.sandbox.app import SandboxConfig, create_sandbox_app
from connector.storage.db import transaction
from connector.storage.inbox import process_pending
from connector.storage.models import ApprovalRequestRow
from connector.storage.outbox import flush
from connector.storage.tokens import create_token
from connector.wiring import attach_pipeline
from tests.sandbox.test_sandbox import API_TOKEN, browser_app, deal_form, forward_to

ROOT = Path(__file__).resolve().parents[2]


def test_raise_amount_in_sandbox_then_approve_through_the_api(
    tmp_path: Path, settings_factory: Any, runtime_factory: Any, app_factory: Any
) -> None:
    mappings = tmp_path / "mappings"
    mappings.mkdir()
    shutil.copy(ROOT / "mappings/examples/sandbox-deals.yaml", mappings)
    settings = settings_factory(
        env={"SANDBOX_API_TOKEN": API_TOKEN, "SANDBOX_DB_PATH": str(tmp_path / "sandbox.db")},
        mappings_dir=str(mappings),
    )
    runtime = runtime_factory(settings)
    pipeline = attach_pipeline(runtime, MappingSet.load(mappings))
    ours = app_factory(runtime).test_client()
    sandbox_app = browser_app(create_sandbox_app(SandboxConfig.from_settings(settings), start_delivery=False))
    sandbox = sandbox_app.test_client()
    store = sandbox_app.extensions["sandbox"].store
    sender = sandbox_app.extensions["sandbox"].sender

    def work() -> None:
        """What the worker does between HTTP calls: inbox, outbox, and the sandbox's echoes."""
        process_pending(runtime.sessions, pipeline)
        flush(runtime.sessions, runtime.adapter)
        if sender.deliver_due():
            process_pending(runtime.sessions, pipeline)

    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.add_callback(
            responses.POST, f"{settings.public_base_url}/webhooks/standard", callback=forward_to(ours)
        )
        for method in (responses.GET, responses.POST):
            rsps.add_callback(
                method, re.compile(re.escape(settings.sandbox_url) + "/api/.*"), forward_to(sandbox)
            )

        assert (
            sandbox.post("/deals/D-1002", data=deal_form(store, "D-1002", amount="150000")).status_code == 303
        )
        work()
        assert _status_cell(sandbox, "D-1002") == "Pending"

        # The manager sees it waiting for them, then each step's approver approves.
        manager = _token(runtime, "u-mgr-boris")
        [request] = ours.get("/api/v1/requests?pending_for=me", headers=manager).get_json()["requests"]
        assert request["record"]["id"] == "D-1002" and request["current_step"]["name"] == "manager"
        steps = []
        while request["status"] == "pending":
            step = request["current_step"]
            steps.append(step["name"])
            voter = _token(runtime, step["approvers"][0])
            answer = ours.post(
                f"/api/v1/requests/{request['id']}/approve", json={"comment": "ok"}, headers=voter
            )
            assert answer.status_code == 200, answer.get_json()
            request = answer.get_json()
        assert request["status"] == "approved"
        # amount > 100,000 needs the general manager; credit score 64 < 70 needs finance
        assert steps[:3] == ["manager", "general-manager", "finance"]
        work()

    expiry = (datetime.now(UTC).date() + timedelta(days=180)).isoformat()
    assert _status_cell(sandbox, "D-1002") == "Approved"
    assert expiry in _row(sandbox, "D-1002")
    with runtime.sessions() as session:  # the echo of our write-back opened nothing new
        assert session.scalar(select(func.count()).select_from(ApprovalRequestRow)) == 1


def _row(sandbox: Any, deal_id: str) -> str:
    page = sandbox.get("/").get_data(as_text=True)
    start = page.index(f'href="/deals/{deal_id}"')
    return page[start : page.index("</tr>", start)]


def _status_cell(sandbox: Any, deal_id: str) -> str:
    match = re.search(r'class="badge [a-z]+">([^<]+)<', _row(sandbox, deal_id))
    return match.group(1) if match else ""


def _token(runtime: Any, user: str) -> dict[str, str]:
    with transaction(runtime.sessions) as session:
        _info, token = create_token(session, user)
    return {"Authorization": f"Bearer {token}"}
