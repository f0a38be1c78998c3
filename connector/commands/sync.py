"""`crm-approvals sync ...`: the jobs ops run by hand (docs/operations.md#sync-jobs).

Each is safe to run again at any time: backfill continues where it stopped, expire only
expires what is due, reconcile repairs only what differs, and the reports write nothing.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import click

from connector.cli import Context, pass_context
from connector.commands.progress import JobProgress
from connector.config import Settings

INTERRUPTED = 130  # the shell's code for a command ended by Ctrl-C


class Day(click.ParamType):
    """A calendar date written YYYY-MM-DD."""

    name = "DATE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> date:
        if isinstance(value, date):
            return value
        try:
            return date.fromisoformat(str(value).strip())
        except ValueError:
            self.fail(f"{value!r} is not a date; write it as YYYY-MM-DD, e.g. 2026-12-31", param, ctx)


class Moment(click.ParamType):
    """A date (midnight UTC) or an ISO 8601 time (UTC when it names no offset)."""

    name = "DATE|TIME"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> datetime:
        if isinstance(value, datetime):
            return value
        text = str(value).strip()
        try:
            if len(text) == 10:
                return datetime.combine(date.fromisoformat(text), time.min, UTC)
            parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            self.fail(
                f"{value!r} is neither a date (YYYY-MM-DD) nor an ISO 8601 time (2026-12-31T08:00:00+01:00)",
                param,
                ctx,
            )
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


@click.group()
def sync() -> None:
    """Jobs ops run by hand: backfill, reconcile, expire, expiring, zoho-channels.

    Every job is idempotent: run it again at any time. The worker runs expiry and the Zoho
    channel renewal on its own sweep. See docs/operations.md.
    """


# --- backfill ------------------------------------------------------------------------------


@sync.command("backfill")
@click.option("--connection", help="Connection whose records to read [default: the only one configured].")
@click.option(
    "--object",
    "objects",
    multiple=True,
    help="CRM object, e.g. Opportunity; repeat for several [default: every object the mapping files "
    "cover for the connection].",
)
@click.option("--since", type=Moment(), help="Only records modified since then (a date means midnight UTC).")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    help="Evaluate at most N records now; a rerun continues after them.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print per record what would be opened (rule, first step and its approvers); write nothing.",
)
@click.option("--restart", is_flag=True, help="Forget the saved position: evaluate every record again.")
@pass_context
def sync_backfill(
    ctx: Context,
    connection: str | None,
    objects: tuple[str, ...],
    since: datetime | None,
    limit: int | None,
    dry_run: bool,
    restart: bool,
) -> None:
    """Evaluate the records already in the CRM against the mapping files, as if each had
    just been created, and open the approval requests the rules call for (with their
    write-back, e.g. Status = Pending).

    A record that already has an active request, or an approval still in force, is left
    alone, exactly as for a webhook. The position is saved after every page: after Ctrl-C
    or a crash, run the same command again and it continues without doing anything twice;
    once finished, a rerun does nothing (--restart evaluates everything again).
    """
    from connector.crm.errors import CRMError
    from connector.service.backfill import Backfill, BackfillRefused, BackfillResult, RecordOutcome
    from connector.wiring import build_pipeline

    if dry_run and restart:
        raise click.UsageError("--dry-run saves no position, so there is nothing to --restart")
    pipeline = build_pipeline(ctx.settings)
    runtime = pipeline.runtime
    if pipeline.mappings.errors:
        raise click.ClickException(
            "fix the mapping errors first:\n" + "\n".join(str(e) for e in pipeline.mappings.errors)
        )
    name = _connection(ctx.settings, connection)
    targets = list(objects) or sorted(
        {m.object_type for m in pipeline.mappings.mappings if m.connection == name}
    )
    if not targets:
        raise click.ClickException(
            f"no mapping file in {pipeline.mappings.directory} covers connection {name!r}"
        )
    remaining = limit
    with JobProgress() as progress:

        def on_record(outcome: RecordOutcome) -> None:
            if outcome.outcome != "skipped":
                progress.line(f"  {outcome.record_id}: {outcome.summary}")
                progress.advance()

        object_type = targets[0]
        try:
            for object_type in targets:
                if dry_run:
                    progress.line("dry run: nothing is written")
                progress.task(f"backfill {name}/{object_type}", total=remaining)
                job = Backfill(
                    runtime, pipeline, name, object_type, since=since, limit=remaining, on_record=on_record
                )
                result: BackfillResult = job.preview() if dry_run else job.run(restart=restart)
                progress.line(_backfill_summary(result, dry_run))
                if remaining is not None:
                    remaining -= result.evaluated
                    if remaining <= 0:
                        break
        except KeyboardInterrupt:
            progress.line(
                f"interrupted during {name}/{object_type}"
                + ("" if dry_run else "; run the same command again to continue where it stopped")
            )
            raise click.exceptions.Exit(INTERRUPTED) from None
        except BackfillRefused as exc:
            raise click.ClickException(f"{exc}; {exc.hint}") from None
        except CRMError as exc:
            saved = (
                "" if dry_run else "; the position after the last complete page is saved, rerun to continue"
            )
            raise click.ClickException(f"reading {object_type} from {name}: {exc}{saved}") from None
        finally:
            runtime.close()


def _backfill_summary(result: Any, dry_run: bool) -> str:
    where = f"{result.connection}/{result.object_type}"
    if dry_run:
        counts = ", ".join(f"{n} {outcome.replace('_', ' ')}" for outcome, n in sorted(result.counts.items()))
        end = "" if result.finished else ", stopped at --limit"
        return (
            f"{where}: dry run of {result.evaluated} record(s){end} ({counts or 'none'}); nothing was written"
        )
    checkpoint = result.checkpoint
    started = f"{checkpoint.started_at:%Y-%m-%d %H:%M} UTC"
    if result.already_finished:
        return (
            f"{where}: the backfill started {started} finished at "
            f"{checkpoint.finished_at:%Y-%m-%d %H:%M} UTC ({checkpoint.records_done} record(s)); "
            "nothing to do. Add --restart to evaluate every record again."
        )
    counts = ", ".join(f"{n} {outcome}" for outcome, n in sorted(checkpoint.counts.items())) or "none"
    status = "finished" if result.finished else "stopped at --limit; run again to continue"
    continued = f", continuing the run started {started}" if result.resumed else ""
    line = (
        f"{where}: {status}; {result.evaluated} record(s) evaluated now{continued}; "
        f"this run so far: {checkpoint.records_done} ({counts})"
    )
    if result.write_back is not None:
        wb = result.write_back
        line += f"; write-back: {wb.done} sent, {wb.retried} to retry, {wb.dead} dead-lettered"
    return line


def _connection(settings: Settings, name: str | None) -> str:
    if name is not None:
        return settings.connection(name).name
    if len(settings.connections) == 1:
        return next(iter(settings.connections))
    known = ", ".join(sorted(settings.connections))
    raise click.UsageError(f"several connections are configured ({known}); name one with --connection")


# --- reconcile -----------------------------------------------------------------------------


@sync.command("reconcile")
@click.option("--connection", help="Connection whose records to compare [default: the only one configured].")
@click.option(
    "--object",
    "objects",
    multiple=True,
    help="CRM object, e.g. Opportunity; repeat for several [default: every object we have written "
    "approval fields to on the connection].",
)
@click.option(
    "--since",
    type=Moment(),
    help="Only records we wrote to since then (a date means midnight UTC) [default: every record].",
)
@click.option(
    "--dry-run", is_flag=True, help="Print each difference and what would be re-queued; write nothing."
)
@click.option("--restart", is_flag=True, help="Forget the saved position of an unfinished run.")
@pass_context
def sync_reconcile(
    ctx: Context,
    connection: str | None,
    objects: tuple[str, ...],
    since: datetime | None,
    dry_run: bool,
    restart: bool,
) -> None:
    """Compare the approval fields in the CRM (Status, expiry, ... : the fields the mapping
    files write) with what we last wrote, and put our values back where they differ, through
    the outbox (the worker's drift repair does the same for recent writes).

    Each difference is printed as record, field, the CRM's value and ours. Records are read
    in batches of the CRM's read limit; the position is saved after every batch, so after
    Ctrl-C or a crash the same command continues where it stopped, and a repaired record is
    never repaired twice. A finished run is not continued: running it again compares anew.
    """
    from connector.crm.errors import CRMError
    from connector.runtime import Runtime
    from connector.service.drift import Drift, Reconcile, ReconcileRefused, reconciled_object_types
    from connector.storage.outbox import flush

    if dry_run and restart:
        raise click.UsageError("--dry-run saves no position, so there is nothing to --restart")
    name = _connection(ctx.settings, connection)
    runtime = Runtime.from_settings(ctx.settings)
    try:
        if objects:
            targets = list(objects)
        else:
            with runtime.sessions() as session:
                targets = reconciled_object_types(session, name)
        if not targets:
            click.echo(f"{name}: we have written no approval fields yet; nothing to reconcile")
            return
        with JobProgress() as progress:

            def on_page(ids: Any, drifts: list[Drift]) -> None:
                for drift in drifts:
                    for line in _drift_lines(drift, dry_run):
                        progress.line(line)
                progress.advance(len(ids))

            if dry_run:
                progress.line("dry run: nothing is written")
            object_type = targets[0]
            try:
                for object_type in targets:
                    job = Reconcile(runtime, name, object_type, since=since, on_page=on_page)
                    saved = None if dry_run or restart else job.saved()
                    after = saved.cursor if saved and saved.finished_at is None else None
                    progress.task(f"reconcile {name}/{object_type}", total=job.total(after))
                    result = job.run(dry_run=dry_run, restart=restart)
                    progress.line(_reconcile_summary(result, dry_run))
            except KeyboardInterrupt:
                progress.line(
                    f"interrupted during {name}/{object_type}"
                    + ("" if dry_run else "; run the same command again to continue where it stopped")
                )
                raise click.exceptions.Exit(INTERRUPTED) from None
            except ReconcileRefused as exc:
                raise click.ClickException(str(exc)) from None
            except CRMError as exc:
                saved_note = "" if dry_run else "; the position after the last complete batch is saved"
                raise click.ClickException(
                    f"reading {object_type} from {name}: {exc}{saved_note}, rerun to continue"
                ) from None
            if not dry_run:
                settings = runtime.settings
                report = flush(
                    runtime.sessions,
                    runtime.adapter,
                    lease_seconds=settings.outbox_lease_seconds,
                    max_attempts=settings.outbox_max_attempts,
                )
                progress.line(
                    f"write-back: {report.done} sent, {report.retried} to retry, {report.dead} dead-lettered"
                )
    finally:
        runtime.close()


def _drift_lines(drift: Any, dry_run: bool) -> list[str]:
    """One line per differing field: record, field, the CRM's value, ours, what was done."""
    if dry_run:
        done = "would re-queue ours"
    elif drift.queued:
        done = "re-queued ours"
    else:
        done = "left alone: a newer write came first"
    return [
        f"  {drift.record_id} {field}: CRM has {drift.found.get(field)!r}, ours is {value!r}; {done}"
        for field, value in drift.intended.items()
    ]


def _reconcile_summary(result: Any, dry_run: bool) -> str:
    where = f"{result.connection}/{result.object_type}"
    drifted = len(result.drifts)
    if dry_run:
        return (
            f"{where}: dry run compared {result.compared} record(s), {drifted} differ from ours; "
            "nothing was written"
        )
    checkpoint = result.checkpoint
    continued = (
        f", continuing the run started {checkpoint.started_at:%Y-%m-%d %H:%M} UTC" if result.resumed else ""
    )
    counts = checkpoint.counts
    return (
        f"{where}: finished; {result.compared} record(s) compared now{continued}, "
        f"{drifted} differ, {sum(d.queued for d in result.drifts)} re-queued; this run in all: "
        f"{checkpoint.records_done} compared, {counts.get('drifted', 0)} differ, "
        f"{counts.get('requeued', 0)} re-queued"
    )


# --- expiry --------------------------------------------------------------------------------


@sync.command("expire")
@click.option("--dry-run", is_flag=True, help="List the approvals that would expire; write nothing.")
@click.option(
    "--as-of",
    "as_of",
    type=Day(),
    help="Expire as if today were DATE (YYYY-MM-DD): everything due by the end of that day, UTC.",
)
@click.option("--yes", is_flag=True, help="With an --as-of in the future, expire without asking first.")
@pass_context
def sync_expire(ctx: Context, dry_run: bool, as_of: date | None, yes: bool) -> None:
    """Expire approvals past their expiry and queue their expire actions (e.g. Status =
    Expired), then flush the write-back. Idempotent: safe to run at any time; the worker
    also runs it every minute."""
    from connector.clock import utcnow
    from connector.storage import approval_store as store
    from connector.storage.outbox import flush
    from connector.wiring import build_pipeline

    now = datetime.combine(as_of, time.max, UTC) if as_of else utcnow()
    when = f" as of the end of {as_of} (UTC)" if as_of else ""
    pipeline = build_pipeline(ctx.settings)
    runtime = pipeline.runtime
    try:
        if dry_run:
            with runtime.sessions() as session:
                loaded = [store.load(session, i) for i in store.ids_due_for_expiry(session, now)]
            due = [stored for stored in loaded if stored is not None]
            for stored in due:
                request = stored.request
                click.echo(
                    f"would expire {stored.record.ref} ({request.rule_name}, request {request.id}, "
                    f"due {request.expires_at:%Y-%m-%d %H:%M} UTC)"
                )
            click.echo(f"{len(due)} approval(s) would expire{when}; nothing was written")
            return
        if as_of and as_of > utcnow().date() and not yes:
            click.confirm(
                f"--as-of {as_of} is in the future: approvals due by then expire now, before their time, "
                "and their CRM records are updated. Continue?",
                abort=True,
            )
        service = replace(pipeline.approvals, clock=lambda: now)
        expired = service.expire_due(
            runtime.sessions,
            on_expired=lambda e: click.echo(f"expired {e.ref} ({e.rule_name}, request {e.request_id})"),
        )
        report = flush(runtime.sessions, runtime.adapter)
        click.echo(
            f"{expired} approval(s) expired{when}; write-back: {report.done} sent, "
            f"{report.retried} to retry, {report.dead} dead-lettered"
        )
    finally:
        runtime.close()


@sync.command("expiring")
@click.option(
    "--within",
    "days",
    type=click.IntRange(min=1),
    default=30,
    show_default=True,
    metavar="DAYS",
    help="How far ahead to look.",
)
@click.option("--connection", help="Only this connection's records.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@pass_context
def sync_expiring(ctx: Context, days: int, connection: str | None, as_json: bool) -> None:
    """List the approvals that expire within DAYS, soonest first, with who submitted them, so
    that owners can have them re-approved before they lapse. Writes nothing."""
    from connector.clock import utcnow
    from connector.runtime import Runtime
    from connector.storage import approval_store as store

    if connection is not None:
        ctx.settings.connection(connection)  # an unknown name is an error, not an empty list
    now = utcnow()
    runtime = Runtime.from_settings(ctx.settings)
    try:
        with runtime.sessions() as session:
            rows = store.approved_expiring(session, now, now + timedelta(days=days))
            overdue = len(store.ids_due_for_expiry(session, now))
    finally:
        runtime.close()
    rows = [r for r in rows if connection is None or r.connection == connection]
    if as_json:
        items = [
            {
                "request_id": r.id,
                "connection": r.connection,
                "object": r.object_type,
                "record_id": r.record_id,
                "rule": r.rule_name,
                "submitter": r.submitter,
                "approved_at": r.approved_at.isoformat() if r.approved_at else None,
                "expires_at": r.expires_at.isoformat() if r.expires_at else None,
            }
            for r in rows
        ]
        click.echo(json.dumps({"within_days": days, "expiring": items, "past_expiry": overdue}, indent=2))
        return
    for r in rows:
        assert r.expires_at is not None
        left = (r.expires_at.date() - now.date()).days
        click.echo(
            f"{r.expires_at:%Y-%m-%d}  {'today' if left == 0 else f'in {left} day(s)':<12}  "
            f"{r.connection}:{r.object_type}:{r.record_id}  {r.rule_name}  request {r.id}  "
            f"submitted by {r.submitter}"
        )
    click.echo(f"{len(rows)} approval(s) expire within {days} day(s)")
    if overdue:
        click.echo(
            f"{overdue} approval(s) are past their expiry; `crm-approvals sync expire` expires them now"
        )


# --- Zoho notification channels --------------------------------------------------------------


@sync.command("zoho-channels")
@click.option("--connection", help="Only this Zoho connection.")
@click.option("--renew", is_flag=True, help="Renew every channel now (PATCH), whatever its expiry.")
@click.option(
    "--enable", is_flag=True, help="Enable the channels anew (POST): the first time, or after a lapse."
)
@pass_context
def sync_zoho_channels(ctx: Context, connection: str | None, renew: bool, enable: bool) -> None:
    """Show the Zoho notification channels kept alive (ZOHO_NOTIFY_CHANNEL_ID), or renew them
    now. The worker renews each one a day before it expires; see docs/crms/zoho.md."""
    from connector.clock import utcnow
    from connector.runtime import Runtime
    from connector.service.zoho_channels import ZohoChannels

    if renew and enable:
        raise click.UsageError("give --renew or --enable, not both")
    runtime = Runtime.from_settings(ctx.settings)
    try:
        channels = ZohoChannels(runtime)
        states = channels.states(connection)
        if not states:
            raise click.ClickException(
                "no Zoho connection names a notification channel; set ZOHO_NOTIFY_CHANNEL_ID and "
                "ZOHO_NOTIFY_EVENTS (see docs/crms/zoho.md#notification-channels)"
            )
        if renew or enable:
            states = [channels.renew(state.channel, enable=enable) for state in states]
    finally:
        runtime.close()
    now = utcnow()
    for state in states:
        click.echo(state.describe(now))
    if (renew or enable) and any(state.last_error for state in states):
        raise click.exceptions.Exit(1)


COMMANDS = [sync]
