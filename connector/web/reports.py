"""The admin's Reports page: the figures of connector/service/reports.py as tables and
server-rendered SVG bar charts (no script, printable, readable without colours)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from flask import render_template, request
from flask.typing import ResponseReturnValue
from pydantic import ValidationError
from sqlalchemy import select

from connector.clock import utcnow
from connector.service.reports import Report, ReportFilters, build_report, format_duration, format_rate
from connector.storage.models import ApprovalRequestRow
from connector.web.blueprint import admin_required, blueprint, runtime
from connector.web.i18n import gettext

FILTER_NAMES = ("rule", "object", "connection", "approver", "since", "until")
CHART_WIDTH = 640  # px of the bar area's viewBox; the SVG scales with the page
LABEL_WIDTH = 220
BAR_HEIGHT, BAR_GAP = 18, 10


@dataclass(frozen=True)
class Bar:
    label: str
    value_text: str
    y: int
    width: float  # of the p90 (or the whole) bar
    inner_width: float | None = None  # of the p50 bar inside it


@dataclass(frozen=True)
class Chart:
    title: str
    bars: list[Bar]
    height: int
    width: int = CHART_WIDTH + LABEL_WIDTH + 220  # room for the value text after the longest bar
    label_width: int = LABEL_WIDTH


def _bars(items: Sequence[tuple[str, float, float | None, str]], scale: float | None = None) -> Chart | None:
    """Bars scaled to `scale` (default: the largest value, whose bar fills CHART_WIDTH)."""
    if not items:
        return None
    largest = scale or max(value for _, value, _, _ in items) or 1.0
    bars = [
        Bar(
            label=label,
            value_text=text,
            y=n * (BAR_HEIGHT + BAR_GAP),
            width=max(1.0, value / largest * CHART_WIDTH),
            inner_width=None if inner is None else max(1.0, inner / largest * CHART_WIDTH),
        )
        for n, (label, value, inner, text) in enumerate(items)
    ]
    return Chart("", bars, len(bars) * (BAR_HEIGHT + BAR_GAP))


def _seconds(value: timedelta | None) -> float:
    return value.total_seconds() if value is not None else 0.0


def step_chart(report: Report) -> Chart | None:
    items = [
        (
            f"{s.rule} · {s.step}",
            _seconds(s.time.p90),
            _seconds(s.time.p50),
            f"p50 {format_duration(s.time.p50)} · p90 {format_duration(s.time.p90)}",
        )
        for s in report.slowest
    ]
    return _bars(items)


def pass_chart(report: Report) -> Chart | None:
    items = [
        (r.rule, r.pass_rate * 100, None, f"{r.pass_rate * 100:.0f}%")
        for r in report.rules
        if r.pass_rate is not None
    ]
    return _bars(items, scale=100)  # rates against 100%, not against the best rule


def approver_chart(report: Report) -> Chart | None:
    items = [
        (
            a.approver,
            _seconds(a.wait.p90),
            _seconds(a.wait.p50),
            f"p50 {format_duration(a.wait.p50)} · p90 {format_duration(a.wait.p90)}",
        )
        for a in sorted(report.approvers, key=lambda a: _seconds(a.wait.p90), reverse=True)
        if a.wait.count
    ]
    return _bars(items)


@blueprint.get("/reports")
@admin_required
def reports() -> ResponseReturnValue:
    values = {name: request.args.get(name, "").strip() for name in FILTER_NAMES}
    error = None
    try:
        filters = ReportFilters.model_validate({k: v for k, v in values.items() if v})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = str(first["loc"][0]) if first["loc"] else "since"
        message = first["msg"].removeprefix("Value error, ")
        error = gettext("%(field)s: %(message)s", field=where, message=message)
        filters = ReportFilters.model_validate({})
    with runtime().sessions() as session:
        result = build_report(session, filters, utcnow())
        rules = sorted(set(session.scalars(select(ApprovalRequestRow.rule_name).distinct())))
        connections = sorted(set(session.scalars(select(ApprovalRequestRow.connection).distinct())))
    status = 400 if error else 200
    return render_template(
        "reports.html",
        report=result,
        values=values,
        error=error,
        rules=rules,
        connections=connections,
        step_chart=step_chart(result),
        pass_chart=pass_chart(result),
        approver_chart=approver_chart(result),
        duration=format_duration,
        rate=format_rate,
        bar_height=BAR_HEIGHT,
    ), status
