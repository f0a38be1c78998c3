"""Step timers over the database (connector/service/timers.py): the sweep reminds, escalates and
times out from stored due moments, exactly once even when sweeps race, on SQLite and PostgreSQL."""

from __future__ import annotations

import textwrap
import threading
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from itertools import count
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update

from connector.config import ConfigError, Settings, parse_connections
from connector.crm.base import CRMUser
from connector.directory import Directory
from connector.events import RecordChangeEvent
from connector.notify.models import Notification
from connector.notify.sender import NotificationSender
from connector.rules import MappingSet
from connector.runtime import Runtime
from connector.service.pipeline import Pipeline
from connector.service.timer_calendars import working_calendar
from connector.service.timers import StepTimers
from connector.storage import timers as timer_rows
from connector.storage.audit import verify
from connector.storage.db import transaction
from connector.storage.inbox import accept, process_pending
from connector.storage.models import ApprovalRequestRow, ApprovalTransitionRow, AuditEntry, OutboxUpdate
from connector.wiring import attach_step_timers
from tests.fakes import MemoryCRM
from tests.notify.test_notifications import Inbox, notify_settings, smtp  # noqa: F401  (fixture)

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)  # a Monday
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
  comment: approval_comment
rules:
  - name: big-deal
    when: {amount: {gt: 100000}}
    steps:
      - name: manager
        label: Sales manager
        mode: one
        approvers: [{field: owner_manager}]
        TIMING
      - name: finance
        mode: one
        approvers: [{user: u-fin-li}]
    on:
      submit: {set: {status: Pending}}
      approve: {set: {status: Approved}}
      reject: {set: {status: Rejected, comment: "{{ comment }}"}}
"""
REMIND_AND_ESCALATE = """remind_every: 24h
        remind_max: 2
        escalate_after: 48h
        escalate_to: {manager_of: approver}"""
PEOPLE = [
    CRMUser("u-rep-wang", "Wang Fang", "wang.fang@acme.example", "zh_CN", "u-mgr-piotr"),
    CRMUser("u-mgr-piotr", "Piotr Zieliński", "piotr@acme.example", "pl_PL", "u-gm-carla"),
    CRMUser("u-gm-carla", "Carla Rossi", "carla@acme.example", "en_US"),
    CRMUser("u-fin-li", "Li Na", "li.na@acme.example", "en_US"),
]
DEAL = {
    "name": "Contoso refresh",
    "amount": 150000,
    "currency": "EUR",
    "owner_id": "u-rep-wang",
    "owner_manager_id": "u-mgr-piotr",
    "approval_status": None,
}


class World:
    def __init__(self, runtime: Runtime, crm: MemoryCRM, pipeline: Pipeline, timers: StepTimers) -> None:
        self.runtime, self.crm, self.pipeline, self.timers = runtime, crm, pipeline, timers
        self.now = T0
        pipeline.approvals.clock = lambda: self.now
        timers.clock = lambda: self.now

    def submit(self, record_id: str = "D-1", **changes: Any) -> str:
        values = {**DEAL, **changes}
        self.crm.records[record_id] = dict(values)
        n = next(_ids)
        event = RecordChangeEvent(
            source="sandbox",
            connection="sandbox",
            object_type="deal",
            record_id=record_id,
            event_id=f"t{n}",
            occurred_at=self.now,
            dedupe_key=f"sandbox:timers:{n}",
            changed_fields=tuple(values),
            values=values,
        )
        accept(self.runtime.sessions, [event])
        process_pending(self.runtime.sessions, self.pipeline)
        with self.runtime.sessions() as session:
            return session.scalars(
                select(ApprovalRequestRow.id).where(ApprovalRequestRow.record_id == record_id)
            ).one()

    def sweep(self, at: datetime | None = None) -> Any:
        if at is not None:
            self.now = at
        return self.timers.sweep(self.pipeline.approvals, self.runtime.sessions)

    def history(self, request_id: str) -> list[tuple[str, str | None]]:
        with self.runtime.sessions() as session:
            rows = session.scalars(
                select(ApprovalTransitionRow)
                .where(ApprovalTransitionRow.request_id == request_id)
                .order_by(ApprovalTransitionRow.seq)
            )
            return [(r.kind, r.comment) for r in rows]

    def notifications(self, **where: Any) -> list[Notification]:
        with self.runtime.sessions() as session:
            query = select(Notification).order_by(Notification.id)
            for key, value in where.items():
                query = query.where(getattr(Notification, key) == value)
            return list(session.scalars(query))

    def timer(self, request_id: str) -> timer_rows.ApprovalTimerRow | None:
        with self.runtime.sessions() as session:
            return session.get(timer_rows.ApprovalTimerRow, request_id)

    def sender(self) -> NotificationSender:
        return NotificationSender(
            self.runtime.sessions,
            self.runtime.settings,
            Directory.from_runtime(self.runtime),
            clock=lambda: self.now,
        )


def make_world(
    tmp_path: Path,
    runtime_factory: Callable[[Settings], Runtime],
    settings: Settings,
    timing: str = REMIND_AND_ESCALATE,
) -> World:
    mappings = tmp_path / "mappings"
    mappings.mkdir(exist_ok=True)
    (mappings / "deals.yaml").write_text(textwrap.dedent(MAPPING).replace("TIMING", timing))
    runtime = runtime_factory(replace(settings, mappings_dir=str(mappings)))
    crm = MemoryCRM()
    crm.users = list(PEOPLE)
    runtime.set_adapter("sandbox", crm)
    Directory.from_runtime(runtime).refresh("sandbox")
    pipeline = Pipeline(runtime, MappingSet.load(mappings))
    runtime.processor = pipeline
    return World(runtime, crm, pipeline, attach_step_timers(runtime, pipeline.approvals))


@pytest.fixture
def world_factory(
    tmp_path: Path,
    runtime_factory: Callable[[Settings], Runtime],
    settings_factory: Any,
    smtp: Any,  # noqa: F811
) -> Callable[..., World]:
    def make(timing: str = REMIND_AND_ESCALATE, env: dict[str, str] | None = None) -> World:
        settings = settings_factory(env=env, public_base_url="https://approvals.acme.example")
        settings = replace(settings, notify=notify_settings(smtp[1]))
        return make_world(tmp_path, runtime_factory, settings, timing)

    return make


def test_reminders_then_escalation_to_the_approvers_manager_with_emails(
    world_factory: Callable[..., World],
    smtp: Any,  # noqa: F811
) -> None:
    inbox: Inbox = smtp[0]
    world = world_factory()
    request_id = world.submit()
    timer = world.timer(request_id)
    assert timer is not None and (timer.kind, timer.due_at, timer.step_index) == (
        "remind",
        T0 + timedelta(hours=24),
        0,
    )

    early = world.sweep(T0 + timedelta(hours=23, minutes=59))
    assert (early.reminded, early.escalated, early.timed_out, early.notices) == (0, 0, 0, 0)  # nothing due
    report = world.sweep(T0 + timedelta(hours=24))
    assert (report.reminded, report.notices) == (1, 1)
    assert world.sweep().reminded == 0  # the same due moment never acts twice
    [reminder] = world.notifications(event="reminder")
    assert (reminder.user_id, reminder.context["step_index"], reminder.context["round"]) == (
        "u-mgr-piotr",
        0,
        1,
    )
    world.sender().send_due()
    [mail] = inbox.to("piotr@acme.example")[-1:]
    assert mail["Subject"] == "Przypomnienie: Contoso refresh czeka na Twoją akceptację (Sales manager)"

    report = world.sweep(T0 + timedelta(hours=48))
    assert (report.escalated, report.reminded) == (1, 0)
    world.sender().send_due()
    [to_carla] = inbox.to("carla@acme.example")
    assert to_carla["Subject"] == "Escalated to you: Contoso refresh (Sales manager)"
    text = to_carla.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]
    assert "no decision within 48h" in text
    # the earlier approver and the submitter are told too
    assert [m["Subject"] for m in inbox.to("wang.fang@acme.example")] == [
        "已升级：Contoso refresh（Sales manager）"
    ]
    assert "Eskalacja" in inbox.to("piotr@acme.example")[-1]["Subject"]

    history = world.history(request_id)
    assert ("reminded", "reminder 1 of 2: waiting for u-mgr-piotr") in history
    assert (
        "escalated",
        "no decision within 48h; escalated to the approver's manager: added u-gm-carla",
    ) in history
    with world.runtime.sessions() as session:
        fired = session.scalars(select(AuditEntry).where(AuditEntry.kind == "timer_fired")).all()
        assert [(e.detail["timer"], e.detail["added"]) for e in fired] == [
            ("remind", []),
            ("escalate", ["u-gm-carla"]),
        ]
        # a reminder's one entry names its history row; an escalation keeps its transition entry
        assert fired[0].detail["comment"] == "reminder 1 of 2: waiting for u-mgr-piotr"
        assert fired[0].detail["seq"] == next(
            seq for seq, (kind, _text) in enumerate(history, 1) if kind == "reminded"
        )
        transitions = [
            e.detail["transition"]
            for e in session.scalars(select(AuditEntry).where(AuditEntry.kind == "transition"))
        ]
        assert "escalated" in transitions and "reminded" not in transitions
    assert verify(world.runtime.sessions).ok

    # Carla may now decide; the step's timer row goes with the step
    world.pipeline.approvals.vote(world.runtime.sessions, request_id, user="u-gm-carla", decision="approve")
    assert world.timer(request_id) is None  # the finance step has no timing
    assert world.sweep(T0 + timedelta(days=30)).reminded == 0


def test_reminders_stop_at_remind_max_and_when_someone_votes(world_factory: Callable[..., World]) -> None:
    world = world_factory("remind_every: 1h\n        remind_max: 3")
    request_id = world.submit()
    for hour in range(1, 10):
        world.sweep(T0 + timedelta(hours=hour))
    assert [k for k, _ in world.history(request_id)].count("reminded") == 3
    assert world.timer(request_id) is None
    other = world.submit("D-2")
    world.sweep(world.now + timedelta(hours=1))
    world.pipeline.approvals.vote(world.runtime.sessions, other, user="u-mgr-piotr", decision="approve")
    world.sweep(world.now + timedelta(hours=5))
    assert [k for k, _ in world.history(other)].count("reminded") == 1


@pytest.mark.parametrize(
    ("action", "status", "written"),
    [
        ("reject", "rejected", {"approval_status": "Rejected", "approval_comment": "Nobody answered"}),
        ("approve", "pending", None),
        ("skip", "pending", None),
    ],  # fmt: skip
)
def test_timeout_actions_write_their_reason_and_write_back_like_any_decision(
    world_factory: Callable[..., World], action: str, status: str, written: dict[str, str] | None
) -> None:
    world = world_factory(f'timeout: {{after: 2d, action: {action}, reason: "Nobody answered"}}')
    request_id = world.submit()
    report = world.sweep(T0 + timedelta(days=2))
    assert report.timed_out == 1
    history = world.history(request_id)
    assert (("timed_out", f"timed out ({action}): Nobody answered")) in history
    with world.runtime.sessions() as session:
        row = session.get(ApprovalRequestRow, request_id)
        assert row is not None and row.status == status
        updates = [u.fields for u in session.scalars(select(OutboxUpdate).order_by(OutboxUpdate.id))]
    if written is not None:
        assert updates[-1] == written
        [told] = world.notifications(event="rejected")
        assert told.user_id == "u-rep-wang"
    else:
        assert row.current_step == 1  # the chain moved on to finance, which was told
        assert [n.user_id for n in world.notifications(event="step_opened")][-1] == "u-fin-li"
    [timed_out] = world.notifications(event="timed_out")
    assert timed_out.user_id == "u-mgr-piotr"


ESCALATE_ONLY = "escalate_after: 24h\n        escalate_to: {manager_of: approver}"


def racing_sweeps(world: World, requests: int, kind: str = "reminded", event: str = "reminder") -> None:
    ids = [world.submit(f"D-{n}") for n in range(requests)]
    world.now = T0 + timedelta(hours=24)
    barrier = threading.Barrier(2)
    reports: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            barrier.wait()
            reports.append(world.timers.sweep(world.pipeline.approvals, world.runtime.sessions))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert sum(getattr(r, kind) for r in reports) == requests
    for request_id in ids:
        assert [k for k, _ in world.history(request_id)].count(kind) == 1
    assert len(world.notifications(event=event)) == requests
    with world.runtime.sessions() as session:
        fired = session.scalar(select(func.count()).where(AuditEntry.kind == "timer_fired"))
        assert fired == requests
    assert verify(world.runtime.sessions).ok


def test_two_racing_sweeps_remind_each_request_once_on_sqlite(world_factory: Callable[..., World]) -> None:
    world = world_factory("remind_every: 24h")
    world.timers.batch = 3  # several claim rounds per sweep
    racing_sweeps(world, 12)


def test_two_racing_sweeps_escalate_each_request_once_on_sqlite(world_factory: Callable[..., World]) -> None:
    world = world_factory(ESCALATE_ONLY)
    world.timers.batch = 3
    racing_sweeps(world, 8, "escalated", "escalated_to_you")


RACES = [("remind_every: 24h", "reminded", "reminder"), (ESCALATE_ONLY, "escalated", "escalated_to_you")]


@pytest.mark.parametrize(("timing", "kind", "event"), RACES)
def test_two_racing_sweeps_act_once_per_request_on_postgres(
    tmp_path: Path,
    runtime_factory: Callable[[Settings], Runtime],
    pg_url: str,
    timing: str,
    kind: str,
    event: str,
) -> None:
    env = {"CRM_CONNECTIONS": "sandbox"}
    settings = Settings(database_url=pg_url, connections=parse_connections(env), queue_url="memory://")
    world = make_world(tmp_path, runtime_factory, settings, timing)
    world.timers.batch = 3
    racing_sweeps(world, 12, kind, event)


def test_a_claimed_row_is_not_claimed_again_until_its_lease_runs_out(
    world_factory: Callable[..., World],
) -> None:
    world = world_factory("remind_every: 1h")
    request_id = world.submit()
    now = T0 + timedelta(hours=2)
    lease = timedelta(minutes=5)
    with transaction(world.runtime.sessions) as session:
        first, ids = timer_rows.claim_due(session, now, limit=10, lease=lease)
    assert ids == [request_id]
    with transaction(world.runtime.sessions) as session:
        assert timer_rows.claim_due(session, now, limit=10, lease=lease)[1] == []
    with transaction(world.runtime.sessions) as session:  # the first worker stalled past its lease
        second, ids = timer_rows.claim_due(session, now + lease + timedelta(seconds=1), limit=10, lease=lease)
    assert ids == [request_id]
    with pytest.raises(timer_rows.LostClaimError), transaction(world.runtime.sessions) as session:
        timer_rows.release(session, request_id, first)
    with transaction(world.runtime.sessions) as session:
        timer_rows.release(session, request_id, second)


def test_a_vote_while_a_timer_is_claimed_wins_and_the_timer_does_not_act(
    world_factory: Callable[..., World],
) -> None:
    world = world_factory("remind_every: 1h")
    request_id = world.submit()
    world.now = T0 + timedelta(hours=1)
    with transaction(world.runtime.sessions) as session:
        claim_id, _ = timer_rows.claim_due(session, world.now, limit=10, lease=timedelta(minutes=5))
    world.pipeline.approvals.vote(world.runtime.sessions, request_id, user="u-mgr-piotr", decision="approve")
    from connector.service.timers import SweepReport

    report = SweepReport()
    world.timers._fire_batch(
        world.pipeline.approvals, world.runtime.sessions, [request_id], claim_id, world.now, report
    )
    assert (report.reminded, report.lost + report.rescheduled) == (0, 1)
    assert "reminded" not in [k for k, _ in world.history(request_id)]


def test_business_hours_from_the_connection_settings(world_factory: Callable[..., World]) -> None:
    env = {
        "SANDBOX_WORKING_HOURS": "09:00-17:00",
        "SANDBOX_TIME_ZONE": "Europe/Warsaw",
        "SANDBOX_HOLIDAYS": "PL",
    }
    world = world_factory("remind_every: 8h", env=env)
    world.now = datetime(2026, 11, 10, 15, tzinfo=UTC)  # Tuesday 16:00 in Warsaw
    request_id = world.submit()
    timer = world.timer(request_id)
    # 1 h on Tuesday, Wednesday 11 Nov is a holiday, 7 h on Thursday: 16:00 Warsaw = 15:00 UTC
    assert timer is not None and timer.due_at == datetime(2026, 11, 12, 15, tzinfo=UTC)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"X_WORKING_HOURS": "09:00-17:00"}, "also set X_TIME_ZONE, X_HOLIDAYS"),
        ({"X_WORKING_HOURS": "9-5", "X_TIME_ZONE": "UTC", "X_HOLIDAYS": "PL"}, "must look like 09:00-17:00"),
        (
            {"X_WORKING_HOURS": "09:00-17:00", "X_TIME_ZONE": "Mars/Base", "X_HOLIDAYS": "PL"},
            "unknown time zone",
        ),
        ({"X_WORKING_HOURS": "09:00-17:00", "X_TIME_ZONE": "UTC", "X_HOLIDAYS": "XX"}, "not a country"),
        (
            {"X_WORKING_HOURS": "09:00-17:00", "X_TIME_ZONE": "UTC", "X_HOLIDAYS": "US-ZZ"},
            "no subdivision 'ZZ'",
        ),
        (
            {
                "X_WORKING_HOURS": "09:00-17:00",
                "X_TIME_ZONE": "UTC",
                "X_HOLIDAYS": "PL",
                "X_WORKING_DAYS": "fri-mon",
            },
            "runs backwards",
        ),
    ],
)
def test_a_bad_business_calendar_is_a_clear_config_error(env: dict[str, str], message: str) -> None:
    config = parse_connections({"CRM_CONNECTIONS": "x=sandbox", **env})["x"]
    with pytest.raises(ConfigError, match=message):
        working_calendar(config)


def test_business_calendar_variants() -> None:
    env = {
        "CRM_CONNECTIONS": "x=sandbox",
        "X_WORKING_HOURS": "08:30-16:30",
        "X_TIME_ZONE": "America/Los_Angeles",
        "X_HOLIDAYS": "us-ca",
        "X_WORKING_DAYS": "mon-thu",
    }
    calendar = working_calendar(parse_connections(env)["x"])
    assert (
        calendar.describe()
        == "business time (mon,tue,wed,thu 08:30-16:30 America/Los_Angeles, holidays of US-CA)"
    )
    assert (
        working_calendar(parse_connections({"CRM_CONNECTIONS": "x=sandbox"})["x"]).describe()
        == "calendar time"
    )


def test_a_step_that_gains_timing_in_the_mapping_file_acts_on_it_for_open_requests(
    world_factory: Callable[..., World], tmp_path: Path
) -> None:
    world = world_factory("description: no timing yet")
    request_id = world.submit()
    assert world.sweep(T0 + timedelta(days=3)).reminded == 0 and world.timer(request_id) is None
    mapping = tmp_path / "mappings" / "deals.yaml"
    mapping.write_text(mapping.read_text().replace("description: no timing yet", "remind_every: 1h"))
    world.pipeline.mappings.reload()
    report = world.sweep(T0 + timedelta(days=3))
    assert (report.rescheduled, report.reminded) == (1, 1)  # opened three days ago: due at once
    assert world.sweep(T0 + timedelta(days=3, minutes=30)).reminded == 0  # the next one is an hour later
    assert world.sweep(T0 + timedelta(days=3, hours=1)).reminded == 1


def test_a_step_that_loses_its_timing_leaves_no_timer_behind(
    world_factory: Callable[..., World], tmp_path: Path
) -> None:
    world = world_factory("remind_every: 1h")
    request_id = world.submit()
    assert world.timer(request_id) is not None
    mapping = tmp_path / "mappings" / "deals.yaml"
    mapping.write_text(mapping.read_text().replace("remind_every: 1h", "description: no timing now"))
    world.pipeline.mappings.reload()
    report = world.sweep(T0 + timedelta(days=1))
    assert report.reminded == 0
    assert world.timer(request_id) is None  # dropped, not claimed again by every later sweep
    assert world.sweep(T0 + timedelta(days=2)).reminded == 0


def test_a_later_steps_reminders_count_its_own_history_and_number_after_the_whole_history(
    world_factory: Callable[..., World], tmp_path: Path
) -> None:
    # The sweep decides reminders on the open step's rows alone (connector/storage/timer_reads.py):
    # the earlier step's reminders must not count, and the new row must follow the whole history.
    world = world_factory("remind_every: 1h")
    mapping = tmp_path / "mappings" / "deals.yaml"
    mapping.write_text(
        mapping.read_text().replace(
            "approvers: [{user: u-fin-li}]",
            "approvers: [{user: u-fin-li}]\n        remind_every: 1h\n        remind_max: 2",
        )
    )
    world.pipeline.mappings.reload()
    request_id = world.submit()
    assert world.sweep(T0 + timedelta(hours=1)).reminded == 1
    assert world.sweep(T0 + timedelta(hours=2)).reminded == 1  # step 0 has reminded twice
    world.now = T0 + timedelta(hours=2, minutes=30)
    world.pipeline.approvals.vote(world.runtime.sessions, request_id, user="u-mgr-piotr", decision="approve")
    assert world.sweep(T0 + timedelta(hours=3)).reminded == 0  # finance opened half an hour ago
    assert world.sweep(T0 + timedelta(hours=3, minutes=30)).reminded == 1
    assert world.sweep(T0 + timedelta(hours=4, minutes=30)).reminded == 1
    assert world.sweep(T0 + timedelta(hours=9)).reminded == 0  # remind_max 2 on this step
    with world.runtime.sessions() as session:
        rows = session.scalars(
            select(ApprovalTransitionRow)
            .where(ApprovalTransitionRow.request_id == request_id)
            .order_by(ApprovalTransitionRow.seq)
        ).all()
        assert [r.seq for r in rows] == list(range(1, len(rows) + 1))
        on_finance = [r.comment for r in rows if r.kind == "reminded" and r.step_index == 1]
        assert on_finance == [
            "reminder 1 of 2: waiting for u-fin-li",
            "reminder 2 of 2: waiting for u-fin-li",
        ]
        assert rows[-1].kind == "reminded" and rows[-1].step_index == 1
    to_li = world.notifications(event="reminder", user_id="u-fin-li")
    assert [n.context["reminder"] for n in to_li] == [1, 2]
    assert len({n.dedupe_key for n in to_li}) == 2
    assert world.timer(request_id) is None
    assert verify(world.runtime.sessions).ok


def test_a_starting_worker_leaves_right_due_moments_and_other_workers_claims_alone(
    world_factory: Callable[..., World],
) -> None:
    world = world_factory("remind_every: 1h")
    request_id = world.submit()
    now = T0 + timedelta(hours=2)
    with transaction(world.runtime.sessions) as session:
        claim_id, ids = timer_rows.claim_due(session, now, limit=10, lease=timedelta(minutes=5))
    assert ids == [request_id]
    starting = StepTimers(world.timers.calendars, world.timers.orgs, clock=lambda: now)
    # every open request is recomputed; a row that is already right is not rewritten
    assert starting.reschedule_after_mapping_change(world.pipeline.approvals, world.runtime.sessions) == 1
    timer = world.timer(request_id)
    assert timer is not None and (timer.claim_id, timer.due_at) == (claim_id, T0 + timedelta(hours=1))
    with world.runtime.sessions() as session:  # a wrong row is rewritten
        session.execute(
            update(timer_rows.ApprovalTimerRow).values(due_at=T0 + timedelta(days=9), claim_id=None)
        )
        session.commit()
    fresh = StepTimers(world.timers.calendars, world.timers.orgs, clock=lambda: now)
    assert fresh.reschedule_after_mapping_change(world.pipeline.approvals, world.runtime.sessions) == 1
    timer = world.timer(request_id)
    assert timer is not None and timer.due_at == T0 + timedelta(hours=1)


def test_on_sqlite_a_sweep_commits_with_the_sweep_settings_and_puts_them_back(
    world_factory: Callable[..., World],
) -> None:
    from sqlalchemy import event

    from connector.storage.db import SWEEP_CACHE_KB, SWEEP_CHECKPOINT_PAGES

    world = world_factory("remind_every: 24h")
    world.timers.batch = 2
    ids = [world.submit(f"D-{n}") for n in range(3)]
    # the first sweep recomputes every due moment (start-up work, in ordinary transactions)
    assert world.timers.sweep(world.pipeline.approvals, world.runtime.sessions).reminded == 0
    world.now = T0 + timedelta(hours=24)
    engine = world.runtime.engine

    def settings(dbapi_connection: Any) -> tuple[int, int]:
        pages = dbapi_connection.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
        return int(pages), int(dbapi_connection.execute("PRAGMA cache_size").fetchone()[0])

    at_commit: list[tuple[int, int]] = []
    listener = lambda conn: at_commit.append(settings(conn.connection.driver_connection))  # noqa: E731
    event.listen(engine, "commit", listener)
    try:
        assert world.timers.sweep(world.pipeline.approvals, world.runtime.sessions).reminded == 3
    finally:
        event.remove(engine, "commit", listener)
    assert at_commit and set(at_commit) == {(SWEEP_CHECKPOINT_PAGES, -SWEEP_CACHE_KB)}
    pooled = [engine.raw_connection() for _ in range(max(engine.pool.checkedin(), 1))]  # type: ignore[attr-defined]
    assert [settings(c.driver_connection) for c in pooled] == [(1000, -2000)] * len(pooled)
    for connection in pooled:
        connection.close()
    for request_id in ids:
        assert [k for k, _ in world.history(request_id)].count("reminded") == 1
