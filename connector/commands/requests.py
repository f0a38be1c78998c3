"""`crm-approvals requests list|show`: every approval request, for ops (docs/api.md has the
same filters on GET /api/v1/requests; both run connector/service/request_query.py).

On a terminal the output is a table; piped, it is tab-separated text with a header line, or
JSON with --json (the API's JSON).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, get_args

import click
from pydantic import ValidationError
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from connector.approvals.lifecycle import RequestStatus
from connector.cli import Context, pass_context
from connector.commands.database import command_session
from connector.service.request_query import MOMENT_FORMS, RequestFilters, find_request, find_requests

if TYPE_CHECKING:
    from connector.service.request_views import RequestDetail, RequestSummary

STATUSES: tuple[str, ...] = get_args(RequestStatus)
STATUS_STYLE = {"pending": "yellow", "approved": "green", "rejected": "red", "expired": "magenta"}


@click.group()
def requests() -> None:
    """Approval requests: list them with filters, show one with its chain, votes and history."""


@requests.command("list")
@click.option(
    "--status", multiple=True, type=click.Choice(STATUSES), help="Only this status; repeat for several."
)
@click.option("--rule", help="Only requests of this rule.")
@click.option("--connection", help="Only records of this connection.")
@click.option("--object", "object_type", help="Only records of this CRM object (case-insensitive).")
@click.option("--record", help="Only this record: CONNECTION:OBJECT:ID.")
@click.option("--older-than", help=f"Submitted before this: {MOMENT_FORMS}.")
@click.option("--newer-than", help=f"Submitted at or after this: {MOMENT_FORMS}.")
@click.option("--pending-for", help="Only requests whose open step waits for this user's vote.")
@click.option("--limit", type=int, default=50, show_default=True, help="Requests per page (1..500).")
@click.option("--cursor", help="Start after the last page: the cursor the previous page printed.")
@click.option("--json", "as_json", is_flag=True, help="Print the page as JSON (as the API answers it).")
@pass_context
def requests_list(ctx: Context, as_json: bool, **options: Any) -> None:
    """List requests, newest submitted first, one page at a time (times in UTC).

    Every filter narrows the list. The line after the table (on stderr) gives the command for
    the next page.
    """
    from connector.service.request_views import RequestList  # imports the metrics: not at start-up

    filters = _filters(options)
    with command_session(ctx) as session:
        page = RequestList.of(find_requests(session, filters, viewer=None))
    if as_json:
        click.echo(json.dumps(page.model_dump(mode="json"), indent=2))
    else:
        _print_list(page.requests)
    if page.next_cursor is not None:
        click.echo(
            f"{page.count} of {page.total} shown; next page: add --cursor {page.next_cursor}", err=True
        )
    elif not as_json:
        click.echo(f"{page.count} of {page.total} shown", err=True)


@requests.command("show")
@click.argument("request_id")
@click.option("--json", "as_json", is_flag=True, help="Print the request as JSON (as the API answers it).")
@pass_context
def requests_show(ctx: Context, request_id: str, as_json: bool) -> None:
    """Show one request: its record, the chain step by step, every vote and the full history
    (times in UTC)."""
    with command_session(ctx) as session:
        stored = find_request(session, request_id, viewer=None)
    if stored is None:
        raise click.ClickException(f"no request {request_id!r}; find ids with `crm-approvals requests list`")
    from connector.service.request_views import RequestDetail  # imports the metrics: not at start-up

    detail = RequestDetail.of(stored)
    if as_json:
        click.echo(json.dumps(detail.model_dump(mode="json"), indent=2))
        return
    _print_detail(detail)


def _filters(options: dict[str, Any]) -> RequestFilters:
    """The API's validation, so a bad value gets the same message here as there."""
    values = {("object" if k == "object_type" else k): v for k, v in options.items() if v not in (None, ())}
    values["status"] = list(options["status"])
    try:
        return RequestFilters.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else "options"
        message = first["msg"].removeprefix("Value error, ")
        option = "--" + ("object" if name == "object" else name.replace("_", "-"))
        raise click.BadParameter(message, param_hint=option) from None


# --- output ---------------------------------------------------------------------------------

LIST_COLUMNS = ("ID", "STATUS", "RULE", "RECORD", "SUBMITTER", "SUBMITTED", "OPEN STEP", "WAITING ON")


def _print_list(items: Sequence[RequestSummary]) -> None:
    rows = [
        (
            item.id,
            item.status,
            item.rule,
            item.record.ref,
            item.submitter,
            _when(item.submitted_at),
            _step_name(item),
            ", ".join(_waiting_on(item)),
        )
        for item in items
    ]
    _print_table(None, LIST_COLUMNS, rows, status_column=1)


def _print_detail(detail: RequestDetail) -> None:
    console = Console()
    facts = [
        ("request", detail.id),
        ("record", detail.record.ref),
        ("rule", detail.rule),
        ("status", detail.status),
        ("submitter", detail.submitter),
        ("submitted", _when(detail.submitted_at)),
        ("updated", _when(detail.updated_at)),
        ("approved", _when(detail.approved_at)),
        ("expires", _when(detail.expires_at)),
        ("closed", _when(detail.closed_at)),
        ("superseded by", detail.superseded_by or "-"),
        ("mapping", f"{detail.mapping.path} (sha256 {detail.mapping.hash[:12]})"),
        ("waiting on", ", ".join(_waiting_on(detail)) or "-"),
    ]
    for label, value in facts:
        if console.is_terminal:
            console.print(Text.assemble((f"{label:>13}", "bold"), "  ", value))
        else:
            click.echo(f"{label}\t{value}")
    chain = [
        (
            str(s.index + 1),
            str(s.round),
            s.name,
            s.mode,
            s.status,
            f"{sum(v.decision == 'approve' for v in s.votes)}/{s.required}",
            ", ".join(s.approvers) or "-",
            _when(s.entered_at),
            _when(s.left_at),
        )
        for s in detail.steps
    ]
    _print_table(
        "Chain",
        ("#", "ROUND", "STEP", "MODE", "STATUS", "APPROVALS", "APPROVERS", "ENTERED", "LEFT"),
        chain,
        status_column=4,
    )
    votes = [
        (
            _when(v.at),
            str(v.step_index + 1),
            str(v.round),
            v.approver
            + (" (admin)" if v.acting_admin else "")
            + (f" (deputy for {v.on_behalf_of})" if v.on_behalf_of else "")
            + (" (automatic)" if v.auto_reason else ""),
            v.decision,
            v.comment or "",
        )
        for v in detail.votes
    ]
    _print_table("Votes", ("AT", "STEP", "ROUND", "APPROVER", "DECISION", "COMMENT"), votes)
    history = [
        (
            str(t.seq),
            _when(t.at),
            t.kind,
            f"{t.from_status or '-'} -> {t.to_status}",
            str(t.step_index + 1) if t.step_index is not None else "",
            (t.actor or "(engine)") + (" (admin)" if t.acting_admin else ""),
            t.comment or "",
        )
        for t in detail.transitions
    ]
    _print_table("History", ("SEQ", "AT", "WHAT", "STATUS", "STEP", "BY", "COMMENT"), history)


def _print_table(
    title: str | None, columns: Sequence[str], rows: Iterable[Sequence[str]], status_column: int | None = None
) -> None:
    console = Console()
    if not console.is_terminal:
        if title:
            click.echo(f"\n# {title}")
        for line in (columns, *rows):
            click.echo("\t".join(cell.replace("\t", " ").replace("\n", " ") for cell in line))
        return
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, header_style="bold")
    for n, column in enumerate(columns):  # ids whole (people copy them), other cells folded, never cut
        table.add_column(column, no_wrap=n == 0 and column == "ID", overflow="fold")
    for row in rows:  # Text, not markup: a comment like "[red]" is shown as written
        cells = [Text(cell) for cell in row]
        if status_column is not None:
            cells[status_column].stylize(STATUS_STYLE.get(row[status_column], ""))
        table.add_row(*cells)
    console.print(table)


def _step_name(item: RequestSummary) -> str:
    step = item.current_step
    return f"{step.index + 1} {step.name}" if step is not None else "-"


def _waiting_on(item: RequestSummary) -> list[str]:
    """Approvers of the open step who have not voted on this round of it."""
    step = item.current_step
    if step is None:
        return []
    voted = {v.approver for v in step.votes}
    return [a for a in step.approvers if a not in voted]


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value is not None else "-"


COMMANDS = [requests]
