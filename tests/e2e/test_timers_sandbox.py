"""The issue 11 "done when" story, automated with no mocks of our code: the shipped sandbox example
with a short reminder interval; a deal's amount is raised in the sandbox CRM; nobody decides; the
worker's periodic sweep (the same `Tasks.run_sweep` the worker runs every minute) sends a reminder
e-mail to the mail catcher, then escalates to the approver's manager from the user directory, who
gets an e-mail too; both are in the request's history through the API, and the escalation's write-
back shows on the sandbox page."""

from __future__ import annotations

import re
import socket
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import responses

from connector.config import NotifySettings
from connector.notify.catcher import Mailbox, smtp_server
from connector.rules import MappingSet
from connector.sandbox.app import SandboxConfig, create_sandbox_app
from connector.wiring import attach_pipeline
from connector.worker import Tasks, make_huey
from tests.e2e.test_end_to_end_sandbox import _row, _status_cell, _token
from tests.sandbox.test_sandbox import API_TOKEN, Browser, deal_form, forward_to

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_ignored_step_reminds_then_escalates_to_the_approvers_manager(
    tmp_path: Path, settings_factory: Any, runtime_factory: Any, app_factory: Any
) -> None:
    mappings = tmp_path / "mappings"
    mappings.mkdir()
    example = (ROOT / "mappings/examples/sandbox-deals.yaml").read_text()
    assert "remind_every: 24h" in example and "escalate_after: 48h" in example
    short = example.replace("remind_every: 24h", "remind_every: 1min").replace(
        "escalate_after: 48h", "escalate_after: 3min"
    )
    (mappings / "sandbox-deals.yaml").write_text(short)

    mail_port = free_port()
    mailbox = Mailbox(tmp_path / "mail")
    catcher = smtp_server(mailbox, "127.0.0.1", mail_port)  # the mail catcher `make run` starts
    settings = settings_factory(
        env={"SANDBOX_API_TOKEN": API_TOKEN, "SANDBOX_DB_PATH": str(tmp_path / "sandbox.db")},
        mappings_dir=str(mappings),
    )
    settings = replace(
        settings,
        secret_key="timers-e2e-" + "k" * 40,  # signs the one-click links in the e-mails
        notify=NotifySettings(
            mail_catcher_smtp_port=mail_port, templates_dir=str(ROOT / "templates" / "notifications")
        ),
    )
    runtime = runtime_factory(settings)
    pipeline = attach_pipeline(runtime, MappingSet.load(mappings))
    now = [datetime.now(UTC)]
    pipeline.approvals.clock = lambda: now[0]
    assert pipeline.approvals.timers is not None
    pipeline.approvals.timers.clock = lambda: now[0]  # type: ignore[attr-defined]
    worker = Tasks(runtime, make_huey("memory://"))
    our_app = app_factory(runtime)
    ours = our_app.test_client()
    sandbox_app = create_sandbox_app(SandboxConfig.from_settings(settings), start_delivery=False)
    sandbox_app.test_client_class = Browser
    sandbox = sandbox_app.test_client()
    store = sandbox_app.extensions["sandbox"].store
    sender = sandbox_app.extensions["sandbox"].sender

    def sweep(after: timedelta) -> dict[str, Any]:
        """Time passes; the worker's periodic sweep runs (webhooks from the sandbox first)."""
        now[0] += after
        sender.deliver_due()
        summary = worker.run_sweep()
        if sender.deliver_due():  # our write-back's echo
            worker.run_sweep()
        return summary

    catcher.start()
    try:
        with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
            rsps.add_callback(
                responses.POST, f"{settings.public_base_url}/webhooks/standard", callback=forward_to(ours)
            )
            for method in (responses.GET, responses.POST):
                rsps.add_callback(
                    method, re.compile(re.escape(settings.sandbox_url) + "/api/.*"), forward_to(sandbox)
                )
            worker.run_sweep()  # the worker's start-up sweep (reads the directory from the sandbox)
            # a deal under the threshold is raised to 150,000: the manager step opens for Boris
            form = deal_form(store, "D-1002", amount="150000")
            assert sandbox.post("/deals/D-1002", data=form).status_code == 303
            sweep(timedelta(0))
            assert _status_cell(sandbox, "D-1002") == "Pending"
            subjects = [m.subject for m in mailbox.messages()]
            assert any(s.startswith("Approval needed:") for s in subjects), subjects  # Boris, en_US

            # nobody decides: a minute later the worker reminds Boris
            summary = sweep(timedelta(minutes=1))
            assert summary["step_timers"]["reminded"] == 1, summary
            reminders = [m for m in mailbox.messages() if m.subject.startswith("Reminder:")]
            assert [m.recipients for m in reminders] == [("boris.novak@sandbox.example",)]
            assert "still waits for your approval at step 1 of" in reminders[0].text
            # only once per due moment: another sweep in the same minute sends nothing
            sweep(timedelta(seconds=10))
            assert len([m for m in mailbox.messages() if m.subject.startswith("Reminder:")]) == 1

            # three minutes in: escalated to Boris's manager, Carla (directory), who is e-mailed
            summary = sweep(timedelta(minutes=2))
            assert summary["step_timers"]["escalated"] == 1, summary
            to_carla = [m for m in mailbox.messages() if "carla.rossi@sandbox.example" in m.recipients]
            assert [m.subject for m in to_carla] == ["已升级给您：Contoso POS refresh（Manager）"]  # zh_CN
            assert "no decision within 3min" in to_carla[0].text
            assert sum("/app/decide?token=" in link for link in to_carla[0].links) == 2  # approve, reject
            assert any(
                m.subject.startswith("Escalated:") and "boris.novak@sandbox.example" in m.recipients
                for m in mailbox.messages()
            )

            # both are in the request history, through the API
            carla = _token(runtime, "u-gm-carla")
            [request] = ours.get("/api/v1/requests?pending_for=me", headers=carla).get_json()["requests"]
            detail = ours.get(f"/api/v1/requests/{request['id']}", headers=carla).get_json()
            kinds = [(t["kind"], t["comment"]) for t in detail["transitions"]]
            assert ("reminded", "reminder 1 of 3: waiting for u-mgr-boris") in kinds
            assert (
                "escalated",
                "no decision within 3min; escalated to the approver's manager: added u-gm-carla",
            ) in kinds
            assert detail["current_step"]["approvers"] == ["u-mgr-boris", "u-gm-carla"]
            # the write-back of where it waits now names Carla too, on the sandbox page (the
            # sweep queued it after this sweep's outbox flush: the next one sends it)
            sweep(timedelta(seconds=10))
            assert "Carla Rossi" in _row(sandbox, "D-1002")

            # and on the request's page in the web app
            browser = our_app.test_client()
            with browser.session_transaction() as session:
                session["uid"] = "u-gm-carla"  # signed in (the sign-in flow: tests/web/test_sign_in.py)
            page = " ".join(browser.get(f"/app/requests/{request['id']}").get_data(as_text=True).split())
            # in Carla's language (zh_CN): "reminder sent", "escalated"
            assert "已发送提醒" in page and "reminder 1 of 3: waiting for u-mgr-boris" in page
            assert "已升级" in page and "escalated to the approver&#39;s manager: added u-gm-carla" in page

            # Carla approves the manager step from the API; the next steps go on as usual
            answer = ours.post(
                f"/api/v1/requests/{request['id']}/approve", json={"comment": "ok"}, headers=carla
            )
            assert answer.status_code == 200, answer.get_json()
            assert answer.get_json()["current_step"]["name"] != "manager"
    finally:
        catcher.stop()
