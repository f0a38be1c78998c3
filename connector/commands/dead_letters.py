"""`crm-approvals dead-letters list|show|retry|discard` and `crm-approvals replay`:
see what could not be done, and do it again once the cause is fixed (docs/operations.md).
The logic is connector/service/dead_letters.py, shared with /api/v1/dead-letters."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import click

from connector.cli import Context, pass_context

if TYPE_CHECKING:
    from connector.runtime import Runtime
    from connector.service.dead_letters import Action
    from connector.storage.dead_letters import DeadLetterFilter
    from connector.storage.models import DeadLetter

AGE_HELP = "90s, 30m, 2h, 3d or 1w (m = minutes)"


def _filter_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--connection", help="Only this connection, e.g. salesforce."),
        click.option("--object", "object_type", help="Only this CRM object, e.g. Opportunity."),
        click.option("--code", help="Only this CRM error code, e.g. FIELD_CUSTOM_VALIDATION_EXCEPTION."),
        click.option("--kind", type=click.Choice(["outbox", "inbox"]), help="Write-backs or events."),
        click.option("--older-than", metavar="AGE", help=f"Created at least this long ago: {AGE_HELP}."),
        click.option("--newer-than", metavar="AGE", help=f"Created at most this long ago: {AGE_HELP}."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _build_filter(ids: tuple[int, ...] = (), state: str = "open", **given: Any) -> DeadLetterFilter:
    from connector.service.dead_letters import parse_age
    from connector.storage.dead_letters import DeadLetterFilter

    ages = {}
    for name in ("older_than", "newer_than"):
        if given.get(name):
            try:
                ages[name] = parse_age(given[name])
            except ValueError as exc:
                raise click.BadParameter(str(exc), param_hint=f"--{name.replace('_', '-')}") from None
    return DeadLetterFilter(
        ids=ids,
        kind=given.get("kind"),
        connection=given.get("connection"),
        object_type=given.get("object_type"),
        code=given.get("code"),
        state=state,
        **ages,
    )


@click.group("dead-letters")
def dead_letters() -> None:
    """Write-backs the CRM refused and events that could not be processed.

    Each carries the CRM's own error code and message. Fix the cause (the record, the
    mapping, the CRM's validation rule), then `retry`; or `discard` what no longer matters.
    """


@dead_letters.command("list")
@_filter_options
@click.option(
    "--state",
    type=click.Choice(["open", "resolved", "all"]),
    default="open",
    show_default=True,
    help="Unresolved ones, resolved ones (retried or discarded), or both.",
)
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True)
@click.option("--offset", type=click.IntRange(0), default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@pass_context
def list_command(ctx: Context, state: str, limit: int, offset: int, as_json: bool, **filters: Any) -> None:
    """List dead letters, oldest first."""
    from connector.service.dead_letters import letter_json, list_letters

    runtime = _runtime(ctx)
    page = list_letters(runtime.sessions, _build_filter(state=state, **filters), limit=limit, offset=offset)
    if as_json:
        click.echo(json.dumps({"dead_letters": [letter_json(x) for x in page.items], "total": page.total}))
        return
    if not page.items:
        click.echo(f"no {state if state != 'all' else ''} dead letters match".replace("  ", " "))
        return
    click.echo(f"{'ID':>5}  {'KIND':<6}  {'CREATED':<16}  {'STATE':<10}  {'RECORD':<32}  ERROR")
    for letter in page.items:
        click.echo(
            f"{letter.id:>5}  {letter.kind:<6}  {_when(letter.created_at):<16}  {_state(letter):<10}  "
            f"{_record(letter):<32}  {_error(letter)[:100]}"
        )
    shown_to = offset + len(page.items)
    more = f"; next page: --offset {shown_to}" if shown_to < page.total else ""
    click.echo(f"{len(page.items)} shown of {page.total}{more}")


@dead_letters.command("show")
@click.argument("letter_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_context
def show_command(ctx: Context, letter_id: int, as_json: bool) -> None:
    """Everything about one dead letter: the CRM's message, the fields it blamed, the payload."""
    from connector.service.dead_letters import get_letter, letter_json

    letter = get_letter(_runtime(ctx).sessions, letter_id)
    if letter is None:
        raise click.ClickException(f"no dead letter {letter_id}; see `crm-approvals dead-letters list`")
    data = letter_json(letter)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    what = "write-back" if letter.kind == "outbox" else "inbox event"
    click.echo(f"dead letter {letter.id} ({what} {letter.ref_id})")
    click.echo(f"  record:    {_record(letter)}")
    click.echo(f"  created:   {data['created_at']}")
    click.echo(
        f"  state:     {_state(letter)}" + (f" at {data['resolved_at']}" if letter.resolved_at else "")
    )
    click.echo(f"  error:     {_error(letter)}")
    if letter.error_fields:
        click.echo(f"  fields:    {', '.join(letter.error_fields)}")
    click.echo("  payload:   " + json.dumps(letter.payload, indent=2, default=str).replace("\n", "\n  "))


@dead_letters.command("retry")
@click.argument("letter_ids", nargs=-1, type=int)
@_filter_options
@click.option(
    "--all", "everything", is_flag=True, help="Every open dead letter (when no id or filter is given)."
)
@click.option("--dry-run", is_flag=True, help="Say what would be retried; change nothing.")
@click.option("--no-send", is_flag=True, help="Only queue; leave sending and processing to the worker.")
@pass_context
def retry_command(
    ctx: Context, letter_ids: tuple[int, ...], everything: bool, dry_run: bool, no_send: bool, **filters: Any
) -> None:
    """Retry dead letters by ID, or every open one matching the filters.

    A refused write-back is queued again, once (fields a later write-back set are left
    out), then sent; an event is re-run through the current mappings. Retrying one that
    was already retried does nothing.
    """
    from connector.service.dead_letters import retry

    where = _required_filter(letter_ids, everything, filters, "retry")
    runtime = _runtime(ctx, processor=not (dry_run or no_send))
    actions = retry(runtime.sessions, where, dry_run=dry_run)
    _print_actions(actions, dry_run)
    if dry_run or no_send:
        if not dry_run and any(a.action == "requeued" for a in actions):
            click.echo("queued; the worker sends and processes them within a minute")
        return
    _run_queued(runtime, actions)


@dead_letters.command("discard")
@click.argument("letter_ids", nargs=-1, type=int)
@_filter_options
@click.option(
    "--all", "everything", is_flag=True, help="Every open dead letter (when no id or filter is given)."
)
@click.option("--dry-run", is_flag=True, help="Say what would be discarded; change nothing.")
@pass_context
def discard_command(
    ctx: Context, letter_ids: tuple[int, ...], everything: bool, dry_run: bool, **filters: Any
) -> None:
    """Resolve dead letters without retrying them (e.g. the record was fixed by hand)."""
    from connector.service.dead_letters import discard

    where = _required_filter(letter_ids, everything, filters, "discard")
    _print_actions(discard(_runtime(ctx).sessions, where, dry_run=dry_run), dry_run)


@click.command("replay")
@click.option("--event", "event_ids", type=int, multiple=True, help="An inbox event id (repeatable).")
@click.option("--record", help="Every event of one record: CONNECTION:OBJECT:ID, e.g. sandbox:deal:D-1001.")
@click.option(
    "--since", metavar="TIME", help="Events received at or after TIME (ISO date/time, or an age: 2h)."
)
@click.option("--until", metavar="TIME", help="Events received before TIME (ISO date/time, or an age).")
@click.option(
    "--status",
    "statuses",
    type=click.Choice(["done", "dead"]),
    multiple=True,
    help="Only events that ended so [default: both].",
)
@click.option("--limit", type=click.IntRange(1), default=10_000, show_default=True, help="At most this many.")
@click.option("--dry-run", is_flag=True, help="List the events that would be replayed; change nothing.")
@click.option("--no-process", is_flag=True, help="Only mark them; leave processing to the worker.")
@pass_context
def replay_command(
    ctx: Context,
    event_ids: tuple[int, ...],
    record: str | None,
    since: str | None,
    until: str | None,
    statuses: tuple[str, ...],
    limit: int,
    dry_run: bool,
    no_process: bool,
) -> None:
    """Re-run inbox events through the current mappings, after a mapping or data fix.

    Idempotent: a rule that has a request submitted since the event arrived is left as
    it is, so replaying twice, or replaying an event that already opened its request,
    opens nothing new. Dead events replayed resolve their dead letters.
    """
    from connector.service.dead_letters import EventSelection, parse_record, parse_time, replay

    try:
        selection = EventSelection(
            ids=event_ids,
            record=parse_record(record) if record else None,
            since=parse_time(since) if since else None,
            until=parse_time(until) if until else None,
            statuses=statuses or ("done", "dead"),
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if not selection.narrows:
        raise click.UsageError(
            "say which events: --event ID, --record CONNECTION:OBJECT:ID, --since or --until"
        )
    runtime = _runtime(ctx, processor=not (dry_run or no_process))
    chosen = replay(runtime.sessions, selection, dry_run=dry_run, limit=limit)
    verb = "would replay" if dry_run else "replaying"
    for item in chosen:
        click.echo(
            f"{verb} event {item.event_id} {item.record} (received {_when(item.received_at)}, "
            f"{item.status_before}: {item.result or '-'})"
        )
    if not chosen:
        click.echo("no done or dead events match (pending ones are processed anyway)")
        return
    if dry_run:
        click.echo(f"{len(chosen)} event(s) would be replayed")
        return
    if no_process:
        click.echo(f"{len(chosen)} event(s) marked; the worker processes them within a minute")
        return
    from connector.service.dead_letters import run_now

    report = run_now(runtime, event_ids=[item.event_id for item in chosen])
    for event_id, (status, result) in sorted(report.events.items()):
        click.echo(f"event {event_id}: {status}: {result or '-'}")
    click.echo(f"{len(chosen)} event(s) replayed")


# --- helpers --------------------------------------------------------------------------------


def _runtime(ctx: Context, processor: bool = False) -> Runtime:
    """The runtime, with the pipeline (mappings loaded) when events are to be processed."""
    from connector.runtime import Runtime
    from connector.wiring import build_runtime

    runtime = build_runtime(ctx.settings) if processor else Runtime.from_settings(ctx.settings)
    click.get_current_context().call_on_close(runtime.close)
    return runtime


def _required_filter(
    letter_ids: tuple[int, ...], everything: bool, filters: dict[str, Any], verb: str
) -> DeadLetterFilter:
    where = _build_filter(ids=letter_ids, **filters)
    if not where.narrows and not everything:
        raise click.UsageError(
            f"say which dead letters to {verb}: IDs, a filter (--code, --connection, --object, --kind, "
            f"--older-than, --newer-than), or --all for every open one"
        )
    return where


def _print_actions(actions: list[Action], dry_run: bool) -> None:
    if not actions:
        click.echo("no open dead letters match")
        return
    for a in actions:
        verb = f"would be {a.action}" if dry_run and a.action != "skipped" else a.action
        click.echo(f"dead letter {a.letter_id} ({a.kind} {a.record}): {verb}: {a.detail}")
    counts: dict[str, int] = {}
    for a in actions:
        counts[a.action] = counts.get(a.action, 0) + 1
    summary = ", ".join(f"{n} {name}" for name, n in counts.items())
    click.echo(("dry run, nothing changed: " if dry_run else "") + summary)


def _run_queued(runtime: Runtime, actions: list[Action]) -> None:
    from connector.service.dead_letters import run_now

    queued = [a for a in actions if a.action == "requeued"]
    if not queued:
        return
    report = run_now(
        runtime,
        event_ids=[a.event_id for a in queued if a.event_id is not None],
        outbox_ids=[a.outbox_id for a in queued if a.outbox_id is not None],
    )
    for a in queued:
        if a.outbox_id is not None:
            status, error = report.updates.get(a.outbox_id, ("unknown", None))
            click.echo(f"write-back {a.outbox_id} for {a.record}: {_outcome(status, error)}")
        elif a.event_id is not None:
            status, result = report.events.get(a.event_id, ("unknown", None))
            click.echo(f"event {a.event_id} for {a.record}: {status}: {result or '-'}")


def _outcome(status: str, error: str | None) -> str:
    if status == "done":
        return "sent"
    if status == "dead":
        return f"refused again: {error} (a new dead letter)"
    if status == "pending":
        return f"not sent yet, will retry: {error or 'waiting for the CRM'}"
    return status


def _record(letter: DeadLetter) -> str:
    return f"{letter.connection}:{letter.object_type}:{letter.record_id}"


def _error(letter: DeadLetter) -> str:
    return f"{letter.error_code}: {letter.error_message}" if letter.error_code else letter.error_message


def _state(letter: DeadLetter) -> str:
    return "open" if letter.resolved_at is None else (letter.resolution or "resolved")


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value is not None else "-"


COMMANDS = [dead_letters, replay_command]
