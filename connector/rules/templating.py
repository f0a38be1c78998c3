"""Action value templates such as ``"{{ today + days(180) }}"``.

Templates are written by CRM admins, so they run ONLY inside jinja2's
``ImmutableSandboxedEnvironment`` with ``StrictUndefined``: private attributes
(``''.__class__``) raise SecurityError, containers cannot be mutated, and a misspelt
variable is an error instead of an empty string. Rendering is bounded in time, output
size, loop steps and number sizes (``connector.rules.template_limits``), and nothing of a
template runs while it is compiled. On top of the sandbox, templates are checked when the
mapping is loaded (syntax, unknown filters, unknown variables, unknown ``record.<field>``
names, private attribute access, and one trial render with blank values that must stay
within the limits) so mistakes surface in ``crm-approvals validate`` and not in the
middle of an approval.

Result types: a template that is exactly one ``{{ expression }}`` keeps the expression's
native type (a Decimal stays a Decimal, ``None`` stays None so it clears the field), except
that dates and datetimes become ISO 8601 text (``YYYY-MM-DD``) — the form every CRM accepts.
Anything else (text around the expression, several expressions, ``{% ... %}`` blocks)
renders to a string. Values that are not templates are returned as written (literals).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from jinja2 import StrictUndefined, Template, TemplateSyntaxError, Undefined, meta, nodes
from jinja2.environment import TemplateExpression
from jinja2.exceptions import TemplateError

from connector.errors import FatalError
from connector.rules.errors import did_you_mean, one_of
from connector.rules.template_limits import (
    BLOCKED_METHODS,
    MAX_CHARS,
    BoundedSandbox,
    BoundedTree,
    TemplateLimitError,
    checked,
    render_budget,
)

# Variables available at render time, as connector.approvals.actions.template_variables
# builds them, with the attributes each one has (None = free-form: `record` attributes
# are checked against the mapping's canonical fields instead).
TEMPLATE_VARIABLES: dict[str, frozenset[str] | None] = {
    "today": frozenset(),  # date
    "now": frozenset(),  # datetime (UTC)
    "record": None,  # canonical field -> value
    "approver": frozenset(),  # user id (text) of whoever triggered the event, or None
    "comment": frozenset(),  # comment given with the action, or None
    "request": frozenset(
        {
            "id",
            "rule",
            "status",
            "step",
            "step_index",
            "last_step",
            "submitter",
            "record_ref",
            "submitted_at",
            "approved_at",
            "expires_at",
        }
    ),
    "rule": frozenset({"name", "steps", "expires_after"}),
    # issue 12, in the messages of service steps only: a check's answer fields, a duplicate found
    "answer": None,
    "duplicate": frozenset({"value", "other", "other_name", "field"}),
    # where the request waits (connector.approvals.actions documents each one)
    "progress": frozenset(
        {"step", "step_number", "step_count", "since", "waiting_for", "waiting_for_ids"}
        | {"last_comment", "url"}
    ),
}
_VIEW_VARIABLES = ("record", "request", "rule", "progress")


class TemplateCompileError(FatalError):
    """A template problem found at load time: a list of (message, hint) pairs."""

    code = "template_compile_error"

    def __init__(self, problems: list[tuple[str, str | None]]) -> None:
        self.problems = problems
        super().__init__("; ".join(message for message, _ in problems))


class TemplateRenderError(FatalError):
    """A template failed while rendering (missing variable, blocked attribute, bad maths)."""

    code = "template_render_error"

    def __init__(self, message: str, *, source: str, location: str = "") -> None:
        self.source = source
        self.location = location
        where = f"{location}: " if location else ""
        super().__init__(f"{where}template {source!r} failed: {message}")


def days(n: Any) -> timedelta:
    """``days(180)`` and ``180|days``: a length of time to add to ``today`` or ``now``."""
    if isinstance(n, bool) or not isinstance(n, int | Decimal | float | str):
        raise TypeError(f"days() needs a number, got {type(n).__name__}")
    number = Decimal(str(n).strip())
    return (
        timedelta(days=int(number)) if number == number.to_integral_value() else timedelta(days=float(number))
    )


def _finalize(value: Any) -> Any:
    # "Rejected: {{ comment }}" with no comment should not write "Rejected: None".
    return "" if value is None else value


def _make_environment() -> BoundedSandbox:
    env = BoundedSandbox(
        undefined=StrictUndefined,
        autoescape=False,  # values go into CRM fields, not HTML
        finalize=_finalize,
        keep_trailing_newline=False,
    )
    env.globals["days"] = days
    env.add_filter("days", days)
    return env


ENVIRONMENT = _make_environment()


def _compile(ast: nodes.Template) -> Template:
    """Compile a parsed template with its loops, concatenations, literals and output checked."""
    bounded = BoundedTree().visit(ast)
    bounded.set_environment(ENVIRONMENT)
    return ENVIRONMENT.from_string(bounded)


def _compile_expression(expression: nodes.Expr) -> TemplateExpression:
    """Like Environment.compile_expression, from an already parsed expression."""
    assign = nodes.Assign(nodes.Name("result", "store"), expression, lineno=1)
    return TemplateExpression(_compile(nodes.Template([assign], lineno=1)), undefined_to_none=False)


class _AttrView:
    """Read-only view so ``record.amount`` and ``record['amount']`` both work.

    A plain dict would let ``record.items`` return the dict method instead of a field
    called ``items``; this view has no public methods to collide with.
    """

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, Any]) -> None:
        self._values = values

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __contains__(self, name: object) -> bool:
        return name in self._values

    def __repr__(self) -> str:
        return repr(dict(self._values))


class LiteralValue:
    """A value written as-is in the mapping file (no template)."""

    __slots__ = ("value",)
    reads: frozenset[str] = frozenset()  # the variables it reads: none

    def __init__(self, value: Any) -> None:
        self.value = value

    def __call__(self, variables: Mapping[str, Any]) -> Any:
        # Hand out a copy so a caller mutating the result cannot change the mapping.
        return list(self.value) if isinstance(self.value, list) else self.value

    def __repr__(self) -> str:
        return f"LiteralValue({self.value!r})"


class TemplateValue:
    """A compiled template; call it with the render variables."""

    __slots__ = ("source", "location", "reads", "_template", "_expression")

    def __init__(self, source: str, location: str = "") -> None:
        self.source = source
        self.location = location
        ast = ENVIRONMENT.parse(source)
        # the variables it reads (not the environment's globals such as days): a caller may
        # build only these (connector.approvals.actions.variables_read)
        self.reads = frozenset(meta.find_undeclared_variables(ast) - set(ENVIRONMENT.globals))
        self._template = _compile(ast)
        inner = _single_expression(source)
        self._expression = _compile_expression(inner) if inner is not None else None

    def __call__(self, variables: Mapping[str, Any]) -> Any:
        context = render_context(variables)
        try:
            with render_budget():
                if self._expression is None:
                    return _render_text(self._template, context)
                return _native(checked(self._expression(**context)))
        except TemplateLimitError as exc:
            message = f"over a template limit (docs/mappings.md, Limits): {exc}"
            raise TemplateRenderError(message, source=self.source, location=self.location) from exc
        except TemplateError as exc:
            raise TemplateRenderError(_describe(exc), source=self.source, location=self.location) from exc
        except Exception as exc:  # admin-written maths such as today + 'x'
            message = f"{type(exc).__name__}: {exc}"
            raise TemplateRenderError(message, source=self.source, location=self.location) from exc

    def __repr__(self) -> str:
        return f"TemplateValue({self.source!r})"


def _render_text(template: Template, context: Mapping[str, Any]) -> str:
    """The template's text, piece by piece, stopping as soon as it grows over the limit."""
    pieces: list[str] = []
    length = 0
    for piece in template.generate(context):
        length += len(piece)
        if length > MAX_CHARS:
            raise TemplateLimitError(f"the result is longer than {MAX_CHARS} characters")
        pieces.append(piece)
    return "".join(pieces)


def render_context(variables: Mapping[str, Any]) -> dict[str, Any]:
    """The variables a template sees; today/now default to the current UTC date/time."""
    context = dict(variables)
    now = context.get("now") or datetime.now(UTC)
    context["now"] = now
    context.setdefault("today", now.date())
    for name in _VIEW_VARIABLES:
        value = context.get(name)
        if isinstance(value, Mapping):
            context[name] = _AttrView(value)
    return context


def _native(value: Any) -> Any:
    if isinstance(value, Undefined):
        str(value)  # StrictUndefined raises UndefinedError / SecurityError here
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    return value


def _describe(exc: TemplateError) -> str:
    if type(exc).__name__ == "SecurityError":
        return f"blocked by the template sandbox: {exc}"
    return str(exc)


def is_template(value: Any) -> bool:
    """Only text containing ``{{`` or ``{%`` is a template; everything else is a literal."""
    return isinstance(value, str) and ("{{" in value or "{%" in value)


def _single_expression(source: str) -> nodes.Expr | None:
    """The expression when the template is exactly one ``{{ ... }}`` and nothing else.

    Surrounding whitespace does not count: YAML block scalars (``|``) add a newline.
    """
    text = source.strip()
    body = ENVIRONMENT.parse(text).body
    if len(body) != 1 or not isinstance(body[0], nodes.Output):
        return None
    parts = body[0].nodes
    if len(parts) != 1 or isinstance(parts[0], nodes.TemplateData):
        return None
    if not (text.startswith("{{") and text.endswith("}}")):
        return None
    return parts[0]


# --- load-time checks ---------------------------------------------------------------


def compile_value(value: Any, *, record_fields: Collection[str] | None = None, location: str = "") -> Any:
    """Literal -> LiteralValue; template -> checked TemplateValue (raises TemplateCompileError)."""
    if not is_template(value):
        return LiteralValue(value)
    problems = check_template(value, record_fields=record_fields)
    if problems:
        raise TemplateCompileError(problems)
    try:
        return TemplateValue(value, location)
    except TemplateError as exc:  # pragma: no cover - check_template compiles the same source
        raise TemplateCompileError([(f"template error: {exc}", None)]) from exc


def check_template(
    source: str, *, record_fields: Collection[str] | None = None
) -> list[tuple[str, str | None]]:
    """Every problem we can find without rendering. Empty list = template is fine."""
    try:
        ast = ENVIRONMENT.parse(source)
        _compile(ENVIRONMENT.parse(source))  # compiling also rejects unknown filters and tests
    except TemplateSyntaxError as exc:
        where = f" (template line {exc.lineno})" if exc.lineno and exc.lineno > 1 else ""
        hint = "templates look like {{ today + days(180) }}; quote the whole value in YAML"
        return [(f"template syntax error{where}: {exc.message}", hint)]
    problems = _unknown_variables(ast)
    problems += _attribute_problems(ast, record_fields)
    return problems or _trial_render(source, record_fields)


def _trial_render(source: str, record_fields: Collection[str] | None) -> list[tuple[str, str | None]]:
    """Render once with blank values: what goes over a limit then always will.

    Other failures are left to the real render (blank values are not real ones); limits
    that depend on real values are enforced when the action renders.
    """
    sample: dict[str, Any] = {
        "record": {name: None for name in record_fields or ()},
        "approver": "user",
        "comment": "comment",
        "request": dict.fromkeys(TEMPLATE_VARIABLES["request"] or ()),
        "rule": {"name": "rule", "steps": (), "expires_after": None},
    }
    try:
        TemplateValue(source)(sample)
    except TemplateRenderError as exc:
        if isinstance(exc.__cause__, TemplateLimitError):
            hint = "see the limits in docs/mappings.md (Templates, Limits)"
            return [(f"template goes over a limit: {exc.__cause__}", hint)]
    return []


def _unknown_variables(ast: nodes.Template) -> list[tuple[str, str | None]]:
    known = set(TEMPLATE_VARIABLES) | set(ENVIRONMENT.globals)
    problems: list[tuple[str, str | None]] = []
    for name in sorted(meta.find_undeclared_variables(ast) - known):
        expected = f"available variables are {one_of(sorted(TEMPLATE_VARIABLES))} and days(n)"
        problems.append((f"unknown template variable `{name}`", did_you_mean(name, known) or expected))
    return problems


def _attribute_problems(
    ast: nodes.Template, record_fields: Collection[str] | None
) -> list[tuple[str, str | None]]:
    problems: list[tuple[str, str | None]] = []
    for owner, attr in _attribute_uses(ast):
        if attr.startswith("_"):
            problems.append((f"templates may not use private attributes such as `{attr}`", None))
            continue
        if attr in BLOCKED_METHODS:
            hint = "use the `format` filter: {{ '%.2f'|format(record.amount) }}" if "format" in attr else None
            problems.append((f"templates may not call `{attr}`: it has no size limit", hint))
            continue
        allowed = record_fields if owner == "record" else TEMPLATE_VARIABLES.get(owner or "")
        if owner is None or allowed is None or attr in allowed:
            continue
        message = f"`{owner}` has no attribute `{attr}`"
        hint = did_you_mean(attr, allowed) or (
            f"expected {one_of(sorted(allowed))}"
            if allowed
            else f"`{owner}` is a plain value; use `{{{{ {owner} }}}}`"
        )
        problems.append((message, hint))
    return problems


def _attribute_uses(ast: nodes.Template) -> list[tuple[str | None, str]]:
    """(variable, attribute) for every ``x.attr`` and ``x['attr']`` in the template."""
    uses: list[tuple[str | None, str]] = []
    for node in ast.find_all((nodes.Getattr, nodes.Getitem)):
        assert isinstance(node, nodes.Getattr | nodes.Getitem)
        owner = node.node.name if isinstance(node.node, nodes.Name) else None
        if isinstance(node, nodes.Getattr):
            uses.append((owner, node.attr))
        elif isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
            uses.append((owner, node.arg.value))
    return uses
