"""Notifications end to end: queued in the approval's transaction, sent by the worker to a real
local SMTP server (aiosmtpd) or to Slack through Apprise (mocked at the HTTP level with
`responses`), in the recipient's language, with retries, dead letters and no double send."""

from __future__ import annotations

import socket
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy
from email.message import EmailMessage
from itertools import count
from pathlib import Path
from typing import Any

import pytest
import responses
from aiosmtpd.controller import Controller
from sqlalchemy import event as sa_event
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from connector.config import NotifySettings, Settings
from connector.crm.base import CRMUser
from connector.directory import Directory
from connector.events import RecordChangeEvent
from connector.notify.channels import SmtpTransport
from connector.notify.models import Notification
from connector.notify.queue import NotificationQueue, queue_message
from connector.notify.sender import NotificationSender, requeue
from connector.rules import MappingSet
from connector.runtime import Runtime
from connector.service.pipeline import Pipeline
from connector.storage.db import transaction
from connector.storage.inbox import accept, process_pending
from connector.storage.models import ApprovalRequestRow, DeadLetter
from tests.fakes import MemoryCRM

REPO = Path(__file__).resolve().parents[2]
_ids = count()

MAPPING = """
connection: sandbox
object: deal
fields:
  name: name
  amount: {api: amount, type: money}
  currency: currency
  owner: {api: owner_id, type: user}
  owner_manager: {api: owner_manager_id, type: user}
  status: approval_status
groups:
  finance: [u-fin-li, u-fin-ola]
rules:
  - name: big-deal
    when: {amount: {gt: 100000}}
    expires_after: 180d
    steps:
      - name: manager
        label: Sales manager
        mode: one
        approvers: [{field: owner_manager}]
      - name: finance
        label: Finance
        mode: any
        approvers: [{group: finance}]
    on:
      submit: {set: {status: Pending}}
"""
PEOPLE = [
    CRMUser("u-rep-wang", "Wang Fang", "wang.fang@acme.example", "zh_CN", "u-mgr-piotr"),
    CRMUser("u-mgr-piotr", "Piotr Zieliński", "piotr@acme.example", "pl_PL"),
    CRMUser("u-fin-li", "Li Na", "li.na@acme.example", "en_US"),
    CRMUser("u-fin-ola", "Ola Berg", "ola.berg@acme.example", None),  # no locale: the default
]
DEAL = {
    "name": "Contoso <POS> refresh",
    "amount": 150000,
    "currency": "EUR",
    "owner_id": "u-rep-wang",
    "owner_manager_id": "u-mgr-piotr",
    "approval_status": None,
}
SLACK_URL = "slack://T1JJ3T3L2/A1BRTD4JD/TIiajkdnlazkcOXrIdevi7FQ"
SLACK_HOOK = "https://hooks.slack.com/services/T1JJ3T3L2/A1BRTD4JD/TIiajkdnlazkcOXrIdevi7FQ"


# --- a real SMTP server -----------------------------------------------------------------------


class Inbox:
    """What the local SMTP server received; `reply` makes it answer DATA with an error."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        self.reply: str | None = None

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.reply is not None:
            return self.reply
        parsed = message_from_bytes(envelope.original_content or envelope.content, policy=policy.default)
        self.messages.append(parsed)  # type: ignore[arg-type]
        return "250 OK"

    def to(self, address: str) -> list[EmailMessage]:
        return [m for m in self.messages if m["To"] == address]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def smtp() -> Iterator[tuple[Inbox, int]]:
    inbox = Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield inbox, port
    finally:
        controller.stop()


# --- the world: a mapping, a CRM with people, the pipeline --------------------------------------


class World:
    def __init__(self, runtime: Runtime, crm: MemoryCRM, pipeline: Pipeline) -> None:
        self.runtime = runtime
        self.crm = crm
        self.pipeline = pipeline
        self.clock = datetime.now(UTC)

    @property
    def sender(self) -> NotificationSender:
        return NotificationSender(
            self.runtime.sessions,
            self.runtime.settings,
            Directory.from_runtime(self.runtime),
            clock=lambda: self.clock,
        )

    def submit(self, **changes: Any) -> str:
        values = {**DEAL, **changes}
        self.crm.records["D-1"] = dict(values)
        n = next(_ids)
        event = RecordChangeEvent(
            source="sandbox",
            connection="sandbox",
            object_type="deal",
            record_id="D-1",
            event_id=f"m{n}",
            occurred_at=datetime.now(UTC),
            dedupe_key=f"sandbox:notify:{n}",
            changed_fields=tuple(values),
            values=values,
        )
        accept(self.runtime.sessions, [event])
        process_pending(self.runtime.sessions, self.pipeline)
        with self.runtime.sessions() as session:
            return session.scalars(
                select(ApprovalRequestRow.id).order_by(ApprovalRequestRow.submitted_at)
            ).all()[-1]

    def vote(self, request_id: str, user: str, decision: str = "approve", comment: str | None = None) -> None:
        with self.runtime.sessions() as session:
            row = session.get(ApprovalRequestRow, request_id)
            assert row is not None
            step_index = row.current_step or 0
        self.pipeline.approvals.vote(
            self.runtime.sessions,
            request_id,
            user=user,
            decision=decision,
            step_index=step_index,
            comment=comment,
        )

    def rows(self, **where: Any) -> list[Notification]:
        with self.runtime.sessions() as session:
            query = select(Notification).order_by(Notification.id)
            for key, value in where.items():
                query = query.where(getattr(Notification, key) == value)
            return list(session.scalars(query))


def notify_settings(port: int, **overrides: Any) -> NotifySettings:
    values: dict[str, Any] = {
        "smtp_host": "127.0.0.1",
        "smtp_port": port,
        "smtp_security": "none",
        "smtp_timeout_seconds": 5,
        "mail_from": "Approvals <approvals@acme.example>",
        "templates_dir": str(REPO / "templates" / "notifications"),
        "max_attempts": 3,
    }
    return NotifySettings(**{**values, **overrides})


@pytest.fixture
def world_factory(
    tmp_path: Path, runtime_factory: Callable[[Settings], Runtime], settings_factory: Any, smtp: Any
) -> Callable[..., World]:
    def make(env: dict[str, str] | None = None, **notify: Any) -> World:
        mappings = tmp_path / "mappings"
        mappings.mkdir(exist_ok=True)
        (mappings / "deals.yaml").write_text(textwrap.dedent(MAPPING))
        settings = settings_factory(
            env=env, mappings_dir=str(mappings), public_base_url="https://approvals.acme.example"
        )
        settings = replace(settings, notify=notify_settings(smtp[1], **notify))
        runtime = runtime_factory(settings)
        crm = MemoryCRM()
        crm.users = list(PEOPLE)
        runtime.set_adapter("sandbox", crm)
        Directory.from_runtime(runtime).refresh("sandbox")
        pipeline = Pipeline(runtime, MappingSet.load(mappings))
        runtime.processor = pipeline
        return World(runtime, crm, pipeline)

    return make


@pytest.fixture
def world(world_factory: Callable[..., World]) -> World:
    return world_factory()


# --- e-mail -------------------------------------------------------------------------------------


def test_step_opened_email_reaches_the_smtp_server_in_the_approvers_language(world: World, smtp: Any) -> None:
    inbox, _port = smtp
    request_id = world.submit()
    [row] = world.rows()  # queued with the request, in the same transaction
    assert (row.event, row.channel, row.user_id, row.status) == (
        "step_opened",
        "email",
        "u-mgr-piotr",
        "pending",
    )
    assert inbox.messages == []  # nothing is sent from inside the approval's transaction

    report = world.sender.send_due()
    assert report.sent == 1
    [message] = inbox.to("piotr@acme.example")
    assert message["From"] == "Approvals <approvals@acme.example>"
    assert message["Content-Language"] == "pl"
    assert message["Subject"] == "Wymagana akceptacja: Contoso <POS> refresh (Sales manager)"
    assert message.get_content_type() == "multipart/alternative"
    text = message.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]
    html = message.get_body(preferencelist=("html",)).get_content()  # type: ignore[union-attr]
    url = f"https://approvals.acme.example/app/requests/{request_id}"
    assert "Dzień dobry, Piotr Zieliński," in text
    assert "czeka na Twoją akceptację na etapie 1 z 2: Sales manager" in text
    assert "Kwota: 150\xa0000,00\xa0€" in text  # Babel, Polish
    assert "Zgłoszone przez: Wang Fang" in text  # the submitter's name from the directory
    assert f"Otwórz wniosek: {url}" in text
    assert '<html lang="pl">' in html
    assert "Contoso &lt;POS&gt; refresh" in html and "<POS>" not in html  # autoescaped
    assert f'href="{url}"' in html
    assert world.rows()[0].status == "done"
    assert world.sender.send_due().sent == 0  # never twice


def test_decisions_tell_the_submitter_in_their_language(world: World, smtp: Any) -> None:
    inbox, _port = smtp
    request_id = world.submit()
    world.vote(request_id, "u-mgr-piotr", comment="OK")
    world.sender.send_due()  # the finance step's messages go out while it is open
    world.vote(request_id, "u-fin-li", "reject", comment="Credit limit exceeded")
    world.sender.send_due()
    [rejected] = inbox.to("wang.fang@acme.example")
    assert rejected["Subject"] == "已拒绝：Contoso <POS> refresh"
    text = rejected.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]
    assert "在“Finance”步骤被 Li Na 拒绝" in text
    assert "备注：Credit limit exceeded" in text
    # Li Na's and Ola Berg's "finance step opened" messages: Ola's default is English
    [ola] = inbox.to("ola.berg@acme.example")
    assert ola["Subject"] == "Approval needed: Contoso <POS> refresh (Finance)"
    assert ola["Content-Language"] == "en"


def test_an_approval_tells_the_submitter_with_the_expiry(world: World, smtp: Any) -> None:
    inbox, _port = smtp
    request_id = world.submit()
    world.vote(request_id, "u-mgr-piotr")
    world.vote(request_id, "u-fin-ola")
    world.sender.send_due()
    [approved] = inbox.to("wang.fang@acme.example")
    text = approved.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]
    assert approved["Subject"] == "已批准：Contoso <POS> refresh"
    assert "已由 Ola Berg 批准" in text and "批准有效期至" in text


def test_rolled_back_changes_queue_nothing(world: World) -> None:
    request_id = world.submit()
    before = len(world.rows())
    queued_in_the_vote: list[int] = []

    def fail_commit(session: Session) -> None:
        queued = len(session.scalars(select(Notification)).all())
        if queued == before:
            return  # a read's commit (the vote reads the request and delegations first)
        queued_in_the_vote.append(queued)
        raise RuntimeError("the database refuses the vote's commit")

    def sessions() -> Session:
        session = world.runtime.sessions()
        sa_event.listen(session, "before_commit", fail_commit)
        return session

    with pytest.raises(RuntimeError):
        world.pipeline.approvals.vote(
            sessions, request_id, user="u-mgr-piotr", decision="approve", step_index=0
        )
    assert queued_in_the_vote and queued_in_the_vote[0] > before  # queued in the transaction...
    assert len(world.rows()) == before  # ...and gone with it


def test_own_recall_tells_nobody_an_admin_recall_tells_the_submitter(world: World) -> None:
    first = world.submit()
    world.pipeline.approvals.recall(
        world.runtime.sessions, first, user="u-rep-wang", comment=None, is_admin=False
    )
    assert world.rows(event="recalled") == []
    second = world.submit(amount=200000)
    world.pipeline.approvals.recall(
        world.runtime.sessions, second, user="u-admin", comment="duplicate", is_admin=True
    )
    [row] = world.rows(event="recalled")
    assert (row.user_id, row.context["actor"], row.context["comment"]) == (
        "u-rep-wang",
        "u-admin",
        "duplicate",
    )


def test_a_step_closed_before_sending_is_skipped(world: World, smtp: Any) -> None:
    inbox, _port = smtp
    request_id = world.submit()
    world.vote(request_id, "u-mgr-piotr")
    world.vote(request_id, "u-fin-li")  # `any`: Li decides before the finance messages go out
    report = world.sender.send_due()
    assert inbox.to("ola.berg@acme.example") == []
    assert report.skipped == 3  # Piotr's step and Li's and Ola's "finance step opened": all closed
    assert report.sent == 1  # only the approval, to the submitter
    assert {r.last_error for r in world.rows(status="skipped")} == {
        "the step closed before this message went out"
    }


def test_unreachable_smtp_is_retried_with_back_off_then_dead(world_factory: Any, smtp: Any) -> None:
    world = world_factory(smtp_port=free_port())  # nobody listens there
    world.submit()
    sender = world.sender
    assert sender.send_due().retried == 1
    [row] = world.rows()
    assert (row.status, row.attempts) == ("pending", 1)
    assert row.next_attempt_at is not None and row.next_attempt_at > world.clock
    assert "could not be reached" in (row.last_error or "")
    assert sender.send_due().retried == 0  # not due yet
    world.clock += timedelta(hours=1)
    assert world.sender.send_due().retried == 1
    world.clock += timedelta(hours=1)
    assert world.sender.send_due().dead == 1  # the third attempt of max_attempts=3
    [row] = world.rows()
    assert row.status == "dead" and "gave up after 3 attempts" in (row.last_error or "")
    with world.runtime.sessions() as session:
        [letter] = session.scalars(select(DeadLetter)).all()
    assert (letter.kind, letter.ref_id, letter.error_code) == ("notification", row.id, "too_many_attempts")


def test_a_permanent_smtp_refusal_is_a_dead_letter_at_once(world: World, smtp: Any) -> None:
    inbox, _port = smtp
    inbox.reply = "550 5.1.1 No such mailbox"
    world.submit()
    assert world.sender.send_due().dead == 1
    [row] = world.rows()
    assert row.status == "dead" and "550" in (row.last_error or "")
    with world.runtime.sessions() as session:
        letter = session.scalars(select(DeadLetter)).one()
    assert letter.payload["event"] == "step_opened" and letter.error_code == "Undeliverable"


def test_no_double_send_after_a_crash_between_send_and_settle(world: World, smtp: Any) -> None:
    inbox, _port = smtp
    world.submit()

    class CrashAfterSending:
        def send(self, message: EmailMessage) -> None:
            SmtpTransport(world.runtime.settings.notify).send(message)  # the server accepts it...
            raise SystemExit("worker killed before it could record the send")  # ...then we die

    crashing = NotificationSender(
        world.runtime.sessions,
        world.runtime.settings,
        Directory.from_runtime(world.runtime),
        email=CrashAfterSending(),
        clock=lambda: world.clock,
    )
    with pytest.raises(SystemExit):
        crashing.send_due()
    assert len(inbox.messages) == 1
    assert world.rows()[0].status == "sending"
    assert world.sender.send_due().sent == 0  # another worker while the lease runs: hands off
    world.clock += timedelta(minutes=5)  # the lease ran out: in doubt
    report = world.sender.send_due()
    assert (report.sent, report.in_doubt) == (0, 1)
    assert len(inbox.messages) == 1  # never sent twice
    [row] = world.rows()
    assert row.status == "dead" and (row.last_error or "").startswith("in doubt")
    # a person who checked decides to resend it: same Message-ID, so mail clients can fold the two
    assert requeue(world.runtime.sessions, row.id, now=world.clock) is not None
    assert world.sender.send_due().sent == 1
    assert inbox.messages[0]["Message-ID"] == inbox.messages[1]["Message-ID"]


# --- chat through Apprise -------------------------------------------------------------------


def test_a_user_chat_url_gets_a_slack_message(world_factory: Any) -> None:
    world = world_factory(env={"NOTIFY_USER_U_MGR_PIOTR_URLS": SLACK_URL})
    world = World(world.runtime, world.crm, world.pipeline)
    settings = replace(
        world.runtime.settings,
        notify=replace(world.runtime.settings.notify, chat_urls={"user:U_MGR_PIOTR": (SLACK_URL,)}),
    )
    world.runtime.settings = settings
    world.pipeline.approvals.notifications = NotificationQueue(settings)
    request_id = world.submit()
    assert {(r.channel, r.target) for r in world.rows()} == {("email", None), ("chat", "user:U_MGR_PIOTR")}
    with responses.RequestsMock() as rsps:
        rsps.post(SLACK_HOOK, body="ok")
        report = world.sender.send_due()
        [call] = rsps.calls
    assert report.sent == 2
    body = call.request.body.decode() if isinstance(call.request.body, bytes) else str(call.request.body)
    assert "Wymagana akceptacja" in body  # the same language as the e-mail
    assert f"/app/requests/{request_id}" in body
    assert SLACK_URL not in str([r.last_error for r in world.rows()])


def test_a_role_chat_channel_gets_one_message_per_event_and_retries(world_factory: Any) -> None:
    world = world_factory(email=False, chat_urls={"role:FINANCE": (SLACK_URL,)})
    request_id = world.submit()
    assert world.rows() == []  # the manager step: no chat for Piotr, e-mail off
    world.vote(request_id, "u-mgr-piotr")
    [row] = world.rows()  # one message to the finance channel, not one per member
    assert (row.channel, row.target) == ("chat", "role:FINANCE")
    with responses.RequestsMock() as rsps:
        rsps.post(SLACK_HOOK, status=500, body="internal_error")
        assert world.sender.send_due().retried == 1
    assert "Apprise could not deliver to role:FINANCE (slack)" in (world.rows()[0].last_error or "")
    world.clock += timedelta(hours=1)
    with responses.RequestsMock() as rsps:
        rsps.post(SLACK_HOOK, body="ok")
        assert world.sender.send_due().sent == 1
        body = rsps.calls[0].request.body
        assert "Finance" in (body.decode() if isinstance(body, bytes) else str(body))


def test_an_invalid_apprise_url_is_a_dead_letter_without_the_url(world_factory: Any) -> None:
    world = world_factory(email=False, chat_urls={"user:U_MGR_PIOTR": ("slack://not-a-token",)})
    world.submit()
    assert world.sender.send_due().dead == 1
    [row] = world.rows()
    assert "chat URL 1 of user:U_MGR_PIOTR is not a valid Apprise URL" in (row.last_error or "")
    assert "not-a-token" not in (row.last_error or "")


# --- the generic queue_message (the web app's sign-in e-mail) ---------------------------------


def test_queue_message_sends_a_sign_in_link_to_a_person_or_an_address(world: World, smtp: Any) -> None:
    inbox, _port = smtp
    link = "https://approvals.acme.example/app/sign-in/abc123"
    with transaction(world.runtime.sessions) as session:
        first = queue_message(
            session,
            connection="sandbox",
            user_id="u-rep-wang",
            template="sign_in",
            context={"links": {"sign_in": link}, "expires_minutes": 15},
            dedupe_key="sign-in:1",
        )
        again = queue_message(
            session,
            connection="sandbox",
            user_id="u-rep-wang",
            template="sign_in",
            context={"links": {"sign_in": link}},
            dedupe_key="sign-in:1",
        )
        queue_message(session, connection=None, email="guest@acme.example", template="sign_in",
                      context={"links": {"sign_in": link}}, dedupe_key="sign-in:2")  # fmt: skip
    assert first is not None and again is None  # the same dedupe key adds nothing
    assert world.sender.send_due().sent == 2
    [wang] = inbox.to("wang.fang@acme.example")
    assert wang["Subject"] == "您的 crm-approvals 登录链接"
    wang_text = wang.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]
    assert link in wang_text and "15 分钟后失效" in wang_text
    [guest] = inbox.to("guest@acme.example")
    assert guest["Subject"] == "Your sign-in link for crm-approvals"  # no directory entry: the default


def test_queue_message_says_what_is_missing() -> None:
    with pytest.raises(ValueError, match="needs a user_id"):
        queue_message(None, connection="x", template="sign_in", context={}, dedupe_key="k")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs its connection"):
        queue_message(None, connection=None, user_id="u", template="sign_in", context={}, dedupe_key="k")  # type: ignore[arg-type]


# --- expiry ------------------------------------------------------------------------------------


def test_the_submitter_is_warned_once_before_an_approval_expires(world: World, smtp: Any) -> None:
    inbox, _port = smtp
    request_id = world.submit()
    world.vote(request_id, "u-mgr-piotr")
    world.vote(request_id, "u-fin-li")
    queue = NotificationQueue(world.runtime.settings)
    approved_at = datetime.now(UTC)
    assert queue.queue_expiry_warnings(world.runtime.sessions, now=approved_at) == 0  # 180 days ahead
    soon = approved_at + timedelta(days=175)
    assert queue.queue_expiry_warnings(world.runtime.sessions, now=soon) == 1
    assert queue.queue_expiry_warnings(world.runtime.sessions, now=soon + timedelta(days=1)) == 0  # once
    world.sender.send_due()
    [warning] = [m for m in inbox.to("wang.fang@acme.example") if "即将过期" in m["Subject"]]
    assert warning["Subject"] == "审批即将过期：Contoso <POS> refresh"
    # and at expiry the submitter hears it has expired
    world.pipeline.approvals.clock = lambda: approved_at + timedelta(days=181)
    assert world.pipeline.approvals.expire_due(world.runtime.sessions) == 1
    [expired] = world.rows(event="expired")
    assert expired.user_id == "u-rep-wang"


def test_every_row_is_one_event_recipient_and_channel(world: World) -> None:
    request_id = world.submit()
    world.vote(request_id, "u-mgr-piotr")
    with world.runtime.sessions() as session:
        keys = session.scalars(select(Notification.dedupe_key)).all()
        total = session.scalar(select(func.count()).select_from(Notification))
    assert len(set(keys)) == total == 3  # Piotr's step, then Li's and Ola's
    assert f"{request_id}:step_opened:1:1:user:u-fin-li:email" in keys
