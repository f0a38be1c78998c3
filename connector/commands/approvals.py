"""`crm-approvals token ...`: API tokens for the approvals API (docs/api.md)."""

from __future__ import annotations

from datetime import datetime

import click

from connector.cli import Context, pass_context
from connector.commands.database import command_session
from connector.storage.tokens import TokenInfo, create_token, list_tokens, revoke_token


@click.group()
def token() -> None:
    """API tokens: each acts as one CRM user id (the approver identity in mapping files)."""


@token.command("create")
@click.option("--user", "user_id", required=True, help="CRM user id the token acts as, e.g. 0055g00000AbCdE.")
@click.option("--label", default="", help="What the token is for, e.g. 'Slack bot' or 'Ana laptop'.")
@click.option("--admin", is_flag=True, help="May see every request, vote on any step and recall any request.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask when the user directory does not know the user.")
@pass_context
def token_create(ctx: Context, user_id: str, label: str, admin: bool, yes: bool) -> None:
    """Create a token and print it ONCE (only its sha256 is stored).

    The token goes to stdout alone; the notes go to stderr, so
    `TOKEN=$(crm-approvals token create --user U1)` captures just the token.
    A user id no connection's user directory knows (a typo?) asks for confirmation first.
    """
    if not user_id.strip():
        raise click.BadParameter("must not be empty", param_hint="--user")
    if not yes:
        _confirm_known_user(ctx, user_id.strip())
    with command_session(ctx) as session:
        info, secret = create_token(session, user_id, label, admin)
    role = "admin" if info.is_admin else "user"
    click.echo(f"Created token {info.id} for {role} {info.user_id!r}. It is shown only now:", err=True)
    click.echo(secret)
    click.echo("Send it as `Authorization: Bearer <token>`; revoke it with `token revoke ID`.", err=True)


@token.command("list")
@pass_context
def token_list(ctx: Context) -> None:
    """List tokens (never the tokens themselves)."""
    with command_session(ctx) as session:
        tokens = list_tokens(session)
    if not tokens:
        click.echo("no tokens; create one with `crm-approvals token create --user USER_ID`")
        return
    click.echo(
        f"{'ID':>4}  {'USER':<24} {'ADMIN':<5}  {'CREATED':<16}  {'LAST USED':<16}  {'STATUS':<24} LABEL"
    )
    for info in tokens:
        click.echo(_row(info))


@token.command("revoke")
@click.argument("token_id", type=int)
@pass_context
def token_revoke(ctx: Context, token_id: int) -> None:
    """Revoke a token by its ID (see `token list`); it stops working at once."""
    with command_session(ctx) as session:
        info = revoke_token(session, token_id)
    if info is None:
        raise click.ClickException(f"no token with ID {token_id}; see `crm-approvals token list`")
    click.echo(f"token {info.id} ({info.user_id}) revoked at {_when(info.revoked_at)}")


def _confirm_known_user(ctx: Context, user_id: str) -> None:
    """Ask before issuing a token for an id that no connection's directory knows."""
    from connector.directory import Directory
    from connector.runtime import Runtime

    runtime = Runtime.from_settings(ctx.settings)
    checked: list[str] = []
    try:
        directory = Directory.from_runtime(runtime)
        for connection in ctx.settings.connections:
            try:
                directory.ensure_loaded(connection)
                known = directory.known_ids(connection)
            except Exception as exc:  # no tables, no credentials: this connection cannot tell
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                click.echo(
                    f"note: cannot check {user_id!r} against the {connection} directory: {reason}", err=True
                )
                continue
            if known is None:
                continue
            if user_id in known:
                return
            checked.append(connection)
    finally:
        runtime.close()
    if checked:
        click.confirm(
            f"{user_id!r} is not a user in the directory of {', '.join(checked)} "
            "(see `crm-approvals directory list`). Create a token for it anyway?",
            abort=True,
            err=True,
        )


def _row(info: TokenInfo) -> str:
    status = f"revoked {_when(info.revoked_at)}" if info.revoked else "active"
    return (
        f"{info.id:>4}  {info.user_id:<24} {'yes' if info.is_admin else 'no':<5}  "
        f"{_when(info.created_at):<16}  "
        f"{_when(info.last_used_at):<16}  {status:<24} {info.label}"
    )


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value is not None else "-"


COMMANDS = [token]
