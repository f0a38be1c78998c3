"""Load mapping files: YAML with line numbers -> pydantic shape check -> cross-checks ->
compiled :class:`~connector.approvals.spec.MappingSpec`.

YAML is read with a SafeLoader subclass (never ``yaml.load``) whose scalar rules follow
YAML 1.2 rather than PyYAML's YAML 1.1 defaults, because 1.1 silently corrupts values
CRM admins write every day:

* ``on:`` (our events key), ``yes``, ``no``, ``off`` stay text — only true/false are booleans;
* ids with leading zeros (``005000000000001``) stay text instead of becoming octal ints;
* dates (``2024-05-01``) and times (``12:30``) stay text; the field type decides;
* numbers with a decimal point become ``Decimal``, never a binary float.

The node tree is walked by hand so every key path gets a line number and duplicate
keys are reported instead of the last one silently winning.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, cast

import yaml

from connector.approvals.modes import SettingsProblem, StepSettings, policy_for
from connector.approvals.spec import (
    ACTION_EVENTS,
    ActionSpec,
    ApproverSource,
    Criterion,
    DocumentSpec,
    FieldApprovers,
    FieldSpec,
    ManagerApprovers,
    MappingSpec,
    QueueApprovers,
    RoleApprovers,
    RuleSpec,
    StepSpec,
    UserApprovers,
    ValueMapApprovers,
)
from connector.errors import CrmApprovalsError
from connector.rules import company_rules
from connector.rules.coerce import CoercionError, coerce, parse_duration
from connector.rules.criteria import COMBINATORS, always, compile_criterion
from connector.rules.errors import (
    ErrorCollector,
    KeyPath,
    MappingError,
    MappingLoadError,
    did_you_mean,
    format_path,
    one_of,
)
from connector.rules.pending_keys import build_crm_vote, build_lock, step_inputs
from connector.rules.schema import (
    DOCUMENT_EVENTS,
    ApproverModel,
    MappingFileModel,
    RuleModel,
    StepModel,
    is_shared_document,
    validate_document,
)
from connector.rules.shared import load_shared
from connector.rules.templating import TemplateCompileError, compile_value, is_template
from connector.rules.timing import step_timing

MAPPING_SUFFIXES = (".yaml", ".yml")
_FIELD_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_MAX_NODES = 100_000  # alias bombs ("billion laughs") stop here instead of eating memory

# --- YAML with line numbers ------------------------------------------------------------------

_STR = "tag:yaml.org,2002:str"
_NULL = "tag:yaml.org,2002:null"
_BOOL = "tag:yaml.org,2002:bool"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_MERGE = "tag:yaml.org,2002:merge"
_SEQ = "tag:yaml.org,2002:seq"
_MAP = "tag:yaml.org,2002:map"


class _MappingYamlLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema scalars (see the module docstring)."""


_MappingYamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag in (_NULL, _MERGE)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_MappingYamlLoader.add_implicit_resolver(
    _BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_MappingYamlLoader.add_implicit_resolver(_INT, re.compile(r"^[-+]?(?:0|[1-9][0-9_]*)$"), list("-+0123456789"))
_MappingYamlLoader.add_implicit_resolver(
    _FLOAT,
    re.compile(
        r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?$|^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"
    ),
    list("-+0123456789."),
)


class _YamlError(CrmApprovalsError):
    """One problem while reading the YAML tree; becomes a MappingError with its line."""

    def __init__(self, path: KeyPath, line: int, message: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.path, self.line = path, line


class _NodeReader:
    """Turns a composed YAML node tree into plain data plus {key path: line}."""

    def __init__(self) -> None:
        self.lines: dict[KeyPath, int] = {(): 1}
        self.problems: list[_YamlError] = []
        self._visited = 0
        self._active: set[int] = set()

    def read(self, node: yaml.Node, path: KeyPath) -> Any:
        self._visited += 1
        if self._visited > _MAX_NODES:
            raise _YamlError(
                path, _line(node), f"file expands to more than {_MAX_NODES} values (alias loop?)"
            )
        if id(node) in self._active:
            raise _YamlError(path, _line(node), "an alias refers to itself")
        self._active.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, path)
            if isinstance(node, yaml.SequenceNode):
                return self._sequence(node, path)
            return self._scalar(cast(yaml.ScalarNode, node), path)
        finally:
            self._active.discard(id(node))

    def _sequence(self, node: yaml.SequenceNode, path: KeyPath) -> list[Any]:
        self._check_tag(node, _SEQ, path)
        items = []
        for index, child in enumerate(node.value):
            self.lines[path + (index,)] = _line(child)
            items.append(self.read(child, path + (index,)))
        return items

    def _mapping(self, node: yaml.MappingNode, path: KeyPath) -> dict[str, Any]:
        self._check_tag(node, _MAP, path)
        result: dict[str, Any] = {}
        merged: dict[str, Any] = {}
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:
                merged = {**self._merge_sources(value_node, path), **merged}
                continue
            key = self._key(key_node, path)
            child = path + (key,)
            if key in seen:
                message = f"duplicate key `{key}` (first written on line {seen[key]})"
                self.problems.append(_YamlError(child, _line(key_node), message, "remove one of them"))
                continue
            seen[key] = _line(key_node)
            self.lines[child] = _line(key_node)
            result[key] = self.read(value_node, child)
        # Keys written in the mapping itself override keys merged in with `<<: *anchor`.
        return {**merged, **result}

    def _merge_sources(self, node: yaml.Node, path: KeyPath) -> dict[str, Any]:
        sources = node.value if isinstance(node, yaml.SequenceNode) else [node]
        merged: dict[str, Any] = {}
        for source in sources:
            value = self.read(source, path)
            if not isinstance(value, dict):
                raise _YamlError(path, _line(source), "`<<` must merge a mapping")
            merged = {**value, **merged}  # earlier sources win, as in the YAML merge spec
        return merged

    def _key(self, node: yaml.Node, path: KeyPath) -> str:
        if not isinstance(node, yaml.ScalarNode):
            raise _YamlError(path, _line(node), "keys must be plain text, not lists or mappings")
        # The key exactly as written: `true:` or `005:` as a map key means that text.
        return str(node.value)

    def _scalar(self, node: yaml.ScalarNode, path: KeyPath) -> Any:
        text, tag = node.value, node.tag
        if tag == _STR:
            return text
        if tag == _NULL:
            return None
        if tag == _BOOL:
            return text.lower() == "true"
        if tag in (_INT, _FLOAT):
            return _number(text, tag, path, _line(node))
        raise _YamlError(path, _line(node), f"YAML tag `{tag}` is not supported", "remove the `!tag`")

    def _check_tag(self, node: yaml.Node, expected: str, path: KeyPath) -> None:
        if node.tag != expected:
            raise _YamlError(
                path, _line(node), f"YAML tag `{node.tag}` is not supported", "remove the `!tag`"
            )


def _number(text: str, tag: str, path: KeyPath, line: int) -> int | Decimal:
    clean = text.replace("_", "")
    try:
        if tag == _INT:
            return int(clean, 0) if clean.lstrip("+-").startswith("0") and len(clean) > 1 else int(clean)
        value = Decimal(clean)
    except (ValueError, InvalidOperation):
        raise _YamlError(path, line, f"{text!r} is not a valid number") from None
    if not value.is_finite():
        raise _YamlError(path, line, f"{text!r} is not a finite number")
    return value


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def read_yaml(text: str, file: str) -> tuple[Any, dict[KeyPath, int]]:
    """Parse one YAML document; returns (data, lines) or raises MappingLoadError."""
    try:
        root = yaml.compose(text, Loader=_MappingYamlLoader)
    except yaml.MarkedYAMLError as exc:
        raise MappingLoadError([_syntax_error(exc, file)]) from None
    except yaml.YAMLError as exc:
        raise MappingLoadError([MappingError(file, 1, "", f"YAML error: {exc}")]) from None
    if root is None:
        raise MappingLoadError([MappingError(file, 1, "", "file is empty", _EMPTY_HINT)])
    reader = _NodeReader()
    try:
        data = reader.read(root, ())
    except _YamlError as exc:
        reader.problems.append(exc)
    if reader.problems:
        errors = [MappingError(file, p.line, format_path(p.path), p.message, p.hint) for p in reader.problems]
        raise MappingLoadError(errors)
    return data, reader.lines


_EMPTY_HINT = "a mapping file needs `connection`, `object`, `fields` and `rules`"


def _syntax_error(exc: yaml.MarkedYAMLError, file: str) -> MappingError:
    mark = exc.problem_mark or exc.context_mark
    message = " ".join(part for part in (exc.context, exc.problem) if part) or "invalid YAML"
    hint = "check the indentation and quoting on this line and the one before it"
    if "\\t" in message or "'\\t'" in str(exc):
        hint = "YAML does not allow tabs for indentation; use spaces"
    elif "expected a single document" in message:
        hint = "one mapping per file: remove the `---` separator"
    elif "mapping values are not allowed" in message:
        hint = "a value containing `: ` must be quoted"
    line = mark.line + 1 if mark else 1
    column = mark.column + 1 if mark else None
    return MappingError(file, line, "", f"YAML syntax error: {message}", hint, column)


# --- building the spec -----------------------------------------------------------------------


class _SpecBuilder:
    """Cross-checks a schema-valid file and compiles it; errors go to the collector."""

    def __init__(self, model: MappingFileModel, errors: ErrorCollector) -> None:
        self.model = model
        self.errors = errors
        self.fields = self._fields()
        self.roles, self.groups = self._roles()
        self.related = company_rules.related_specs(self)  # issue 12: adds `<related>.approval` fields

    # -- fields, roles --

    def _fields(self) -> dict[str, FieldSpec]:
        fields: dict[str, FieldSpec] = {}
        for name, definition in self.model.fields.items():
            if not _FIELD_NAME.match(name):
                hint = "use letters, digits and _ (starting with a letter), e.g. credit_score"
                self.errors.add(("fields", name), f"`{name}` is not a valid canonical field name", hint)
            elif name in COMBINATORS:
                hint = f"`{name}` is a criteria keyword; rename the field, e.g. `{name}_flag`"
                self.errors.add(("fields", name), f"`{name}` is reserved", hint)
            fields[name] = FieldSpec(name, definition.api, definition.type)
        return fields

    def _roles(self) -> tuple[dict[str, tuple[str, ...]], dict[str, tuple[str, ...]]]:
        roles, groups = dict(self.model.roles), dict(self.model.groups)
        for name in sorted(set(roles) & set(groups)):
            hint = "roles and groups share one namespace; rename one of them"
            self.errors.add(("groups", name), f"`{name}` is both a role and a group", hint)
        return roles, groups

    def field_ref(self, name: str, path: KeyPath, *, types: Iterable[str] | None = None) -> FieldSpec | None:
        """Look up a canonical field used somewhere in the file; report it if unknown."""
        spec = self.fields.get(name)
        if spec is None:
            api = {f.api_name.lower(): f.name for f in self.fields.values()}
            hint = did_you_mean(name, self.fields) or "declare it under `fields:` first"
            if name.lower() in api:
                hint = f"`{name}` is a CRM API name; use the canonical name `{api[name.lower()]}`"
            self.errors.add(path, f"unknown field `{name}` (not declared under `fields:`)", hint)
            return None
        allowed = list(types or ())
        if allowed and spec.type not in allowed:
            self.errors.add(path, f"field `{name}` is {spec.type}; expected a {one_of(allowed)} field")
            return None
        return spec

    # -- rules --

    def build(self, file: str, content_hash: str) -> MappingSpec | None:
        rules = tuple(self._rule(rule, ("rules", i)) for i, rule in enumerate(self.model.rules))
        self._unique([rule.name for rule in self.model.rules], ("rules",), "rule")
        if self.errors:
            return None
        return MappingSpec(
            source_path=file,
            content_hash=content_hash,
            connection=self.model.connection,
            object_type=self.model.object_type,
            fields=self.fields,
            roles={**self.roles, **self.groups},
            rules=rules,  # type: ignore[arg-type]  # None only when errors were reported
            match=self.model.match,
            related=self.related,
        )

    def _unique(self, names: Sequence[str], path: KeyPath, what: str) -> None:
        seen: dict[str, int] = {}
        for index, name in enumerate(names):
            if name in seen:
                message = f"duplicate {what} name `{name}` (also {format_path(path + (seen[name],))})"
                self.errors.add(path + (index, "name"), message, f"{what} names must be unique")
            seen.setdefault(name, index)

    def _rule(self, rule: RuleModel, path: KeyPath) -> RuleSpec | None:
        when = self._when(rule.when, path + ("when",))
        self._step_names = [step.name for step in rule.steps]
        steps = tuple(self._step(step, path + ("steps", i), i) for i, step in enumerate(rule.steps))
        requires = company_rules.requirements(self, rule, path, self.related)
        self._unique([step.name for step in rule.steps], path + ("steps",), "step")
        restart = frozenset(
            name
            for i, name in enumerate(rule.restart_on_change)
            if self.field_ref(name, path + ("restart_on_change", i))
        )
        expires_after = self._expires_after(rule.expires_after, path + ("expires_after",))
        actions = self._actions(rule, path + ("on",))
        crm_vote = build_crm_vote(self, rule, path) if rule.crm_vote is not None else None
        lock = build_lock(self, rule, path) if rule.lock is not None else None
        if when is None or None in steps:
            return None
        return RuleSpec(
            rule.name,
            when,
            steps,  # type: ignore[arg-type]
            actions,  # type: ignore[arg-type]  # keys checked against ACTION_EVENTS
            expires_after,
            restart,
            reject_comment=rule.reject_comment,
            bulk_approve=rule.bulk_approve,
            allow_self_approval=rule.allow_self_approval,
            crm_vote=crm_vote,
            lock=lock,
            smart_reapproval=rule.smart_reapproval,
            same_approver=rule.same_approver,
            requires=requires,
            documents=self._documents(rule, path + ("documents",)),
        )

    def _documents(self, rule: RuleModel, path: KeyPath) -> tuple[DocumentSpec, ...]:
        self._unique([d.name for d in rule.documents], path, "document")
        return tuple(
            DocumentSpec(
                d.name,
                d.template,
                frozenset(kind for event in d.on for kind in DOCUMENT_EVENTS[event]),
                d.title,
            )
            for d in rule.documents
        )

    def _when(self, spec: Any, path: KeyPath) -> Criterion | None:
        if spec is None:
            return always(format_path(path))
        return compile_criterion(spec, self.fields, path=path, errors=self.errors)

    def _expires_after(self, text: str | None, path: KeyPath) -> Any:
        if text is None:
            return None
        try:
            duration = parse_duration(text)
        except CoercionError as exc:
            self.errors.add(path, f"{exc}, got {text!r}", "e.g. `expires_after: 180d`")
            return None
        if not duration.is_exact:
            hint = "use days or weeks (e.g. 180d or 26w): a month has no fixed length"
            self.errors.add(path, f"`expires_after` needs an exact length, got {text!r}", hint)
            return None
        return duration.as_timedelta()

    # -- steps and approvers --

    def _step(self, step: StepModel, path: KeyPath, index: int) -> StepSpec | None:
        service = company_rules.service_step(self, step, path, self._step_names)
        if service is False:
            return None
        approvers = tuple(
            self._approver(a, path + ("approvers", i)) for i, a in enumerate(step.approvers or ())
        )
        when = None if step.when is None else self._when(step.when, path + ("when",))
        settings = StepSettings() if service is not None else self._mode_settings(step, path, approvers)
        if step.on_reject == "back" and index == 0:
            hint = "use `on_reject: reject` (the default) on the first step"
            self.errors.add(path + ("on_reject",), "the first step has no previous step to go back to", hint)
        if None in approvers or (step.when is not None and when is None):
            return None
        label = step.label.strip() if step.label and step.label.strip() else None
        inputs = step_inputs(self, step, path, when, approvers)  # type: ignore[arg-type]
        timing = step_timing(step, path, self)
        return StepSpec(
            step.name,
            step.mode or "one",  # a service step has no mode; "one" keeps its row readable
            approvers,  # type: ignore[arg-type]  # no None: checked above
            settings.quorum_count,
            settings.quorum_percent,
            when,
            step.on_reject,
            label,
            smart_reapproval=step.smart_reapproval,
            inputs=inputs,
            timing=timing,
            service=service,  # type: ignore[arg-type]  # False returned above
        )

    def _approver(self, approver: ApproverModel, path: KeyPath) -> ApproverSource | None:
        if approver.user is not None:
            return UserApprovers(approver.user)
        if approver.role is not None:
            return self._role(approver.role, path + ("role",), self.roles, "role", self.groups)
        if approver.group is not None:
            return self._role(approver.group, path + ("group",), self.groups, "group", self.roles)
        if approver.field is not None:
            spec = self.field_ref(approver.field, path + ("field",), types=("user", "list", "string"))
            return FieldApprovers(spec.name) if spec else None
        if approver.manager_of is not None:
            return self._manager_of(approver.manager_of, approver.levels or 1, path + ("manager_of",))
        if approver.queue is not None:
            return QueueApprovers(approver.queue)
        return self._value_map(approver, path)

    def _manager_of(self, name: str, levels: int, path: KeyPath) -> ManagerApprovers | None:
        if name == "approver":
            hint = "a step's approvers come before it; use `{manager_of: owner}` or a user field"
            self.errors.add(
                path, "`manager_of: approver` is for escalation targets, not step approvers", hint
            )
            return None
        spec = self.field_ref(name, path, types=("user", "string"))
        return ManagerApprovers(spec.name, levels) if spec else None

    def role_ref(self, name: str, path: KeyPath, kind: str) -> RoleApprovers | None:
        """A role (kind "role") or group named somewhere else than an approver list."""
        pool, other = (self.roles, self.groups) if kind == "role" else (self.groups, self.roles)
        return self._role(name, path, pool, kind, other)

    def _role(
        self, name: str, path: KeyPath, pool: Mapping[str, Any], kind: str, other: Mapping[str, Any]
    ) -> RoleApprovers | None:
        if name in pool:
            return RoleApprovers(name)
        other_kind = "group" if kind == "role" else "role"
        if name in other:
            hint = f"`{name}` is a {other_kind}: write `{{{other_kind}: {name}}}`"
        else:
            hint = did_you_mean(name, pool) or f"declare it under `{kind}s:`"
        self.errors.add(path, f"unknown {kind} `{name}`", hint)
        return None

    def _value_map(self, approver: ApproverModel, path: KeyPath) -> ValueMapApprovers | None:
        assert approver.from_field is not None and approver.map is not None  # schema guarantees it
        spec = self.field_ref(approver.from_field, path + ("from_field",), types=("string", "list", "user"))
        mapping = {
            value: tuple(self._approver(a, path + ("map", value, i)) for i, a in enumerate(sources))
            for value, sources in approver.map.items()
        }
        default = tuple(
            self._approver(a, path + ("default", i)) for i, a in enumerate(approver.default or ())
        )
        flat = [a for sources in mapping.values() for a in sources] + list(default)
        if spec is None or None in flat:
            return None
        return ValueMapApprovers(spec.name, mapping, default)  # type: ignore[arg-type]

    def _mode_settings(self, step: StepModel, path: KeyPath, approvers: Sequence[Any]) -> StepSettings:
        """The step mode's settings (``quorum``), checked by the mode's policy."""
        assert step.mode is not None  # company_rules.service_step reports a people step without one
        settings = policy_for(step.mode).settings(step.quorum, self._static_approver_count(approvers))
        if isinstance(settings, SettingsProblem):
            self.errors.add(path + (settings.key,), settings.message, settings.hint)
            return StepSettings()
        return settings

    def _static_approver_count(self, approvers: Sequence[Any]) -> int | None:
        """Distinct users when every source is fixed; None when a record field decides."""
        users: set[str] = set()
        for source in approvers:
            if isinstance(source, UserApprovers):
                users.update(source.users)
            elif isinstance(source, RoleApprovers):
                users.update(self.roles.get(source.role) or self.groups.get(source.role) or ())
            else:
                return None
        return len(users)

    # -- actions --

    def _actions(self, rule: RuleModel, path: KeyPath) -> dict[str, ActionSpec]:
        actions: dict[str, ActionSpec] = {}
        for event in ACTION_EVENTS:
            action = getattr(rule.on, event)
            if action is not None:
                values = {
                    name: self._action_value(name, value, path + (event, "set", name))
                    for name, value in action.set_.items()
                }
                actions[event] = ActionSpec(values)
        return actions

    def _action_value(self, name: str, value: Any, path: KeyPath) -> Any:
        spec = self.field_ref(name, path)
        if spec is None:
            return None
        if spec.is_related:
            # The write-back updates the record itself; a related record is another object.
            message = f"`{name}` maps to the related field `{spec.api_name}`, which cannot be written back"
            self.errors.add(path, message, "actions can only set fields of the object itself")
            return None
        location = f"{self.errors.file}:{self.errors.line_of(path)}: {format_path(path)}"
        try:
            if is_template(value):
                return compile_value(value, record_fields=self.fields, location=location)
            return compile_value(_literal_for(spec, value))
        except TemplateCompileError as exc:
            for message, hint in exc.problems:
                self.errors.add(path, message, hint)
        except CoercionError as exc:
            self.errors.add(path, f"{value!r} is not a valid {spec.type} for `{name}`: {exc}")
        return None


def _literal_for(spec: FieldSpec, value: Any) -> Any:
    """Check a literal action value against the field type; normalise where CRMs need it."""
    if value is None:
        return None  # null clears the field
    coerced = coerce(value, spec.type)
    if coerced is None:
        return value
    if spec.type == "boolean":
        return coerced  # "yes" -> True: CRMs want a real boolean
    if spec.type in ("date", "datetime"):
        return coerced.isoformat()
    return value


# --- files and directories ------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedMapping:
    """A compiled mapping plus the line of every key, for follow-up checks (validate)."""

    spec: MappingSpec
    lines: Mapping[KeyPath, int]
    prefix: KeyPath = ()  # where its connection's keys are: ("connections", name) in a shared file

    def line_of(self, *path: str | int) -> int:
        """The line of a connection key (`object`, `fields`...) wherever the file keeps it."""
        return self.lines.get((*self.prefix, *path)) or self.lines.get(self.prefix, 1)


@dataclass(frozen=True)
class LoadResult:
    mappings: list[MappingSpec]
    errors: list[MappingError]


def load_mapping_text(data: bytes, file: str) -> LoadedMapping:
    """Load one mapping from bytes; raises MappingLoadError with every problem found."""
    content_hash = hashlib.sha256(data).hexdigest()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise MappingLoadError([MappingError(file, 1, "", f"file is not UTF-8 text: {exc}")]) from None
    document, lines = read_yaml(text, file)
    errors = ErrorCollector(file, lines)
    model = validate_document(document, errors)
    spec = _SpecBuilder(model, errors).build(file, content_hash) if model is not None else None
    if spec is None:
        # Pydantic, cross-checks and criteria report in their own order; admins read top-down.
        raise MappingLoadError(sorted(errors.errors, key=lambda e: e.line))
    return LoadedMapping(spec, lines)


def load_mapping_texts(data: bytes, file: str) -> list[LoadedMapping]:
    """Every mapping in one file: one, or one per connection of a `connections:` file
    (connector/rules/shared.py). Raises MappingLoadError with every problem found."""
    try:
        document, lines = read_yaml(data.decode("utf-8-sig"), file)
    except UnicodeDecodeError:
        document = None
    if is_shared_document(document):
        return load_shared(document, lines, file, hashlib.sha256(data).hexdigest())
    return [load_mapping_text(data, file)]


def load_mapping_file(path: str | Path) -> MappingSpec:
    """Load and compile one mapping file; raises MappingLoadError (``.errors``) if invalid."""
    return _load_file(Path(path))[0].spec


def _load_file(path: Path) -> list[LoadedMapping]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MappingLoadError(
            [MappingError(str(path), 0, "", f"cannot read file: {exc.strerror or exc}")]
        ) from None
    return load_mapping_texts(data, str(path))


def mapping_files(directory: str | Path) -> list[Path]:
    """*.yaml / *.yml under ``directory``, recursively, sorted; hidden files and dirs skipped."""
    root = Path(directory)
    found = [
        path
        for path in root.rglob("*")
        if path.suffix in MAPPING_SUFFIXES
        and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
    ]
    return sorted(found)


def load_mappings_detailed(files: Iterable[str | Path]) -> tuple[list[LoadedMapping], list[MappingError]]:
    """Load several files and check that no two map the same connection and object."""
    loaded: list[LoadedMapping] = []
    errors: list[MappingError] = []
    for path in files:
        try:
            loaded.extend(_load_file(Path(path)))
        except MappingLoadError as exc:
            errors.extend(exc.errors)
    kept, errors = _without_duplicates(loaded, errors)
    return kept, errors + company_rules.check_requirements(kept)  # issue 12: `requires:` across files


def _without_duplicates(
    loaded: list[LoadedMapping], errors: list[MappingError]
) -> tuple[list[LoadedMapping], list[MappingError]]:
    first: dict[tuple[str, str], LoadedMapping] = {}
    kept: list[LoadedMapping] = []
    for item in loaded:
        key = (item.spec.connection, item.spec.object_type.lower())
        if key not in first:
            first[key] = item
            kept.append(item)
            continue
        other = first[key].spec.source_path
        message = f"{key[0]} `{item.spec.object_type}` is already mapped in {other}"
        hint = "one file per connection and object: merge the rules into one file or delete one"
        line = item.line_of("object")
        errors.append(MappingError(item.spec.source_path, line, "object", message, hint))
    return kept, errors


def load_mapping_dir(directory: str | Path) -> LoadResult:
    """Every mapping file under ``directory``; valid ones in ``mappings``, problems in ``errors``."""
    root = Path(directory)
    if not root.is_dir():
        return LoadResult([], [MappingError(str(root), 0, "", "mapping directory does not exist")])
    loaded, errors = load_mappings_detailed(mapping_files(root))
    return LoadResult([item.spec for item in loaded], errors)


# --- the live set --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Snapshot:
    mappings: tuple[MappingSpec, ...] = ()
    index: Mapping[tuple[str, str], tuple[MappingSpec, ...]] = field(default_factory=dict)


def _fingerprint(directory: Path) -> tuple[tuple[str, str], ...]:
    """Each mapping file with the sha256 of its content: an edit is seen even when it keeps
    the size and lands within the file system's time resolution (a few KB to read)."""
    found = []
    for path in mapping_files(directory) if directory.is_dir() else []:
        with contextlib.suppress(OSError):  # removed while we looked: the next check sees it
            found.append((str(path), hashlib.sha256(path.read_bytes()).hexdigest()))
    return tuple(found)


def _snapshot(mappings: Iterable[MappingSpec]) -> _Snapshot:
    index: dict[tuple[str, str], tuple[MappingSpec, ...]] = {}
    for spec in mappings:
        key = (spec.connection, spec.object_type.lower())
        index[key] = index.get(key, ()) + (spec,)
    return _Snapshot(tuple(mappings), index)


class MappingSet:
    """The mappings a running server uses, reloadable without ever going down.

    All or nothing: a directory is activated only when EVERY file in it is valid. When a
    reload finds any error, the whole previous set stays active (the last good set) and
    the errors are returned and kept in :attr:`errors`. On the first load there is no
    previous set, so a directory with errors yields an empty set plus the errors. This
    keeps related files (and a file's rules) consistent with each other at all times.
    """

    def __init__(self, directory: str | Path, mappings: Iterable[MappingSpec] = ()) -> None:
        self.directory = Path(directory)
        self._state = _snapshot(mappings)
        self._errors: tuple[MappingError, ...] = ()
        self._lock = threading.Lock()  # serialises reloads; readers never wait
        self._fingerprint: tuple[tuple[str, str], ...] = ()
        self._checked_at = 0.0

    @classmethod
    def load(cls, directory: str | Path) -> MappingSet:
        mapping_set = cls(directory)
        mapping_set.reload()
        return mapping_set

    def reload_if_changed(self, min_interval: float = 2.0) -> list[MappingError] | None:
        """Reload when a file was added, removed or changed in content since the last load,
        checking the directory at most every `min_interval` seconds. None = nothing to do."""
        now = time.monotonic()
        if now - self._checked_at < min_interval:
            return None
        self._checked_at = now
        if _fingerprint(self.directory) == self._fingerprint:
            return None
        return self.reload()

    def reload(self) -> list[MappingError]:
        """Re-read the directory; returns the errors (empty list = new set is active)."""
        with self._lock:
            self._fingerprint = _fingerprint(self.directory)
            result = load_mapping_dir(self.directory)
            self._errors = tuple(result.errors)
            if not result.errors:
                self._state = _snapshot(result.mappings)  # one reference swap: atomic for readers
            return list(result.errors)

    @property
    def mappings(self) -> tuple[MappingSpec, ...]:
        return self._state.mappings

    @property
    def errors(self) -> tuple[MappingError, ...]:
        """Errors from the most recent load/reload (empty when it succeeded)."""
        return self._errors

    def for_object(self, connection: str, object_type: str) -> list[MappingSpec]:
        """Mappings for a connection and CRM object; the object name is matched case-insensitively."""
        return list(self._state.index.get((connection, object_type.lower()), ()))
