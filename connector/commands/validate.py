"""`crm-approvals validate [PATH]...`: check mapping files before they reach a server.

Prints one line per problem, ``file:line: key: message; hint: ...`` (the shape editors and
CI annotators understand), and exits 1 when there is any problem.

The integrator may pass a ``describe`` hook, ``(connection, object) -> set of API field
names``, to also check the mapped CRM API names against the CRM itself. Names are compared
case-insensitively. For a related name such as ``Account.Credit_Score__c`` only the first
segment is checked: it passes when the describe result contains the relationship name
(``Account``) or its lookup field (``AccountId``, ``Account_Id``/``account_id``, or for a
custom relationship ``Foo__r`` the field ``Foo__c``). The rest of the path would need a
describe of the related object, which this hook does not offer, so it is not checked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import click

from connector.approvals.spec import ApproverSource, FieldSpec, UserApprovers, ValueMapApprovers
from connector.rules.errors import KeyPath, MappingError, did_you_mean, format_path
from connector.rules.loader import LoadedMapping, load_mappings_detailed, mapping_files

DescribeFn = Callable[[str, str], set[str] | None]  # None = this connection cannot be checked
DescribeFactory = Callable[[click.Context], DescribeFn | None]
# connection -> every user id its directory knows; None = no directory to check against
KnownPeopleFn = Callable[[str], set[str] | None]
PeopleFactory = Callable[[click.Context, bool], KnownPeopleFn | None]
DEFAULT_PATH = "mappings/"


def validate_paths(paths: Iterable[str | Path], describe: DescribeFn | None = None) -> list[MappingError]:
    """Every problem in the given files/directories (empty list = all valid)."""
    return validate_with_warnings(paths, describe)[0]


def validate_with_warnings(
    paths: Iterable[str | Path], describe: DescribeFn | None = None, people: KnownPeopleFn | None = None
) -> tuple[list[MappingError], list[MappingError]]:
    """(problems, warnings): warnings name approver ids the user directory does not know."""
    files, errors = _collect_files(paths)
    loaded, load_errors = load_mappings_detailed(files)
    errors.extend(load_errors)
    warnings: list[MappingError] = []
    for item in loaded:
        if describe is not None:
            errors.extend(check_api_fields(item, describe))
        if people is not None:
            warnings.extend(check_approver_ids(item, people))
    return errors, warnings


def check_approver_ids(item: LoadedMapping, people: KnownPeopleFn) -> list[MappingError]:
    """A warning for each fixed approver id (users, roles, groups, value maps) that the
    connection's user directory does not know: a typo, or someone who left."""
    spec = item.spec
    known = people(spec.connection)
    if known is None:
        return []
    warnings = []
    for user, path in _approver_ids(item):
        if user in known:
            continue
        message = f"warning: user id `{user}` is not in the user directory of connection `{spec.connection}`"
        hint = did_you_mean(user, known) or "check the id in the CRM (`crm-approvals directory list`)"
        line = item.lines.get(path) or item.lines.get(path[:2], 1)
        warnings.append(MappingError(spec.source_path, line, format_path(path), message, hint))
    return warnings


def _approver_ids(item: LoadedMapping) -> list[tuple[str, KeyPath]]:
    spec = item.spec
    found: list[tuple[str, KeyPath]] = []
    for name, members in spec.roles.items():
        section = "roles" if ("roles", name) in item.lines else "groups"
        where: KeyPath = (section, name)
        for own in ((*item.prefix, "roles", name), (*item.prefix, "groups", name)):
            if item.prefix and own in item.lines:  # this connection's own ids in a shared file
                where = own
        found += [(user, (*where, i)) for i, user in enumerate(members)]
    for r, rule in enumerate(spec.rules):
        for s_, step in enumerate(rule.steps):
            for a, source in enumerate(step.approvers):
                found += _source_ids(source, ("rules", r, "steps", s_, "approvers", a))
    return found


def _source_ids(source: ApproverSource, path: KeyPath) -> list[tuple[str, KeyPath]]:
    if isinstance(source, UserApprovers):
        return [(user, (*path, "user")) for user in source.users]
    if isinstance(source, ValueMapApprovers):
        found: list[tuple[str, KeyPath]] = []
        for value, sources in source.mapping.items():
            for i, inner in enumerate(sources):
                found += _source_ids(inner, (*path, "map", value, i))
        for i, inner in enumerate(source.default):
            found += _source_ids(inner, (*path, "default", i))
        return found
    return []  # roles are checked where they are defined; fields hold ids only at run time


def _collect_files(paths: Iterable[str | Path]) -> tuple[list[Path], list[MappingError]]:
    files: list[Path] = []
    errors: list[MappingError] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = mapping_files(path)
            if not found:
                errors.append(MappingError(str(path), 0, "", "no mapping files (*.yaml, *.yml) found here"))
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            errors.append(MappingError(str(path), 0, "", "no such file or directory"))
    # The same file reached through two arguments must not look like a duplicate mapping.
    unique = {p.resolve(): p for p in reversed(files)}  # first spelling wins
    return list(reversed(unique.values())), errors


def check_api_fields(item: LoadedMapping, describe: DescribeFn) -> list[MappingError]:
    """Compare the mapping's API names with what the CRM says the object has."""
    spec = item.spec
    try:
        described = describe(spec.connection, spec.object_type)
    except Exception as exc:  # a CRM outage must not hide the other files' results
        message = f"could not describe {spec.connection} `{spec.object_type}`: {exc}"
        hint = "is the CRM reachable with the configured credentials? --no-crm checks the files only"
        key = format_path((*item.prefix, "object"))
        return [MappingError(spec.source_path, item.line_of("object"), key, message, hint)]
    if described is None:
        return []
    names = set(described)
    lowered = {name.lower() for name in names}
    errors = []
    for field in spec.fields.values():
        if field.is_virtual:  # `company.approval`: computed by the service, not a CRM field
            continue
        problem = _api_problem(field, names, lowered)
        if problem is not None:
            line = item.line_of("fields", field.name)
            key = format_path((*item.prefix, "fields", field.name))
            errors.append(MappingError(spec.source_path, line, key, *problem))
    return errors


def _api_problem(field: FieldSpec, names: set[str], lowered: set[str]) -> tuple[str, str | None] | None:
    if not field.is_related:
        if field.api_name.lower() in lowered:
            return None
        message = f"`{field.api_name}` is not a field of this object in the CRM"
        return message, did_you_mean(field.api_name, names)
    relation = field.api_name.split(".", 1)[0]
    candidates = _relationship_candidates(relation)
    if any(candidate.lower() in lowered for candidate in candidates):
        return None
    message = (
        f"relationship `{relation}` of `{field.api_name}` not found (looked for {', '.join(candidates)})"
    )
    return message, did_you_mean(relation, names) or did_you_mean(candidates[1], names)


def _relationship_candidates(relation: str) -> list[str]:
    candidates = [relation, f"{relation}Id", f"{relation}_Id"]
    if relation.endswith("__r"):
        candidates.append(relation[:-3] + "__c")
    return candidates


def make_validate_command(
    describe_factory: DescribeFactory | None = None, people_factory: PeopleFactory | None = None
) -> click.Command:
    """The `validate` command; ``describe_factory(ctx)`` may return a describe hook (or None),
    ``people_factory(ctx, may_call_crm)`` a directory lookup for approver ids (or None)."""

    @click.command("validate")
    @click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
    @click.option("--no-crm", is_flag=True, help="Check the files only, not the field names against the CRM.")
    @click.pass_context
    def validate(ctx: click.Context, paths: tuple[Path, ...], no_crm: bool) -> None:
        """Check mapping files (default: mappings/) and report every problem.

        PATH may be a file or a directory (searched recursively for *.yaml and *.yml).
        Where a file's connection has credentials configured, its mapped API field names
        are also checked against the CRM's own field list (describe), and approver ids
        against the user directory: an id it does not know is a warning.
        Exits with status 1 when any problem is found (warnings alone do not fail), so
        admins can run it in CI.
        """
        describe = describe_factory(ctx) if describe_factory is not None and not no_crm else None
        people = people_factory(ctx, not no_crm) if people_factory is not None else None
        targets = paths or (Path(DEFAULT_PATH),)
        errors, warnings = validate_with_warnings(targets, describe, people)
        for warning in warnings:
            click.echo(str(warning))
        for error in errors:
            click.echo(str(error))
        if errors:
            files = len({error.file for error in errors})
            click.echo(f"{len(errors)} problem(s) in {files} file(s)", err=True)
            ctx.exit(1)
        click.echo(f"OK: {', '.join(str(t) for t in targets)}: all mapping files are valid")

    return validate


def crm_describe(ctx: click.Context) -> DescribeFn | None:
    """Describe through the configured adapters; connections without credentials are skipped."""
    from connector.cli import Context
    from connector.config import ConfigError
    from connector.crm.registry import build_adapter
    from connector.crm.retry import RetryPolicy

    found = ctx.find_object(Context)
    if found is None:  # invoked outside the `crm-approvals` group: no settings, files only
        return None
    settings = found.settings

    def describe(connection: str, object_type: str) -> set[str] | None:
        if connection not in settings.connections:
            return None
        try:
            adapter = build_adapter(settings.connections[connection], settings)
        except ConfigError:
            return None  # no credentials for it here: nothing to check against
        adapter.retry = RetryPolicy(attempts=2, max_wait=5)
        fields = adapter.describe(object_type)
        return {f.name for f in fields} | {f.relationship_name for f in fields if f.relationship_name}

    return describe


def directory_ids(ctx: click.Context, may_call_crm: bool) -> KnownPeopleFn | None:
    """Approver ids known to the user directory; a connection never read is read from the CRM
    first (unless --no-crm). Without a database or credentials there is nothing to check."""
    from connector.cli import Context
    from connector.directory import Directory
    from connector.runtime import Runtime

    found = ctx.find_object(Context)
    if found is None:
        return None
    settings = found.settings
    runtime = Runtime.from_settings(settings)
    ctx.call_on_close(runtime.close)
    directory = Directory.from_runtime(runtime)

    def known(connection: str) -> set[str] | None:
        if connection not in settings.connections:
            return None
        try:
            if may_call_crm:
                directory.ensure_loaded(connection)
            return directory.known_ids(connection)
        except Exception as exc:  # no tables yet, no credentials: the files are still checked
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            click.echo(
                f"note: approver ids of {connection} not checked against the directory: {reason}", err=True
            )
            return None

    return known


validate = make_validate_command(crm_describe, directory_ids)

# Picked up by connector.cli (each command module exposes COMMANDS).
COMMANDS = [validate]
