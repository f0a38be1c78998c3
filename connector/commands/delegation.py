"""`crm-approvals delegation ...`: deputies while people are away, and `approvals reassign`
for admins (docs/operations.md#delegation). The logic is connector/service/delegation.py."""

from __future__ import annotations

from datetime import date
from typing import TYPE_CHECKING

import click

from connector.cli import Context, pass_context
from connector.errors import CrmApprovalsError

# Imported by the commands themselves: `crm-approvals` must import nothing that loads the
# metrics before a command has prepared their directory (tests/cli/test_serve.py).
if TYPE_CHECKING:
    from connector.runtime import Runtime
    from connector.service.delegation import DelegationService, DelegationView

ADMIN = "cli"  # the actor recorded for changes made from the command line (an operator)


def _runtime(ctx: Context) -> Runtime:
    from connector.wiring import build_runtime

    runtime = build_runtime(ctx.settings)
    click.get_current_context().call_on_close(runtime.close)
    return runtime


def _connection(ctx: Context, given: str | None) -> str:
    configured = list(ctx.settings.connections)
    if given is None and len(configured) == 1:
        return configured[0]
    if given is None:
        raise click.BadParameter(
            f"several connections: name one of {', '.join(configured)}", param_hint="--connection"
        )
    if given not in configured:
        raise click.BadParameter(
            f"no connection {given!r}; one of {', '.join(configured) or 'none'}", param_hint="--connection"
        )
    return given


def _service(ctx: Context) -> DelegationService:
    from connector.service.delegation import DelegationService

    return DelegationService.from_runtime(_runtime(ctx))


def _fail(exc: CrmApprovalsError) -> click.ClickException:
    return click.ClickException(str(exc) + (f"\nhint: {exc.hint}" if exc.hint else ""))


@click.group()
def delegation() -> None:
    """Deputies: while a user is away, their new and open approval steps go to a deputy."""


@delegation.command("set")
@click.option("--user", required=True, help="CRM user id of the person away.")
@click.option("--deputy", required=True, help="CRM user id of who acts for them.")
@click.option(
    "--from",
    "starts_on",
    required=True,
    type=click.DateTime(["%Y-%m-%d"]),
    help="First day away (YYYY-MM-DD).",
)
@click.option(
    "--until", "ends_on", required=True, type=click.DateTime(["%Y-%m-%d"]), help="Last day away, inclusive."
)
@click.option("--rule", default=None, help="Only this rule's steps (default: every rule).")
@click.option("--note", default=None, help="Why, for the history (e.g. 'holiday').")
@click.option("--connection", default=None, help="The CRM connection (needed when several are configured).")
@pass_context
def delegation_set(
    ctx: Context,
    user: str,
    deputy: str,
    starts_on: object,
    ends_on: object,
    rule: str | None,
    note: str | None,
    connection: str | None,
) -> None:
    """Set USER's deputy from --from to --until. A deputy who is away too hands on to their own
    deputy; a deputy pointing back (A -> B -> A) is refused."""
    service = _service(ctx)
    try:
        view = service.set(
            connection=_connection(ctx, connection),
            user=user,
            deputy=deputy,
            starts_on=_date(starts_on),
            ends_on=_date(ends_on),
            rule=rule,
            note=note,
            actor=ADMIN,
            is_admin=True,
        )
    except CrmApprovalsError as exc:
        raise _fail(exc) from None
    click.echo(f"delegation {view.id}: {_describe(view)}")


@delegation.command("list")
@click.option("--user", default=None, help="Only delegations where this user is away or the deputy.")
@click.option("--all", "include_past", is_flag=True, help="Also cancelled and finished ones.")
@pass_context
def delegation_list(ctx: Context, user: str | None, include_past: bool) -> None:
    """List delegations (current and coming ones unless --all)."""
    service = _service(ctx)
    views = service.find(user=user, include_past=include_past)
    if not views:
        click.echo(
            "no delegations; set one with "
            "`crm-approvals delegation set --user U --deputy D --from YYYY-MM-DD --until YYYY-MM-DD`"
        )
        return
    for view in views:
        state = (
            "cancelled"
            if view.cancelled_at
            else ("in force" if view.in_force(service.clock().date()) else "")
        )
        click.echo(f"{view.id:>4}  {_describe(view)}  {state}".rstrip())


@delegation.command("cancel")
@click.argument("delegation_id", type=int)
@pass_context
def delegation_cancel(ctx: Context, delegation_id: int) -> None:
    """End delegation DELEGATION_ID now; steps already with the deputy stay there."""
    service = _service(ctx)
    try:
        view = service.cancel(delegation_id, actor=ADMIN, is_admin=True)
    except CrmApprovalsError as exc:
        raise _fail(exc) from None
    click.echo(f"delegation {view.id} cancelled: {_describe(view)}")


@click.command("reassign")
@click.argument("request_id")
@click.option(
    "--from", "old", required=True, help="The approver of the open step to replace (has not voted)."
)
@click.option("--to", "new", required=True, help="Who approves in their place.")
@click.option(
    "--step",
    "step_index",
    type=int,
    default=None,
    help="Step number as `requests show` prints it (default: the open step).",
)
@click.option("--comment", default=None, help="Why, for the history.")
@pass_context
def reassign(
    ctx: Context, request_id: str, old: str, new: str, step_index: int | None, comment: str | None
) -> None:
    """Admins: give an approver's place on a request's open step to someone else."""
    runtime = _runtime(ctx)
    approvals = runtime.approvals
    assert approvals is not None  # build_runtime attaches it
    try:
        if step_index is None:
            from connector.storage.approval_store import load

            with runtime.sessions() as session:
                stored = load(session, request_id)
            if stored is None or stored.request.current_step is None:
                raise click.ClickException(
                    f"request {request_id} has no open step (see `requests show {request_id}`)"
                )
            index = stored.request.current_step
        else:
            index = step_index - 1
        stored = approvals.reassign(
            runtime.sessions,
            request_id,
            user=ADMIN,
            step_index=index,
            old=old,
            new=new,
            comment=comment,
            is_admin=True,
        )
    except CrmApprovalsError as exc:
        raise _fail(exc) from None
    click.echo(f"request {request_id}: step {index + 1} now waits for {new} instead of {old}")


def _date(value: object) -> date:
    return value.date() if hasattr(value, "date") else value  # type: ignore[return-value]


def _describe(view: DelegationView) -> str:
    scope = f"rule {view.rule}" if view.rule else "every rule"
    return f"{view.user} -> {view.deputy}, {view.starts_on} to {view.ends_on}, {scope} ({view.connection})"


COMMANDS = [delegation, reassign]
