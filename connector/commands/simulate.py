"""`crm-approvals simulate --mappings NEW_DIR`: what proposed mapping files would have done
with the stored record changes, beside what happened (connector/service/simulate.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from connector.cli import Context, pass_context
from connector.commands.database import command_session
from connector.service.request_query import MOMENT_FORMS, parse_moment

if TYPE_CHECKING:  # the service imports the pipeline and so the metrics: not at start-up
    from connector.service.simulate import RuleImpact, Simulation

EXAMPLES_SHOWN = 5  # records shown per difference


@click.command("simulate")
@click.option(
    "--mappings",
    "mappings_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Directory of the proposed mapping files (as MAPPINGS_DIR would hold them).",
)
@click.option(
    "--since", default="90d", show_default=True, help=f"Replay changes received since: {MOMENT_FORMS}."
)
@click.option(
    "--examples",
    type=click.IntRange(0, 1000),
    default=EXAMPLES_SHOWN,
    show_default=True,
    help="Records shown per difference.",
)
@pass_context
def simulate_command(ctx: Context, mappings_dir: str, since: str, examples: int) -> None:
    """Replay the stored record changes through proposed mapping files, and compare.

    Per rule: how many records the proposed rules would have sent for approval and by which
    chain, beside what really happened, with example records of each difference. Nothing
    is written: no request, no write-back, no audit entry.

    The replay starts each record empty at --since and keeps a request open once sent
    (votes are not replayed); docs/reports.md#impact-simulation explains the rules.
    """
    from connector.clock import utcnow
    from connector.rules import MappingSet
    from connector.service.simulate import simulate

    try:
        start = parse_moment(since, utcnow())
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None
    proposed = MappingSet.load(mappings_dir)
    if proposed.errors:
        for error in proposed.errors:
            click.echo(str(error), err=True)
        raise click.ClickException(
            f"{len(proposed.errors)} problem(s) in {mappings_dir}; fix them (see `crm-approvals validate`) "
            "before simulating"
        )
    with command_session(ctx) as session:
        try:
            result = simulate(session, proposed, start)
        finally:
            session.rollback()  # read-only, whatever happened
    _print(result, examples)


def _print(result: Simulation, examples: int) -> None:
    console = Console(highlight=False, soft_wrap=True)
    console.print(
        f"Replayed {result.events} record change(s) received since {result.since:%Y-%m-%d %H:%M} UTC "
        f"({result.skipped} skipped: echoes of our write-back, failed or deleted)."
    )
    if not result.rules:
        console.print("No rule matched and no request was opened in this period.")
        return
    table = Table(title="Per rule", title_justify="left", box=box.SIMPLE_HEAD, header_style="bold")
    for column in ("RULE", "WOULD SEND", "SENT", "ONLY PROPOSED", "ONLY ACTUAL", "OTHER CHAIN"):
        table.add_column(column, justify="left" if column == "RULE" else "right")
    for impact in result.rules.values():
        table.add_row(
            Text(impact.rule),
            f"{len(impact.would)} ({impact.would_count})",
            f"{len(impact.actual)} ({impact.actual_count})",
            str(len(impact.only_new)),
            str(len(impact.only_actual)),
            str(len(impact.other_chain)),
        )
    console.print(table)
    console.print("Records (submissions in brackets).")
    for impact in result.rules.values():
        _print_rule(console, impact, examples)


def _print_rule(console: Console, impact: RuleImpact, examples: int) -> None:
    console.print(Text(f"\nrule {impact.rule}", style="bold"))
    for label, which in (("proposed chains", impact.would), ("actual chains", impact.actual)):
        for chain, count in impact.chains(which).items():
            console.print(Text(f"  {label}: {count} x " + (" -> ".join(chain) or "(no step applies)")))
    differences = (
        ("would be sent, were not", impact.only_new, None),
        ("were sent, would not be", impact.only_actual, None),
        ("sent by both, to another chain", impact.other_chain, impact),
    )
    for label, refs, chains in differences:
        if not refs:
            continue
        console.print(Text(f"  {label}: {len(refs)}"))
        for ref in refs[:examples]:
            line = f"    {ref}"
            if chains is not None:
                proposed, actual = " -> ".join(chains.would[ref]), " -> ".join(chains.actual[ref])
                line += f"\n      proposed: {proposed}\n      actual:   {actual}"
            console.print(Text(line))
    if not (impact.only_new or impact.only_actual or impact.other_chain):
        console.print("  no difference")


COMMANDS = [simulate_command]
