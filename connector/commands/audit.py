"""`crm-approvals audit ...`: check the hash-chained audit log, and print its head for an
anchor kept outside the database (docs/operations.md, "Audit log")."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click
from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlalchemy.orm import Session, sessionmaker

from connector.cli import Context, pass_context
from connector.storage.audit import ChainHead, chain_head, verify

TAMPERED = 1  # exit status when the chain is broken; setup problems exit with 2


class _ChainHeadParam(click.ParamType):
    name = "ID:HASH"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> ChainHead:
        if isinstance(value, ChainHead):
            return value
        try:
            return ChainHead.parse(str(value))
        except ValueError as exc:
            self.fail(f"{exc}; use what `crm-approvals audit head` printed", param, ctx)


@click.group()
def audit() -> None:
    """The audit log: every webhook, rule match, vote, transition and write-back, hash-chained."""


@audit.command("verify")
@click.option(
    "--expect-head",
    "anchors",
    type=_ChainHeadParam(),
    multiple=True,
    help="A chain head recorded earlier outside the database (from `audit head`); "
    "the log must still contain that row with that hash. Repeatable.",
)
@pass_context
def audit_verify(ctx: Context, anchors: tuple[ChainHead, ...]) -> None:
    """Check every audit row against its hash and the chain; exit 1 naming the first bad row.

    Detects a changed, deleted or inserted row and rows cut off the end. Cutting off the end
    together with rewriting the chain head is only caught with --expect-head.
    """
    with _sessions(ctx) as sessions:
        result = verify(sessions, anchors)
    if not result.ok:
        where = f"row {result.bad_id}" if result.bad_id is not None else "chain head"
        click.echo(f"audit log TAMPERED at {where}: {result.problem}", err=True)
        click.echo(f"({result.rows} rows before it are intact)", err=True)
        click.get_current_context().exit(TAMPERED)
    anchored = f"; matches {len(anchors)} external anchor(s)" if anchors else ""
    click.echo(f"audit log intact: {result.rows} rows, chain head {result.head}{anchored}")


@audit.command("head")
@pass_context
def audit_head(ctx: Context) -> None:
    """Print the chain head as ID:HASH, to record outside the database.

    Append it to a log the database's admins cannot rewrite (syslog shipped off-host, a
    write-once bucket) and check later with `audit verify --expect-head ID:HASH`.
    """
    with _sessions(ctx) as sessions, sessions() as session:
        head = chain_head(session)
    if head is None:
        raise click.ClickException(
            "the audit chain head row is missing; `crm-approvals audit verify` tells what else changed"
        )
    click.echo(str(head))


@contextmanager
def _sessions(ctx: Context) -> Iterator[sessionmaker[Session]]:
    from connector.storage.db import make_engine, make_session_factory

    engine = make_engine(ctx.settings.database_url)
    try:
        yield make_session_factory(engine)
    except (OperationalError, ProgrammingError) as exc:
        if "audit_chain_head" not in str(exc) and "audit_log" not in str(exc):
            raise
        error = click.ClickException(
            "the database has no hash-chained audit log yet; run `crm-approvals db upgrade`"
        )
        error.exit_code = 2  # type: ignore[misc]  # 1 means a broken chain
        raise error from None
    finally:
        engine.dispose()


COMMANDS = [audit]
