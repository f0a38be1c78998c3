"""Compile the issue-12 keys of a mapping file: `related:` records, a rule's `requires:`, and
steps the service runs itself (`kind: check`, `kind: duplicate`). Pure: the loader's builder
calls these with its error collector, so every problem names file:line with a suggestion.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from connector.approvals.spec import (
    VIRTUAL_PREFIX,
    DuplicateCheck,
    FieldSpec,
    HttpCheck,
    RelatedSpec,
    Requirement,
    Route,
    RouteRule,
    ServiceStep,
)
from connector.rules.criteria import always, compile_criterion
from connector.rules.errors import KeyPath, MappingError, did_you_mean, format_path, one_of
from connector.rules.schema import CheckModel, DuplicateModel, RouteModel, StepModel
from connector.rules.templating import TemplateCompileError, compile_value, is_template

if TYPE_CHECKING:
    from connector.rules.loader import LoadedMapping, _SpecBuilder

_LOOKS_SECRET = re.compile(r"auth|key|token|secret", re.IGNORECASE)
_APPROVERS_HINT = "e.g. `approvers: [{group: finance}]`"
APPROVAL_FIELD = "approval"  # `<related>.approval`: the related record's approval state
RESPONSE_STATUS = "status"  # every check answer has its HTTP status under this name


def approval_field(related: str) -> str:
    return f"{related}.{APPROVAL_FIELD}"


def related_specs(builder: _SpecBuilder) -> dict[str, RelatedSpec]:
    """`related:` entries, each adding the computed field `<name>.approval` for criteria."""
    related: dict[str, RelatedSpec] = {}
    for name, model in builder.model.related.items():
        path: KeyPath = ("related", name, "field")
        if builder.field_ref(model.field, path, types=("string", "user", "number")) is None:
            continue
        related[name] = RelatedSpec(name, model.field, model.object_type)
        virtual = approval_field(name)
        builder.fields[virtual] = FieldSpec(virtual, f"{VIRTUAL_PREFIX}{virtual}", "string")
    return related


def requirements(
    builder: _SpecBuilder, rule_model: Any, path: KeyPath, related: Mapping[str, RelatedSpec]
) -> tuple[Requirement, ...]:
    found = []
    for i, item in enumerate(rule_model.requires):
        if item.related not in related:
            hint = did_you_mean(item.related, related) or (
                "declare it at the top of the file: "
                "`related: {company: {field: company_id, object: company}}`"
            )
            builder.errors.add(
                path + ("requires", i, "related"), f"unknown related record `{item.related}`", hint
            )
            continue
        found.append(Requirement(item.related, item.rule))
    return tuple(found)


def service_step(
    builder: _SpecBuilder, step: StepModel, path: KeyPath, step_names: list[str]
) -> ServiceStep | None | bool:
    """The step's service settings; None for a people step; False when it has errors."""
    errors_before = len(builder.errors.errors)
    if step.kind == "approval":
        for key in ("check", "duplicate"):
            if getattr(step, key) is not None:
                builder.errors.add(
                    path + (key,), f"`{key}` needs `kind: {key}` on the step", f"add `kind: {key}`"
                )
        if step.mode is None:
            builder.errors.add(path + ("mode",), "missing required key `mode`", "e.g. `mode: one`")
        if step.approvers is None:
            builder.errors.add(path + ("approvers",), "missing required key `approvers`", _APPROVERS_HINT)
        elif not step.approvers:
            builder.errors.add(path + ("approvers",), "needs at least one approver", _APPROVERS_HINT)
        return None if len(builder.errors.errors) == errors_before else False
    for key in ("mode", "approvers", "quorum"):
        if getattr(step, key) is not None:
            builder.errors.add(
                path + (key,),
                f"a `kind: {step.kind}` step has no `{key}`",
                "the service decides it; remove the key",
            )
    result: ServiceStep | None = None
    if step.kind == "check":
        if step.check is None:
            builder.errors.add(
                path, "a `kind: check` step needs `check:`", "see docs/mappings.md#service-steps"
            )
        else:
            result = _http_check(builder, step.check, path + ("check",), step_names)
    else:
        if step.duplicate is None:
            builder.errors.add(
                path,
                "a `kind: duplicate` step needs `duplicate:`",
                "e.g. `duplicate: {field: contract_number}`",
            )
        else:
            result = _duplicate(builder, step.duplicate, path + ("duplicate",), step_names)
    if len(builder.errors.errors) != errors_before or result is None:
        return False
    return result


def _http_check(
    builder: _SpecBuilder, model: CheckModel, path: KeyPath, step_names: list[str]
) -> HttpCheck | None:
    if not model.url.startswith(("http://", "https://", "${")):
        hint = "e.g. `url: https://verify.example/v1/check` or `url: ${SECURITY_CHECK_URL}/check`"
        builder.errors.add(
            path + ("url",), f"`url` must start with http://, https:// or ${{NAME}}, got {model.url!r}", hint
        )
    for name, value in model.headers.items():
        if _LOOKS_SECRET.search(name) and "${" not in value:
            hint = f'keep secrets in the environment: `{name}: "Bearer ${{SECURITY_CHECK_TOKEN}}"`'
            builder.errors.add(path + ("headers", name), f"header `{name}` holds a literal secret", hint)
    timeout = _duration(builder, model.timeout, path + ("timeout",))
    wait = _duration(builder, model.wait, path + ("wait",))
    if model.answer == "callback" and model.callback_secret_env is None:
        builder.errors.add(
            path,
            "`answer: callback` needs `callback_secret_env`",
            "name the variable holding the HMAC secret, e.g. SECURITY_CHECK_SECRET",
        )
    response = {RESPONSE_STATUS: FieldSpec(RESPONSE_STATUS, RESPONSE_STATUS, "number")}
    for name, field_model in model.response.items():
        response[name] = FieldSpec(name, field_model.api, field_model.type)
    body = None
    if model.body is not None:
        body = _template(builder, model.body, path + ("body",))
    routes = []
    for i, item in enumerate(model.routes):
        where = path + ("routes", i)
        when = (
            always(format_path(where + ("when",)))
            if item.when is None
            else compile_criterion(item.when, response, path=where + ("when",), errors=builder.errors)
        )
        route = _route(builder, item.then, where + ("then",), step_names)
        if when is not None and route is not None:
            routes.append(RouteRule(when, route))
    on_failure = _route(builder, model.on_failure, path + ("on_failure",), step_names)
    if timeout is None or wait is None or on_failure is None:
        return None
    return HttpCheck(
        url=model.url,
        method=model.method,
        headers=dict(model.headers),
        body=body,
        timeout=timeout,
        retries=model.retries,
        answer=model.answer,
        wait=wait,
        callback_secret_env=model.callback_secret_env,
        response=response,
        routes=tuple(routes),
        on_failure=on_failure,
    )


def _duplicate(
    builder: _SpecBuilder, model: DuplicateModel, path: KeyPath, step_names: list[str]
) -> DuplicateCheck | None:
    spec = builder.field_ref(model.field, path + ("field",))
    if spec is not None and (spec.is_related or spec.is_virtual):
        builder.errors.add(
            path + ("field",),
            f"`{model.field}` is not a field of the object itself",
            "check a field of this object, e.g. contract_number",
        )
        spec = None
    message = None if model.message is None else _template(builder, model.message, path + ("message",))
    on_failure = _route(builder, model.on_failure, path + ("on_failure",), step_names)
    if spec is None or on_failure is None:
        return None
    return DuplicateCheck(spec.name, message, on_failure)


def _route(builder: _SpecBuilder, model: RouteModel, path: KeyPath, step_names: list[str]) -> Route | None:
    text = model.message if model.back is not None else model.reject
    message = None
    if text:
        message = _template(builder, text, path + ("message" if model.back is not None else "reject",))
    if model.continue_ is not None:
        return Route("continue")
    if model.back is not None:
        if model.back not in step_names:
            hint = did_you_mean(model.back, step_names) or f"expected {one_of(step_names)}"
            builder.errors.add(path + ("back",), f"no step named `{model.back}` in this rule", hint)
            return None
        return Route("back", model.back, message)
    return Route("reject", None, message)


def _template(builder: _SpecBuilder, text: str, path: KeyPath) -> Any:
    """A message or body: `record.<field>`, `answer.<field>`, `duplicate.other_name`, ..."""
    location = f"{builder.errors.file}:{builder.errors.line_of(path)}: {format_path(path)}"
    try:
        if is_template(text):
            return compile_value(text, record_fields=builder.fields, location=location)
        return compile_value(text)
    except TemplateCompileError as exc:
        for message, hint in exc.problems:
            builder.errors.add(path, message, hint)
    return None


_SHORT_DURATION = re.compile(r"^\s*([0-9]{1,7})\s*(s|min|h|d)\s*$")
_UNIT_SECONDS = {"s": 1, "min": 60, "h": 3600, "d": 86400}


def _duration(builder: _SpecBuilder, text: str, path: KeyPath) -> timedelta | None:
    """`10s`, `5min`, `2h`, `2d` (a month has no fixed length, so `m` is not offered here)."""
    match = _SHORT_DURATION.match(text)
    if match is None or int(match.group(1)) == 0:
        builder.errors.add(
            path,
            f"expected a duration such as 10s, 5min, 2h or 2d, got {text!r}",
            "write a whole number and s, min, h or d",
        )
        return None
    return timedelta(seconds=int(match.group(1)) * _UNIT_SECONDS[match.group(2)])


def check_requirements(loaded: Sequence[LoadedMapping]) -> list[MappingError]:
    """Across files: every `requires:` names a rule that a mapping of the related object has."""
    rules_of: dict[tuple[str, str], list[str]] = {}
    for item in loaded:
        key = (item.spec.connection, item.spec.object_type.lower())
        rules_of.setdefault(key, []).extend(rule.name for rule in item.spec.rules)
    errors = []
    for item in loaded:
        spec = item.spec
        for i, rule in enumerate(spec.rules):
            for j, requirement in enumerate(rule.requires):
                related = spec.related[requirement.related]
                known = rules_of.get((spec.connection, related.object_type.lower()))
                if known is not None and requirement.rule in known:
                    continue
                path: KeyPath = ("rules", i, "requires", j, "rule")
                line = item.lines.get(path) or item.lines.get(path[:-1], 1)
                if known is None:
                    what = f"{spec.connection} `{related.object_type}`"
                    message = f"no mapping file maps {what}, so rule `{requirement.rule}` cannot be found"
                    hint = f"add a mapping file for `{related.object_type}` with a rule `{requirement.rule}`"
                else:
                    what = f"{spec.connection} `{related.object_type}`"
                    message = f"no rule `{requirement.rule}` in the mapping of {what}"
                    hint = did_you_mean(requirement.rule, known) or f"expected {one_of(known)}"
                errors.append(MappingError(spec.source_path, line, format_path(path), message, hint))
    return errors
