"""Commands for admins and ops: explain a record. The sync jobs are in connector/commands/sync.py."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from connector.cli import Context, pass_context


@click.command()
@click.option(
    "--record",
    "record_file",
    type=click.Path(exists=True, dir_okay=False),
    help="A JSON file with the record.",
)
@click.option("--record-id", help="Read the record from the CRM instead (needs --connection and --object).")
@click.option("--connection", help="Connection name [default: from the JSON file].")
@click.option("--object", "object_type", help="CRM object, e.g. Opportunity [default: from the JSON file].")
@click.option("--mappings", "mappings_dir", type=click.Path(file_okay=False), help="[default: MAPPINGS_DIR]")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@pass_context
def explain(
    ctx: Context,
    record_file: str | None,
    record_id: str | None,
    connection: str | None,
    object_type: str | None,
    mappings_dir: str | None,
    as_json: bool,
) -> None:
    """Show which rule a record matches, each condition with its actual value, and the
    approvers who would be asked. Creates nothing.

    The JSON file holds CRM API names: either {"connection": ..., "object": ...,
    "values": {...}, "previous": {...}, "changed_fields": [...]} or just the values
    (then give --connection and --object).
    """
    from connector.rules import MappingSet
    from connector.service.explain import explain_record, render_text

    record = _read_record(ctx, record_file, record_id, connection, object_type)
    mappings = MappingSet.load(mappings_dir or ctx.settings.mappings_dir)
    if mappings.errors:
        raise click.ClickException("mapping errors:\n" + "\n".join(str(e) for e in mappings.errors))
    specs = mappings.for_object(record["connection"], record["object"])
    if not specs:
        raise click.ClickException(
            f"no mapping file covers {record['connection']}/{record['object']} in {mappings.directory}"
        )
    for spec in specs:
        result = explain_record(
            spec, record["values"], record.get("previous"), tuple(record.get("changed_fields", ()))
        )
        click.echo(json.dumps(asdict(result), default=str, indent=2) if as_json else render_text(result))


def _read_record(
    ctx: Context,
    record_file: str | None,
    record_id: str | None,
    connection: str | None,
    object_type: str | None,
) -> dict[str, Any]:
    if bool(record_file) == bool(record_id):
        raise click.UsageError("give exactly one of --record FILE.json or --record-id ID")
    if record_file:
        try:
            data = json.loads(Path(record_file).read_text())
        except json.JSONDecodeError as exc:
            raise click.ClickException(f"{record_file}: not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise click.ClickException(f"{record_file}: expected a JSON object")
        record = data if "values" in data else {"values": data}
    else:
        if not (connection and object_type):
            raise click.UsageError("--record-id needs --connection and --object")
        record = {"values": _fetch(ctx, connection, object_type, str(record_id))}
    record["connection"] = connection or record.get("connection")
    record["object"] = object_type or record.get("object")
    if not record["connection"] or not record["object"]:
        raise click.UsageError("name the record's --connection and --object (or put them in the JSON file)")
    if not isinstance(record["values"], dict):
        raise click.ClickException("`values` must be an object of API field name -> value")
    return record


def _fetch(ctx: Context, connection: str, object_type: str, record_id: str) -> dict[str, Any]:
    from connector.crm.errors import CRMError
    from connector.rules import MappingSet
    from connector.runtime import Runtime

    if ctx.settings.connection(connection).kind == "salesforce":
        from connector.crm.salesforce_ids import HINT, normalize_salesforce_id

        try:
            record_id = normalize_salesforce_id(record_id)
        except ValueError as exc:
            raise click.BadParameter(f"{exc}; {HINT}", param_hint="--record-id") from None
    runtime = Runtime.from_settings(ctx.settings)
    fields = sorted(
        {
            f
            for spec in MappingSet.load(ctx.settings.mappings_dir).for_object(connection, object_type)
            for f in spec.api_fields()
        }
    )
    try:
        values = runtime.adapter(connection).get_record(object_type, record_id, fields)
    except CRMError as exc:
        raise click.ClickException(f"reading {object_type} {record_id} from {connection}: {exc}") from None
    if values is None:
        raise click.ClickException(f"{connection} has no {object_type} with id {record_id}")
    return values


COMMANDS = [explain]
