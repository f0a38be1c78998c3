"""Process reports: time in each step, pass and rejection rates, waiting time per approver,
and the slowest steps, from the stored steps (entered_at / left_at), votes and requests.

One function for `crm-approvals report` and the web app's Reports page. Every filter narrows
what is counted (AND). The period bounds the step's entry (steps), the vote's time (votes)
and the submission (rates). Steps still open count as open, never with a made-up duration.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from connector.service.request_query import MOMENT_FORMS, Moment
from connector.storage.models import ApprovalRequestRow, ApprovalStepRow, ApprovalVoteRow

SLOWEST_SHOWN = 10
# Requests in these statuses have an outcome; the rates are taken over them.
DECIDED = ("approved", "rejected", "expired", "recalled")


class ReportFilters(BaseModel):
    """Which history a report covers. Every filter narrows it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rule: str | None = Field(None, min_length=1, description="Only requests of this rule.")
    object: str | None = Field(None, min_length=1, description="Only this CRM object (case-insensitive).")
    connection: str | None = Field(None, min_length=1, description="Only records of this connection.")
    approver: str | None = Field(
        None, min_length=1, description="Only steps this user was assigned to, and this user's votes."
    )
    since: Moment | None = Field(None, description=f"From this moment on: {MOMENT_FORMS}.")
    until: Moment | None = Field(None, description=f"Before this moment: {MOMENT_FORMS}.")

    @model_validator(mode="after")
    def _ordered(self) -> ReportFilters:
        if self.since is not None and self.until is not None and self.since >= self.until:
            raise ValueError("since must be before until: the period would be empty")
        return self


@dataclass(frozen=True)
class Durations:
    """Nearest-rank percentiles of a set of durations (None when there are none)."""

    count: int
    p50: timedelta | None
    p90: timedelta | None
    max: timedelta | None

    @classmethod
    def of(cls, values: Iterable[timedelta]) -> Durations:
        ordered = sorted(values)
        if not ordered:
            return cls(0, None, None, None)
        return cls(len(ordered), percentile(ordered, 50), percentile(ordered, 90), ordered[-1])


def percentile(ordered: Sequence[timedelta], p: int) -> timedelta:
    """Nearest rank: the smallest value with at least p% of the values at or below it."""
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class StepFigures:
    rule: str
    step: str
    entered: int  # step activations (each round counts)
    approved: int
    rejected: int
    skipped: int
    open: int  # still pending
    time: Durations  # entered -> left, of the activations that left

    @property
    def pass_rate(self) -> float | None:
        decided = self.approved + self.rejected
        return self.approved / decided if decided else None


@dataclass(frozen=True)
class RuleFigures:
    rule: str
    submitted: int
    approved: int
    rejected: int
    expired: int
    recalled: int
    open: int
    time: Durations  # submitted -> closed, of the approved and rejected

    @property
    def decided(self) -> int:
        return self.approved + self.rejected + self.expired + self.recalled

    @property
    def pass_rate(self) -> float | None:
        return self.approved / self.decided if self.decided else None

    @property
    def rejection_rate(self) -> float | None:
        return self.rejected / self.decided if self.decided else None


@dataclass(frozen=True)
class ApproverFigures:
    approver: str
    votes: int
    approved: int
    rejected: int
    waiting_now: int  # open steps assigned to them without their vote
    wait: Durations  # step entered -> their vote


@dataclass(frozen=True)
class Report:
    filters: ReportFilters
    generated_at: datetime
    rules: list[RuleFigures] = field(default_factory=list)
    steps: list[StepFigures] = field(default_factory=list)
    approvers: list[ApproverFigures] = field(default_factory=list)

    @property
    def slowest(self) -> list[StepFigures]:
        """Steps by their p90 time, slowest first (steps no one has left yet are not ranked)."""
        timed = [s for s in self.steps if s.time.p90 is not None]
        timed.sort(key=lambda s: (s.time.p90, s.time.max), reverse=True)
        return timed[:SLOWEST_SHOWN]


def build_report(session: Session, filters: ReportFilters, now: datetime) -> Report:
    R, S, V = ApprovalRequestRow, ApprovalStepRow, ApprovalVoteRow
    scope = _request_scope(filters)

    requests = session.execute(
        select(R.rule_name, R.status, R.submitted_at, R.closed_at, R.id).where(
            *scope, *_period(R.submitted_at, filters)
        )
    ).all()
    steps = session.execute(
        select(
            R.rule_name,
            S.request_id,
            S.index.label("step_index"),  # not `index`: a Row is a tuple, and has .index()
            S.round,
            S.name,
            S.status,
            S.approvers,
            S.entered_at,
            S.left_at,
        )
        .join(R, R.id == S.request_id)
        .where(*scope, *_period(S.entered_at, filters))
    ).all()
    votes = session.execute(
        select(V.request_id, V.step_index, V.round, V.approver, V.decision, V.at)
        .join(R, R.id == V.request_id)
        .where(*scope, *_period(V.at, filters))
    ).all()
    step_entered = {
        (row.request_id, row.step_index, row.round): row.entered_at
        for row in session.execute(
            select(S.request_id, S.index.label("step_index"), S.round, S.entered_at)
            .join(R, R.id == S.request_id)
            .where(*scope)
        )
    }

    if filters.approver is not None:  # the approver's steps and votes, and requests they were in
        steps = [row for row in steps if filters.approver in (row.approvers or [])]
        votes = [row for row in votes if row.approver == filters.approver]
        involved = {row.request_id for row in steps} | {row.request_id for row in votes}
        requests = [row for row in requests if row.id in involved]

    return Report(
        filters=filters,
        generated_at=now,
        rules=_rule_figures(requests),
        steps=_step_figures(steps),
        approvers=_approver_figures(steps, votes, step_entered, filters.approver),
    )


def _request_scope(filters: ReportFilters) -> list[ColumnElement[bool]]:
    R = ApprovalRequestRow
    scope: list[ColumnElement[bool]] = []
    if filters.rule is not None:
        scope.append(R.rule_name == filters.rule)
    if filters.connection is not None:
        scope.append(R.connection == filters.connection)
    if filters.object is not None:
        scope.append(func.lower(R.object_type) == filters.object.lower())
    return scope


def _period(column: Any, filters: ReportFilters) -> list[ColumnElement[bool]]:
    bounds: list[ColumnElement[bool]] = []
    if filters.since is not None:
        bounds.append(column >= filters.since)
    if filters.until is not None:
        bounds.append(column < filters.until)
    return bounds


def _rule_figures(rows: Sequence[object]) -> list[RuleFigures]:
    by_rule: dict[str, list[object]] = defaultdict(list)
    for row in rows:
        by_rule[row.rule_name].append(row)  # type: ignore[attr-defined]
    figures = []
    for rule, items in sorted(by_rule.items()):
        statuses = [i.status for i in items]  # type: ignore[attr-defined]
        closed = [
            i.closed_at - i.submitted_at  # type: ignore[attr-defined]
            for i in items
            if i.status in ("approved", "rejected") and i.closed_at is not None  # type: ignore[attr-defined]
        ]
        figures.append(
            RuleFigures(
                rule=rule,
                submitted=len(items),
                approved=statuses.count("approved"),
                rejected=statuses.count("rejected"),
                expired=statuses.count("expired"),
                recalled=statuses.count("recalled"),
                open=sum(s not in DECIDED for s in statuses),
                time=Durations.of(closed),
            )
        )
    return figures


def _step_figures(rows: Sequence[object]) -> list[StepFigures]:
    by_step: dict[tuple[str, int, str], list[object]] = defaultdict(list)
    for row in rows:
        by_step[(row.rule_name, row.step_index, row.name)].append(row)  # type: ignore[attr-defined]
    figures = []
    for (rule, _index, name), items in sorted(by_step.items()):
        statuses = [i.status for i in items]  # type: ignore[attr-defined]
        figures.append(
            StepFigures(
                rule=rule,
                step=name,
                entered=len(items),
                approved=statuses.count("approved"),
                rejected=statuses.count("rejected"),
                skipped=statuses.count("skipped"),
                open=statuses.count("pending"),
                time=Durations.of(
                    i.left_at - i.entered_at  # type: ignore[attr-defined]
                    for i in items
                    if i.left_at is not None and i.status != "skipped"  # type: ignore[attr-defined]
                ),
            )
        )
    return figures


def _approver_figures(
    steps: Sequence[object],
    votes: Sequence[object],
    step_entered: dict[tuple[str, int, int], datetime],
    only: str | None,
) -> list[ApproverFigures]:
    waits: dict[str, list[timedelta]] = defaultdict(list)
    decisions: dict[str, list[str]] = defaultdict(list)
    for vote in votes:
        approver = vote.approver  # type: ignore[attr-defined]
        decisions[approver].append(vote.decision)  # type: ignore[attr-defined]
        entered = step_entered.get((vote.request_id, vote.step_index, vote.round))  # type: ignore[attr-defined]
        if entered is not None:
            waits[approver].append(max(timedelta(0), vote.at - entered))  # type: ignore[attr-defined]
    voted = {(v.request_id, v.step_index, v.round, v.approver) for v in votes}  # type: ignore[attr-defined]
    waiting_now: dict[str, int] = defaultdict(int)
    for step in steps:
        if step.status != "pending":  # type: ignore[attr-defined]
            continue
        for approver in step.approvers or []:  # type: ignore[attr-defined]
            if (step.request_id, step.step_index, step.round, approver) not in voted:  # type: ignore[attr-defined]
                waiting_now[approver] += 1
    people = set(decisions) | set(waiting_now)
    if only is not None:
        people &= {only}
    return [
        ApproverFigures(
            approver=person,
            votes=len(decisions[person]),
            approved=decisions[person].count("approve"),
            rejected=decisions[person].count("reject"),
            waiting_now=waiting_now[person],
            wait=Durations.of(waits[person]),
        )
        for person in sorted(people)
    ]


def format_duration(value: timedelta | None) -> str:
    """2d 4h, 3h 12m, 45m, 12s: the two largest units, for tables and charts."""
    if value is None:
        return "-"
    seconds = int(value.total_seconds())
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m"
    return f"{secs}s"


def format_rate(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"
