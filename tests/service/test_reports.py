"""Reports from stored step entry/exit dates and votes (connector/service/reports.py): the
figures are computed from rows written with known times, so each number is checked exactly."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from connector.config import Settings
from connector.runtime import Runtime
from connector.service.reports import Durations, ReportFilters, build_report, format_duration
from connector.storage.db import transaction
from connector.storage.models import ApprovalRequestRow, ApprovalStepRow, ApprovalVoteRow

T0 = datetime(2026, 10, 1, 9, 0, tzinfo=UTC)
H = timedelta(hours=1)


def add_request(
    session: object,
    request_id: str,
    *,
    rule: str = "big-deal",
    status: str = "approved",
    connection: str = "sandbox",
    object_type: str = "deal",
    submitted: datetime = T0,
    closed: datetime | None = None,
    steps: list[tuple[str, list[str], str, datetime, datetime | None]] = (),  # type: ignore[assignment]
    votes: list[tuple[int, str, str, datetime]] = (),  # type: ignore[assignment]
) -> None:
    session.add(  # type: ignore[attr-defined]
        ApprovalRequestRow(
            id=request_id,
            connection=connection,
            object_type=object_type,
            record_id=f"R-{request_id}",
            rule_name=rule,
            mapping_path="deals.yaml",
            mapping_hash="0" * 64,
            submitter="u-rep",
            status=status,
            current_step=None,
            record={},
            changed_fields=[],
            submitted_at=submitted,
            updated_at=submitted,
            closed_at=closed,
        )
    )
    for index, (name, approvers, step_status, entered, left) in enumerate(steps):
        session.add(  # type: ignore[attr-defined]
            ApprovalStepRow(
                request_id=request_id,
                index=index,
                round=1,
                name=name,
                mode="one",
                approvers=approvers,
                required=1,
                status=step_status,
                entered_at=entered,
                left_at=left,
            )
        )
    for step_index, approver, decision, at in votes:
        session.add(  # type: ignore[attr-defined]
            ApprovalVoteRow(
                request_id=request_id,
                step_index=step_index,
                round=1,
                approver=approver,
                decision=decision,
                at=at,
            )
        )


@pytest.fixture(params=["sqlite", "postgresql"])
def database(
    request: pytest.FixtureRequest,
    settings_factory: Callable[..., Settings],
    runtime_factory: Callable[[Settings], Runtime],
) -> Runtime:
    if request.param == "sqlite":
        return runtime_factory(settings_factory())
    return runtime_factory(settings_factory(database_url=request.getfixturevalue("pg_url")))


@pytest.fixture
def history(database: Runtime) -> Runtime:
    runtime = database
    with transaction(runtime.sessions) as s:
        # manager took 1h, 2h, 10h; finance 4h then open; one rejection at the manager
        add_request(
            s,
            "a",
            closed=T0 + 5 * H,
            steps=[
                ("manager", ["u-mgr"], "approved", T0, T0 + H),
                ("finance", ["u-fin"], "approved", T0 + H, T0 + 5 * H),
            ],
            votes=[(0, "u-mgr", "approve", T0 + H), (1, "u-fin", "approve", T0 + 5 * H)],
        )
        add_request(
            s,
            "b",
            status="pending",
            submitted=T0 + H,
            steps=[
                ("manager", ["u-mgr"], "approved", T0 + H, T0 + 3 * H),
                ("finance", ["u-fin"], "pending", T0 + 3 * H, None),
            ],
            votes=[(0, "u-mgr", "approve", T0 + 3 * H)],
        )
        add_request(
            s,
            "c",
            status="rejected",
            submitted=T0 + 2 * H,
            closed=T0 + 12 * H,
            steps=[("manager", ["u-mgr"], "rejected", T0 + 2 * H, T0 + 12 * H)],
            votes=[(0, "u-mgr", "reject", T0 + 12 * H)],
        )
        add_request(
            s,
            "d",
            rule="board-review",
            connection="hub",
            object_type="Deals",
            submitted=T0 + 30 * 24 * H,
            closed=T0 + 30 * 24 * H + 20 * H,
            steps=[("board", ["u-b1", "u-mgr"], "approved", T0 + 30 * 24 * H, T0 + 30 * 24 * H + 20 * H)],
            votes=[(0, "u-b1", "approve", T0 + 30 * 24 * H + 20 * H)],
        )
    return runtime


def report(runtime: Runtime, **filters: object):  # type: ignore[no-untyped-def]
    with runtime.sessions() as session:
        return build_report(session, ReportFilters.model_validate(filters), T0 + 90 * 24 * H)


def test_time_in_each_step_uses_entry_and_exit_dates(history: Runtime) -> None:
    result = report(history)
    steps = {(s.rule, s.step): s for s in result.steps}
    manager = steps[("big-deal", "manager")]
    assert (manager.entered, manager.approved, manager.rejected, manager.open) == (3, 2, 1, 0)
    assert manager.time == Durations(3, 2 * H, 10 * H, 10 * H)
    assert manager.pass_rate == pytest.approx(2 / 3)
    finance = steps[("big-deal", "finance")]
    assert (finance.entered, finance.open) == (2, 1)
    assert finance.time == Durations(1, 4 * H, 4 * H, 4 * H)  # the open one has no made-up duration
    assert [(s.rule, s.step) for s in result.slowest] == [
        ("board-review", "board"),
        ("big-deal", "manager"),
        ("big-deal", "finance"),
    ]


def test_pass_and_rejection_rates_per_rule(history: Runtime) -> None:
    rules = {r.rule: r for r in report(history).rules}
    big = rules["big-deal"]
    assert (big.submitted, big.approved, big.rejected, big.open) == (3, 1, 1, 1)
    assert big.pass_rate == 0.5 and big.rejection_rate == 0.5
    assert big.time == Durations(2, 5 * H, 10 * H, 10 * H)
    assert rules["board-review"].pass_rate == 1.0


def test_waiting_time_per_approver_and_open_work(history: Runtime) -> None:
    people = {a.approver: a for a in report(history).approvers}
    mgr = people["u-mgr"]
    assert (mgr.votes, mgr.approved, mgr.rejected) == (3, 2, 1)
    assert mgr.wait == Durations(3, 2 * H, 10 * H, 10 * H)
    assert people["u-fin"].waiting_now == 1  # request b's finance step waits for u-fin
    assert people["u-fin"].wait == Durations(1, 4 * H, 4 * H, 4 * H)


def test_filters_narrow_every_section(history: Runtime) -> None:
    by_rule = report(history, rule="board-review")
    assert [r.rule for r in by_rule.rules] == ["board-review"]
    assert [a.approver for a in by_rule.approvers] == ["u-b1"]
    assert [r.rule for r in report(history, object="deals").rules] == ["board-review"]  # case-insensitive
    assert [r.rule for r in report(history, connection="sandbox").rules] == ["big-deal"]
    period = report(history, since=T0.isoformat(), until=(T0 + 10 * 24 * H).isoformat())
    assert [r.rule for r in period.rules] == ["big-deal"]
    assert report(history, since="2026-12-01").rules == []
    only_fin = report(history, approver="u-fin")
    assert [a.approver for a in only_fin.approvers] == ["u-fin"]
    assert [s.step for s in only_fin.steps] == ["finance"]
    assert [(r.rule, r.submitted) for r in only_fin.rules] == [("big-deal", 2)]


def test_bad_filters_say_what_is_wrong() -> None:
    with pytest.raises(ValidationError, match="since must be before until"):
        ReportFilters.model_validate({"since": "2026-11-02", "until": "2026-11-01"})
    with pytest.raises(ValidationError, match="a duration such as"):
        ReportFilters.model_validate({"since": "last tuesday"})


def test_durations_are_shown_in_the_two_largest_units() -> None:
    assert format_duration(timedelta(days=2, hours=4, minutes=5)) == "2d 4h"
    assert format_duration(timedelta(hours=3, minutes=12)) == "3h 12m"
    assert format_duration(timedelta(seconds=12)) == "12s"
    assert format_duration(None) == "-"
