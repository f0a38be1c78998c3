"""`crm-approvals directory ...`, `notifications ...` and `mailcatcher` (docs/notifications.md)."""

from __future__ import annotations

import signal
from typing import Any

import click

from connector.cli import Context, pass_context


@click.group()
def directory() -> None:
    """The user directory: each connection's CRM users, cached (names, e-mail, locale, manager)."""


@directory.command("refresh")
@click.argument("connections", nargs=-1)
@pass_context
def directory_refresh(ctx: Context, connections: tuple[str, ...]) -> None:
    """Read the users of CONNECTIONS (default: every configured one) from the CRM now."""
    from connector.directory import Directory

    runtime = _runtime(ctx)
    try:
        names = connections or tuple(ctx.settings.connections)
        for name in names:
            ctx.settings.connection(name)  # an unknown name is a clear error
        results = [Directory.from_runtime(runtime).refresh(name) for name in names]
    finally:
        runtime.close()
    for result in results:
        click.echo(str(result), err=not result.ok)
    if not all(r.ok for r in results):
        raise click.exceptions.Exit(1)


@directory.command("list")
@click.argument("connection")
@click.option("--inactive/--active-only", default=True, show_default=True, help="Include inactive people.")
@pass_context
def directory_list(ctx: Context, connection: str, inactive: bool) -> None:
    """List the cached people of CONNECTION."""
    from connector.directory import Directory

    ctx.settings.connection(connection)
    runtime = _runtime(ctx)
    try:
        people = Directory.from_runtime(runtime).people(connection, include_inactive=inactive)
    finally:
        runtime.close()
    if not people:
        click.echo(f"nobody cached for {connection}; run `crm-approvals directory refresh {connection}`")
        return
    click.echo(f"{'ID':<24} {'NAME':<28} {'E-MAIL':<36} {'LOCALE':<8} {'MANAGER':<24} ACTIVE")
    for p in people:
        click.echo(
            f"{p.id:<24} {p.name:<28} {p.email or '-':<36} {p.locale or '-':<8} "
            f"{p.manager_id or '-':<24} {'yes' if p.active else 'no'}"
        )


@directory.command("queues")
@click.argument("connection")
@pass_context
def directory_queues(ctx: Context, connection: str) -> None:
    """List CONNECTION's approver queues as last read from the CRM (`{queue: NAME}` in mapping
    files): Salesforce queues and groups, HubSpot teams, Zoho groups, Bitrix24 departments."""
    from sqlalchemy import select

    from connector.directory.models import DirectoryQueue

    ctx.settings.connection(connection)
    runtime = _runtime(ctx)
    try:
        with runtime.sessions() as session:
            rows = list(
                session.scalars(
                    select(DirectoryQueue)
                    .where(DirectoryQueue.connection == connection)
                    .order_by(DirectoryQueue.name)
                )
            )
    finally:
        runtime.close()
    if not rows:
        click.echo(f"no queues cached for {connection}; run `crm-approvals directory refresh {connection}`")
        return
    click.echo(f"{'ID':<24} {'NAME':<32} MEMBERS")
    for row in rows:
        click.echo(f"{row.queue_id:<24} {row.name:<32} {', '.join(row.members) or '-'}")


@click.group()
def notifications() -> None:
    """The notification outbox: what was sent, what failed, resending."""


@notifications.command("list")
@click.option("--status", type=click.Choice(["pending", "sending", "done", "dead", "skipped"]), default=None)
@click.option("--limit", default=50, show_default=True)
@pass_context
def notifications_list(ctx: Context, status: str | None, limit: int) -> None:
    """The latest notifications, newest first (e.g. --status dead for the failed ones)."""
    from sqlalchemy import select

    from connector.notify.models import Notification

    runtime = _runtime(ctx)
    try:
        with runtime.sessions() as session:
            query = select(Notification).order_by(Notification.id.desc()).limit(limit)
            if status is not None:
                query = query.where(Notification.status == status)
            rows = session.scalars(query).all()
    finally:
        runtime.close()
    if not rows:
        click.echo("no notifications")
        return
    for row in rows:
        who = row.email or (f"{row.user_id}@{row.connection}" if row.user_id else "-")
        where = row.target or row.channel
        problem = f"  {row.last_error}" if row.last_error and row.status != "done" else ""
        click.echo(f"{row.id:>6}  {row.status:<8} {row.event:<12} {where:<24} {who}{problem}")


@notifications.command("retry")
@click.argument("notification_id", type=int)
@pass_context
def notifications_retry(ctx: Context, notification_id: int) -> None:
    """Queue a dead or skipped notification again (the worker sends it within a minute)."""
    from connector.notify.sender import requeue

    runtime = _runtime(ctx)
    try:
        row = requeue(runtime.sessions, notification_id)
    finally:
        runtime.close()
    if row is None:
        raise click.ClickException(
            f"no notification {notification_id}; see `crm-approvals notifications list`"
        )
    if row.status != "pending":
        raise click.ClickException(
            f"notification {notification_id} is {row.status}; only dead or skipped ones"
        )
    click.echo(f"notification {notification_id} queued again")


@notifications.command("send")
@pass_context
def notifications_send(ctx: Context) -> None:
    """Send every due notification now (the worker does this on its own)."""
    from connector.notify.sender import NotificationSender

    runtime = _runtime(ctx)
    try:
        report = NotificationSender.from_runtime(runtime).send_due(limit=1000)
    finally:
        runtime.close()
    click.echo(", ".join(f"{k} {v}" for k, v in vars(report).items()))


@click.command("mailcatcher")
@click.option(
    "--smtp-port", type=int, default=None, help="SMTP port [default: MAIL_CATCHER_SMTP_PORT, 1025]."
)
@click.option("--port", type=int, default=None, help="Port of the page [default: MAIL_CATCHER_PORT, 8025].")
@pass_context
def mailcatcher(ctx: Context, smtp_port: int | None, port: int | None) -> None:
    """A local SMTP server that keeps every message, and a page to read them.

    `crm-approvals run` starts it when no SMTP_HOST is set. Listens on 127.0.0.1 only.
    """
    from werkzeug.serving import make_server

    from connector.config import MAIL_CATCHER_HOST
    from connector.notify.catcher import Mailbox, create_catcher_app, smtp_server

    notify = ctx.settings.notify
    smtp_port = smtp_port or notify.mail_catcher_smtp_port
    port = port or notify.mail_catcher_port
    mailbox = Mailbox(notify.mail_catcher_dir)
    controller = smtp_server(mailbox, MAIL_CATCHER_HOST, smtp_port)
    try:
        controller.start()
    except Exception as exc:
        raise click.ClickException(
            f"cannot listen for SMTP on {MAIL_CATCHER_HOST}:{smtp_port}: {exc}; is another mail catcher "
            "running? Set MAIL_CATCHER_SMTP_PORT to another port"
        ) from None
    try:
        app = create_catcher_app(mailbox, f"{MAIL_CATCHER_HOST}:{smtp_port}")
        try:
            server = make_server(MAIL_CATCHER_HOST, port, app, threaded=True)
        except OSError as exc:
            raise click.ClickException(
                f"cannot serve the mail page on {MAIL_CATCHER_HOST}:{port}: {exc}; set MAIL_CATCHER_PORT"
            ) from None
        signal.signal(signal.SIGTERM, _stop)
        click.echo(
            f"mail catcher: SMTP {MAIL_CATCHER_HOST}:{smtp_port}, page http://{MAIL_CATCHER_HOST}:{port}/"
        )
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
    finally:
        controller.stop()


def _stop(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def _runtime(ctx: Context) -> Any:
    from connector.runtime import Runtime

    return Runtime.from_settings(ctx.settings)


COMMANDS = [directory, notifications, mailcatcher]
