"""`crm-approvals report`: time in each step, pass and rejection rates, waiting time per
approver and the slowest steps (connector/service/reports.py), as tables or CSV."""

from __future__ import annotations

import csv
import sys
from collections.abc import Sequence
from typing import Any

import click
from pydantic import ValidationError
from rich import box
from rich.console import Console
from rich.table import Table

from connector.cli import Context, pass_context
from connector.commands.database import command_session
from connector.service.reports import (
    Durations,
    Report,
    ReportFilters,
    build_report,
    format_duration,
    format_rate,
)
from connector.service.request_query import MOMENT_FORMS

SECTIONS = ("rules", "steps", "approvers", "slowest")


@click.command("report")
@click.option("--rule", help="Only requests of this rule.")
@click.option("--object", "object_type", help="Only records of this CRM object (case-insensitive).")
@click.option("--connection", help="Only records of this connection.")
@click.option("--approver", help="Only steps this user was assigned to, and this user's votes.")
@click.option("--since", help=f"From this moment on: {MOMENT_FORMS}.")
@click.option("--until", help=f"Before this moment: {MOMENT_FORMS}.")
@click.option(
    "--csv",
    "as_csv",
    is_flag=True,
    help="Print CSV (one table per section, each after a '# section' line; durations in seconds).",
)
@click.option(
    "--section",
    type=click.Choice(SECTIONS),
    multiple=True,
    help="Only this section; repeat for several [default: all].",
)
@pass_context
def report(ctx: Context, as_csv: bool, section: tuple[str, ...], **options: Any) -> None:
    """Report on the approval history, as tables (tab-separated when piped): per rule the
    pass and rejection rates, per step the time spent in it (p50/p90/max), per approver
    the time until their vote, and the slowest steps (by p90).

    Times are from the stored step entry and exit dates. Every filter narrows the report;
    the period (--since/--until) bounds when steps were entered, votes cast and requests
    submitted.
    """
    from connector.clock import utcnow

    filters = _filters(options)
    with command_session(ctx) as session:
        result = build_report(session, filters, utcnow())
    shown = section or SECTIONS
    tables = {name: TABLES[name](result) for name in shown}
    if as_csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        for name, (columns, _rows, seconds) in tables.items():
            click.echo(f"# {name}")
            writer.writerow(columns)
            writer.writerows(seconds)
        return
    console = Console()
    for name, (columns, rows, _seconds) in tables.items():
        if not console.is_terminal:  # piped: tab-separated, as `requests list` prints
            click.echo(f"# {TITLES[name]}")
            for line in (columns, *rows):
                click.echo("\t".join(line))
            continue
        table = Table(title=TITLES[name], title_justify="left", box=box.SIMPLE_HEAD, header_style="bold")
        for n, column in enumerate(columns):
            table.add_column(column, justify="left" if n < LEFT_COLUMNS[name] else "right")
        for row in rows:
            table.add_row(*row)
        if not rows:
            console.print(f"[bold]{TITLES[name]}[/bold]: nothing in this period and scope")
        else:
            console.print(table)


def _filters(options: dict[str, Any]) -> ReportFilters:
    values = {("object" if k == "object_type" else k): v for k, v in options.items() if v is not None}
    try:
        return ReportFilters.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else "since"
        raise click.BadParameter(first["msg"].removeprefix("Value error, "), param_hint=f"--{name}") from None


# Each section: columns, rows for people (durations as 2d 4h), rows for CSV (seconds).
Rows = tuple[Sequence[str], list[list[str]], list[list[Any]]]


def _times(d: Durations) -> list[str]:
    return [format_duration(d.p50), format_duration(d.p90), format_duration(d.max)]


def _seconds(d: Durations) -> list[Any]:
    return [None if v is None else int(v.total_seconds()) for v in (d.p50, d.p90, d.max)]


def _rules(r: Report) -> Rows:
    columns = (
        "RULE",
        "SUBMITTED",
        "APPROVED",
        "REJECTED",
        "EXPIRED",
        "RECALLED",
        "OPEN",
        "PASS",
        "REJECTION",
    )
    people, machine = [], []
    for f in r.rules:
        counts = [f.submitted, f.approved, f.rejected, f.expired, f.recalled, f.open]
        people.append([f.rule, *map(str, counts), format_rate(f.pass_rate), format_rate(f.rejection_rate)])
        machine.append([f.rule, *counts, _ratio(f.pass_rate), _ratio(f.rejection_rate)])
    return columns, people, machine


def _steps(r: Report, steps: Sequence[Any] | None = None) -> Rows:
    columns = ("RULE", "STEP", "ENTERED", "APPROVED", "REJECTED", "OPEN", "PASS", "P50", "P90", "MAX")
    people, machine = [], []
    for f in r.steps if steps is None else steps:
        counts = [f.entered, f.approved, f.rejected, f.open]
        people.append([f.rule, f.step, *map(str, counts), format_rate(f.pass_rate), *_times(f.time)])
        machine.append([f.rule, f.step, *counts, _ratio(f.pass_rate), *_seconds(f.time)])
    return columns, people, machine


def _slowest(r: Report) -> Rows:
    return _steps(r, r.slowest)


def _approvers(r: Report) -> Rows:
    columns = ("APPROVER", "VOTES", "APPROVED", "REJECTED", "WAITING NOW", "WAIT P50", "WAIT P90", "WAIT MAX")
    people, machine = [], []
    for f in r.approvers:
        counts = [f.votes, f.approved, f.rejected, f.waiting_now]
        people.append([f.approver, *map(str, counts), *_times(f.wait)])
        machine.append([f.approver, *counts, *_seconds(f.wait)])
    return columns, people, machine


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


TABLES = {"rules": _rules, "steps": _steps, "approvers": _approvers, "slowest": _slowest}
TITLES = {
    "rules": "Pass and rejection rates per rule",
    "steps": "Time in each step",
    "approvers": "Waiting time per approver (step entered -> vote)",
    "slowest": "Slowest steps (by p90)",
}
LEFT_COLUMNS = {"rules": 1, "steps": 2, "approvers": 1, "slowest": 2}

COMMANDS = [report]
