"""Compile `when:` criteria from a mapping file into plain Python closures.

Criteria are compiled ONCE, when the mapping is loaded. Nothing an admin writes is ever
passed to eval/exec: every leaf is a closure built from a fixed set of operators, with
its literal already coerced to the field's type, so the hot path only reads the record
value, coerces it and compares.

Grammar (see docs/mappings.md for the admin-facing reference)::

    criterion := {all: [criterion, ...]} | {any: [criterion, ...]} | {not: criterion}
               | {<field>: {<operator>: literal, ..., ignore_case: bool}}
               | {<field>: literal}                   # shorthand for eq
    several keys in one mapping are ANDed together.

A value that cannot be coerced (e.g. amount "abc") makes that leaf false, never raises;
``explain`` shows a :class:`~connector.rules.coerce.CoercionFailure` as the actual value.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date
from decimal import Decimal
from functools import partial
from typing import Any

from connector.approvals.spec import APPROVAL_STATES, ConditionTrace, EvalContext, FieldSpec
from connector.errors import CrmApprovalsError
from connector.rules.coerce import (
    COERCERS,
    FIELD_TYPES,
    Coercer,
    CoercionError,
    Duration,
    is_blank,
    parse_duration,
    to_boolean,
    try_coerce,
)
from connector.rules.errors import (
    ErrorCollector,
    KeyPath,
    MappingLoadError,
    did_you_mean,
    format_path,
    one_of,
)

Predicate = Callable[[EvalContext], bool]
Test = Callable[[Any], bool]

COMBINATORS: tuple[str, ...] = ("all", "any", "not")
OPERATORS: tuple[str, ...] = (
    "eq",
    "ne",
    "gt",
    "gte",
    "lt",
    "lte",
    "between",
    "in",
    "not_in",
    "contains",
    "starts_with",
    "is_blank",
    "is_not_blank",
    "changed",
    "changed_from",
    "changed_to",
    "older_than",
    "newer_than",
    "within_last",
    "within_next",
    "is",  # issue 12: `company.approval: {is: approved}`; `eq` under a readable name
)
MODIFIERS: tuple[str, ...] = ("ignore_case",)

_ALL_TYPES = frozenset(FIELD_TYPES)
_ORDERED = frozenset({"number", "money", "date", "datetime"})
_DATES = frozenset({"date", "datetime"})
_TEXT = frozenset({"string", "user"})
_CASE_TYPES = frozenset({"string", "user", "list"})
_NUMERIC = frozenset({"number", "money"})

OPERATOR_TYPES: dict[str, frozenset[str]] = {
    **{op: _ALL_TYPES for op in ("eq", "ne", "in", "not_in", "is_blank", "is_not_blank")},
    **{op: _ALL_TYPES for op in ("changed", "changed_from", "changed_to")},
    **{op: _ORDERED for op in ("gt", "gte", "lt", "lte", "between")},
    **{op: _DATES for op in ("older_than", "newer_than", "within_last", "within_next")},
    "contains": _TEXT | {"list"},
    "starts_with": _TEXT,
    "is": _TEXT,
}
_CASE_OPERATORS = frozenset(
    {"eq", "ne", "in", "not_in", "contains", "starts_with", "changed_from", "changed_to"}
)
# Operators whose answer is "yes" for a blank value: a blank stage is "not Closed Lost".
_TRUE_WHEN_BLANK = frozenset({"ne", "not_in"})


class _LiteralError(CrmApprovalsError):
    """A literal in a criterion that cannot be read; becomes a MappingError."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)


# --- explain-able node tree ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Leaf:
    path: str
    field: str
    operator: str
    expected: Any
    fn: Predicate
    observe: Callable[[EvalContext], Any]
    negated: Predicate | None = None  # a fused `not` of this leaf, when one exists

    def trace(self, ctx: EvalContext, out: list[ConditionTrace]) -> bool:
        result = self.fn(ctx)
        expected = self.expected
        if isinstance(expected, RelativeWindow):
            expected = expected.at(ctx)
        out.append(ConditionTrace(self.path, self.field, self.operator, expected, self.observe(ctx), result))
        return result


@dataclass(frozen=True, slots=True)
class _Group:
    path: str
    operator: str  # all | any | not | always
    children: tuple[_Leaf | _Group, ...]
    fn: Predicate
    visible: bool = True  # implicit ANDs (several keys in one mapping) add no trace line

    def trace(self, ctx: EvalContext, out: list[ConditionTrace]) -> bool:
        slot = len(out)
        if self.visible:
            out.append(ConditionTrace(self.path, None, self.operator, None, None, False))
        # Evaluate every child (no short-circuit) so explain shows the whole picture.
        results = [child.trace(ctx, out) for child in self.children]
        if self.operator == "any":
            result = any(results)
        elif self.operator == "not":
            result = not results[0]
        else:
            result = all(results)
        if self.visible:
            out[slot] = ConditionTrace(self.path, None, self.operator, None, None, result)
        return result


_Node = _Leaf | _Group


class CompiledCriterion(partial):
    """A compiled condition tree; satisfies ``connector.approvals.spec.Criterion``.

    A ``functools.partial`` subclass so that ``criterion(ctx)`` is a C-level call straight
    into the root closure: a Python ``__call__`` would add a frame to every evaluation.
    """

    _root: _Node

    def __new__(cls, root: _Node) -> CompiledCriterion:
        self = super().__new__(cls, root.fn)
        self._root = root
        return self

    def explain(self, ctx: EvalContext) -> list[ConditionTrace]:
        """One trace per leaf, pre-order, with combinators (field=None) before their children."""
        out: list[ConditionTrace] = []
        self._root.trace(ctx, out)
        return out

    def fields_read(self) -> frozenset[str]:
        """The canonical fields the criterion looks at (smart re-approval's step inputs)."""
        found: set[str] = set()
        pending: list[_Node] = [self._root]
        while pending:
            node = pending.pop()
            if isinstance(node, _Leaf):
                found.add(node.field)
            else:
                pending.extend(node.children)
        return frozenset(found)

    def __repr__(self) -> str:
        return f"<CompiledCriterion {self._root.path}>"


def _always_true(ctx: EvalContext) -> bool:
    return True


def always(path: str = "when") -> CompiledCriterion:
    """The criterion of a rule without `when`: matches every record."""
    return CompiledCriterion(_Group(path, "always", (), _always_true))


# --- combinator closures -----------------------------------------------------------


def _all_of(fns: list[Predicate]) -> Predicate:
    # Unrolled for the common sizes: a Python loop costs more than the calls it makes.
    if len(fns) == 1:
        return fns[0]
    if len(fns) == 2:
        a, b = fns
        return lambda ctx: a(ctx) and b(ctx)
    if len(fns) == 3:
        a, b, c = fns
        return lambda ctx: a(ctx) and b(ctx) and c(ctx)
    items = tuple(fns)

    def all_of(ctx: EvalContext) -> bool:
        # A plain loop: all(<genexpr>) allocates a generator on every evaluation.
        for fn in items:  # noqa: SIM110
            if not fn(ctx):
                return False
        return True

    return all_of


def _any_of(fns: list[Predicate]) -> Predicate:
    if len(fns) == 1:
        return fns[0]
    if len(fns) == 2:
        a, b = fns
        return lambda ctx: a(ctx) or b(ctx)
    if len(fns) == 3:
        a, b, c = fns
        return lambda ctx: a(ctx) or b(ctx) or c(ctx)
    items = tuple(fns)

    def any_of(ctx: EvalContext) -> bool:
        for fn in items:  # noqa: SIM110
            if fn(ctx):
                return True
        return False

    return any_of


def _not(fn: Predicate) -> Predicate:
    return lambda ctx: not fn(ctx)


# --- leaf closures -------------------------------------------------------------------


def _value_leaf(name: str, coerce: Coercer, test: Test, when_blank: bool, bad: bool) -> Predicate:
    """read -> coerce -> test, fused into one closure; unreadable values give ``bad``
    (False, or True for a leaf compiled as the complement of a negated one)."""

    def leaf(ctx: EvalContext) -> bool:
        try:
            value = coerce(ctx.values.get(name))
        except CoercionError:
            return bad
        return when_blank if value is None else test(value)

    return leaf


def _text_leaf(name: str, coerce: Coercer, test: Test, when_blank: bool, bad: bool) -> Predicate:
    """Exact-case text: a str needs no coercion. The literal is never blank, so blank text
    fails eq/in and passes ne/not_in exactly as the slow path would."""

    def leaf_text(ctx: EvalContext) -> bool:
        raw = ctx.values.get(name)
        if raw.__class__ is str:
            return test(raw)
        try:
            value = coerce(raw)
        except CoercionError:
            return bad
        return when_blank if value is None else test(value)

    return leaf_text


def _number_leaf(
    name: str, coerce: Coercer, tests: tuple[Test, Test | None, Test | None], when_blank: bool, bad: bool
) -> Predicate:
    """number/money: ints and floats are compared against thresholds precomputed from the
    literal (:func:`_int_test`, :func:`_float_test`) instead of building a Decimal per call."""
    test, int_test, float_test = tests
    int_test = int_test or test
    float_test = float_test or _float_via_decimal(test)

    def leaf_number(ctx: EvalContext) -> bool:
        raw = ctx.values.get(name)
        cls = raw.__class__
        if cls is int:
            return int_test(raw)
        if cls is float:
            # f - f == 0.0 only for finite floats (inf and nan give nan).
            return float_test(raw) if raw - raw == 0.0 else bad  # type: ignore[operator]  # a float here
        try:
            value = coerce(raw)
        except CoercionError:
            return bad
        return when_blank if value is None else test(value)

    return leaf_number


def _float_via_decimal(test: Test) -> Test:
    return lambda f: test(Decimal(repr(f)))


def _blank_leaf(name: str, field_type: str, want_blank: bool) -> Predicate:
    def blank(ctx: EvalContext) -> bool:
        return _is_blank_value(ctx.values.get(name), field_type) is want_blank

    return blank


def _is_blank_value(raw: Any, field_type: str) -> bool:
    if is_blank(raw):
        return True
    # ";;" holds no list items; a bad value is present, hence not blank.
    return field_type == "list" and isinstance(raw, str) and try_coerce(raw, "list") is None


def _normaliser(coerce: Coercer) -> Callable[[Any], Any]:
    """Comparable form for change detection: "100000" and 100000 are the same amount."""

    def norm(raw: Any) -> Any:
        try:
            value = coerce(raw)
        except CoercionError:
            return raw
        return frozenset(value) if type(value) is tuple else value

    return norm


def _changed_leaf(name: str, coerce: Coercer) -> Predicate:
    norm = _normaliser(coerce)

    def changed(ctx: EvalContext) -> bool:
        if name in ctx.changed_fields:
            return True
        previous = ctx.previous
        if previous is None or name not in previous:
            return False
        return norm(previous[name]) != norm(ctx.values.get(name))

    return changed


def _changed_to_leaf(name: str, changed: Predicate, coerce: Coercer, test: Test) -> Predicate:
    def changed_to(ctx: EvalContext) -> bool:
        if not changed(ctx):
            return False
        try:
            value = coerce(ctx.values.get(name))
        except CoercionError:
            return False
        return value is not None and test(value)

    return changed_to


def _changed_from_leaf(name: str, changed: Predicate, coerce: Coercer, test: Test) -> Predicate:
    def changed_from(ctx: EvalContext) -> bool:
        previous = ctx.previous
        if previous is None or name not in previous or not changed(ctx):
            return False
        try:
            value = coerce(previous[name])
        except CoercionError:
            return False
        return value is not None and test(value)

    return changed_from


def _relative_leaf(name: str, coerce: Coercer, op: str, duration: Duration, is_datetime: bool) -> Predicate:
    compare = _RELATIVE[op]

    def relative(ctx: EvalContext) -> bool:
        try:
            value = coerce(ctx.values.get(name))
        except CoercionError:
            return False
        if value is None:
            return False
        return compare(value, _reference(ctx, is_datetime), duration)

    return relative


def _reference(ctx: EvalContext, is_datetime: bool) -> date:
    if not is_datetime:
        return ctx.today
    now = ctx.now
    # Naive "now" is UTC by convention; comparing naive with aware would raise.
    return now if now.tzinfo is not None else now.replace(tzinfo=UTC)


# value < today - N: strictly more than N ago. newer_than is its exact complement.
_RELATIVE: dict[str, Callable[[Any, Any, Duration], bool]] = {
    "older_than": lambda v, ref, d: v < d.before(ref),
    "newer_than": lambda v, ref, d: v >= d.before(ref),
    "within_last": lambda v, ref, d: d.before(ref) <= v <= ref,
    "within_next": lambda v, ref, d: ref <= v <= d.after(ref),
}
_RELATIVE_WORDS = {
    "older_than": "before {lo}",
    "newer_than": "on or after {lo}",
    "within_last": "between {lo} and {ref}",
    "within_next": "between {ref} and {hi}",
}


@dataclass(frozen=True)
class RelativeWindow:
    """The expected side of a relative-date leaf as written (e.g. 180d)."""

    operator: str
    duration: Duration
    is_datetime: bool

    def __str__(self) -> str:
        return str(self.duration)

    def at(self, ctx: EvalContext) -> RelativeExpectation:
        return RelativeExpectation(self.operator, self.duration, _reference(ctx, self.is_datetime))


@dataclass(frozen=True)
class RelativeExpectation:
    """A relative-date window resolved against today/now, as shown by explain."""

    operator: str
    duration: Duration
    reference: Any

    def __str__(self) -> str:
        lo, hi = self.duration.before(self.reference), self.duration.after(self.reference)
        words = _RELATIVE_WORDS[self.operator].format(lo=_iso(lo), hi=_iso(hi), ref=_iso(self.reference))
        return f"{self.duration} ({words})"


def _iso(value: Any) -> str:
    return value.isoformat() if isinstance(value, date) else str(value)


@dataclass(frozen=True)
class Change:
    """The actual side of a changed/changed_from/changed_to leaf in explain."""

    previous: Any
    current: Any
    reported: bool  # the CRM listed the field as changed

    def __str__(self) -> str:
        flag = " (reported changed)" if self.reported else ""
        return f"{self.previous!r} -> {self.current!r}{flag}"


_UNKNOWN = "<not seen before>"


# --- the compiler ---------------------------------------------------------------------


class _Compiler:
    """Walks one `when` tree; reports problems to the collector and keeps going."""

    def __init__(self, fields: Mapping[str, FieldSpec], errors: ErrorCollector) -> None:
        self.fields = fields
        self.errors = errors
        self._api_names = {f.api_name.lower(): f.name for f in fields.values()}

    def compile(self, spec: Any, path: KeyPath) -> _Node | None:
        if not isinstance(spec, dict):
            self._not_a_condition(spec, path)
            return None
        if not spec:
            self.errors.add(path, "empty condition", "write e.g. `amount: {gt: 100000}` or remove the key")
            return None
        nodes = [self._entry(key, value, path + (key,)) for key, value in spec.items()]
        if any(node is None for node in nodes):
            return None
        return self._group("all", nodes, path, visible=False)  # type: ignore[arg-type]

    def _not_a_condition(self, spec: Any, path: KeyPath) -> None:
        if isinstance(spec, list):
            self.errors.add(
                path, "expected a condition mapping, got a list", "wrap the list in `all:` or `any:`"
            )
        else:
            self.errors.add(path, f"expected a condition mapping, got {_describe_value(spec)}", _EXAMPLE)

    def _entry(self, key: str, value: Any, path: KeyPath) -> _Node | None:
        if key in ("all", "any"):
            return self._list_combinator(key, value, path)
        if key == "not":
            child = self.compile(value, path)
            if child is None:
                return None
            fused = child.negated if isinstance(child, _Leaf) else None
            return _Group(format_path(path), "not", (child,), fused or _not(child.fn))
        return self._field_condition(key, value, path)

    def _list_combinator(self, key: str, value: Any, path: KeyPath) -> _Node | None:
        if not isinstance(value, list) or not value:
            hint = f"write `{key}:` followed by a list of conditions, one per `- ` line"
            self.errors.add(path, f"`{key}` needs a non-empty list of conditions", hint)
            return None
        children = [self.compile(item, path + (i,)) for i, item in enumerate(value)]
        if any(child is None for child in children):
            return None
        return self._group(key, children, path)  # type: ignore[arg-type]

    @staticmethod
    def _group(op: str, children: list[_Node], path: KeyPath, visible: bool = True) -> _Node:
        if len(children) == 1 and not visible:
            return children[0]
        fns = [child.fn for child in children]
        fn = _any_of(fns) if op == "any" else _all_of(fns)
        return _Group(format_path(path), op, tuple(children), fn, visible)

    # -- field conditions --

    def _field_condition(self, name: str, spec: Any, path: KeyPath) -> _Node | None:
        field = self.fields.get(name)
        if field is None:
            self._unknown_field(name, path)
            return None
        if isinstance(spec, list):
            hint = "use `in: [...]` for one of several values (or `eq: [...]` for a list field)"
            self.errors.add(path, "a bare list is ambiguous here", hint)
            return None
        if spec is None:
            self.errors.add(
                path, f"no condition for `{name}`", "write e.g. `is_blank: true` or `eq: <value>`"
            )
            return None
        if not isinstance(spec, dict):
            return self._leaf(field, "eq", spec, path, False)
        return self._operators(field, spec, path)

    def _unknown_field(self, name: str, path: KeyPath) -> None:
        if name in OPERATORS:
            hint = f"operators go under a field, e.g. `amount: {{{name}: ...}}`"
        elif name.lower() in self._api_names:
            hint = (
                f"`{name}` is a CRM API name; rules use the canonical name `{self._api_names[name.lower()]}`"
            )
        else:
            hint = did_you_mean(name, [*self.fields, *COMBINATORS]) or "declare it under `fields:` first"
        self.errors.add(path, f"unknown field `{name}` (not declared under `fields:`)", hint)

    def _operators(self, field: FieldSpec, spec: dict[str, Any], path: KeyPath) -> _Node | None:
        ignore_case = self._ignore_case(field, spec, path)
        ops = {op: value for op, value in spec.items() if op not in MODIFIERS}
        if not ops:
            self.errors.add(path, f"no operator for `{field.name}`", f"expected one of {one_of(OPERATORS)}")
            return None
        leaves = [self._leaf(field, op, value, path + (op,), bool(ignore_case)) for op, value in ops.items()]
        if ignore_case is None or any(leaf is None for leaf in leaves):
            return None
        return self._group("all", leaves, path, visible=False)  # type: ignore[arg-type]

    def _ignore_case(self, field: FieldSpec, spec: dict[str, Any], path: KeyPath) -> bool | None:
        if "ignore_case" not in spec:
            return False
        value = spec["ignore_case"]
        if not isinstance(value, bool):
            self.errors.add(path + ("ignore_case",), "expected true or false")
            return None
        if value and field.type not in _CASE_TYPES:
            message = f"`ignore_case` only applies to text fields; `{field.name}` is {field.type}"
            self.errors.add(path + ("ignore_case",), message)
            return None
        return value

    def _leaf(
        self,
        field: FieldSpec,
        op: str,
        literal: Any,
        path: KeyPath,
        ignore_case: bool,
    ) -> _Node | None:
        if op not in OPERATORS:
            self._unknown_operator(op, path)
            return None
        if field.type not in OPERATOR_TYPES[op]:
            self._wrong_type(field, op, path)
            return None
        try:
            fn, expected, observe, negated = _build_leaf(
                field, op, literal, ignore_case and op in _CASE_OPERATORS
            )
        except _LiteralError as exc:
            self.errors.add(path, exc.message, exc.hint)
            return None
        return _Leaf(format_path(path), field.name, op, expected, fn, observe, negated)

    def _unknown_operator(self, op: str, path: KeyPath) -> None:
        if op in self.fields or op in COMBINATORS:
            hint = f"`{op}` is not an operator; conditions on another field go one level up"
        else:
            hint = did_you_mean(op, [*OPERATORS, *MODIFIERS]) or f"expected one of {one_of(OPERATORS)}"
        self.errors.add(path, f"unknown operator `{op}`", hint)

    def _wrong_type(self, field: FieldSpec, op: str, path: KeyPath) -> None:
        allowed = sorted(OPERATOR_TYPES[op])
        message = f"`{op}` does not work on {field.type} field `{field.name}`; it needs {one_of(allowed)}"
        hint = None
        if op in ("gt", "gte", "lt", "lte", "between") and field.type in _TEXT:
            hint = "declare the field with `type: number`, `money`, `date` or `datetime` if it holds one"
        elif op in ("contains", "starts_with"):
            hint = "use `eq` or `in` for this field"
        self.errors.add(path, message, hint)


_EXAMPLE = "write e.g. `amount: {gt: 100000}`, `all: [...]`, `any: [...]` or `not: {...}`"


def _describe_value(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, str):
        return f"text {value!r}"
    return f"{type(value).__name__} {value!r}"


# --- building one leaf ---------------------------------------------------------------

# (closure, expected for explain, actual for explain, closure of `not` this leaf or None)
LeafParts = tuple[Predicate, Any, Callable[[EvalContext], Any], Predicate | None]


def _build_leaf(field: FieldSpec, op: str, literal: Any, ignore_case: bool) -> LeafParts:
    if field.is_virtual and literal not in APPROVAL_STATES and op in ("is", "eq", "ne"):
        raise _LiteralError(
            f"`{field.name}` is an approval state; {literal!r} is not one",
            f"expected {one_of(APPROVAL_STATES)}",
        )
    op = "eq" if op == "is" else op
    coerce = _folding(COERCERS[field.type]) if ignore_case else COERCERS[field.type]
    name = field.name
    if op in ("is_blank", "is_not_blank"):
        want = _flag(literal, op) is (op == "is_blank")
        return _blank_leaf(name, field.type, want), want, _observe_raw(name), None
    if op in ("changed", "changed_from", "changed_to"):
        return _build_changed(field, op, literal, coerce, ignore_case)
    if op in _RELATIVE:
        return _build_relative(field, op, literal, coerce)
    fn, expected = _comparison(field, op, literal, ignore_case, coerce, negate=False)
    negated = (
        _comparison(field, op, literal, ignore_case, coerce, negate=True)[0] if op in _COMPLEMENT else None
    )
    return fn, expected, _observe(field.name, field.type), negated


# `not: {x: {eq: ...}}` compiles to one `ne` closure (with blank and unreadable results
# flipped to match `not`) instead of a `not` frame around an `eq` frame.
_COMPLEMENT = {
    "eq": "ne",
    "ne": "eq",
    "gt": "lte",
    "lte": "gt",
    "gte": "lt",
    "lt": "gte",
    "in": "not_in",
    "not_in": "in",
}


def _comparison(
    field: FieldSpec, op: str, literal: Any, ignore_case: bool, coerce: Coercer, negate: bool
) -> tuple[Predicate, Any]:
    use = _COMPLEMENT[op] if negate else op
    test, expected = _value_test(field, use, literal, ignore_case, shown=op)
    when_blank = (op in _TRUE_WHEN_BLANK) is not negate
    if field.type in _NUMERIC:
        tests = (test, _int_test(use, expected), _float_test(use, expected))
        return _number_leaf(field.name, coerce, tests, when_blank, negate), expected
    if field.type == "string" and not ignore_case:
        return _text_leaf(field.name, coerce, test, when_blank, negate), expected
    return _value_leaf(field.name, coerce, test, when_blank, negate), expected


def _folding(coerce: Coercer) -> Coercer:
    def folded(raw: Any) -> Any:
        value = coerce(raw)
        if value is None:
            return None
        if type(value) is tuple:
            return tuple(item.casefold() for item in value)
        return value.casefold()

    return folded


def _flag(literal: Any, op: str) -> bool:
    try:
        value = to_boolean(literal)
    except CoercionError:
        value = None
    if value is None:
        raise _LiteralError(f"`{op}` expects true or false, got {_describe_value(literal)}")
    return value


def _observe(name: str, field_type: str) -> Callable[[EvalContext], Any]:
    return lambda ctx: try_coerce(ctx.values.get(name), field_type)


def _observe_raw(name: str) -> Callable[[EvalContext], Any]:
    return lambda ctx: ctx.values.get(name)


def _build_changed(field: FieldSpec, op: str, literal: Any, coerce: Coercer, ignore_case: bool) -> LeafParts:
    name = field.name
    # "Changed" itself is exact: a case-only edit is still an edit.
    changed = _changed_leaf(name, COERCERS[field.type])

    def observe(ctx: EvalContext) -> Change:
        previous = ctx.previous.get(name, _UNKNOWN) if ctx.previous is not None else _UNKNOWN
        return Change(previous, ctx.values.get(name), name in ctx.changed_fields)

    if op == "changed":
        want = _flag(literal, op)
        return (changed if want else _not(changed)), want, observe, None
    # A list literal on a single-value field means "any of these".
    compare = "in" if isinstance(literal, list) and field.type != "list" else "eq"
    test, expected = _value_test(field, compare, literal, ignore_case, shown=op)
    build = _changed_to_leaf if op == "changed_to" else _changed_from_leaf
    return build(name, changed, coerce, test), expected, observe, None


def _build_relative(field: FieldSpec, op: str, literal: Any, coerce: Coercer) -> LeafParts:
    try:
        duration = parse_duration(literal)
    except CoercionError as exc:
        hint = "write a number and a unit: d (days), w (weeks), m (months) or y (years), e.g. 180d"
        raise _LiteralError(f"`{op}`: {exc}, got {_describe_value(literal)}", hint) from None
    is_datetime = field.type == "datetime"
    fn = _relative_leaf(field.name, coerce, op, duration, is_datetime)
    # explain resolves the window against the context: "180d (before 2023-11-26)".
    expected = RelativeWindow(op, duration, is_datetime)
    return fn, expected, _observe(field.name, field.type), None


# --- literal tests ---------------------------------------------------------------------


def _value_test(
    field: FieldSpec, op: str, literal: Any, ignore_case: bool, shown: str | None = None
) -> tuple[Test, Any]:
    """The comparison for one operator with its literal coerced once, at compile time."""
    shown = shown or op
    if literal is None:
        raise _LiteralError(f"`{shown}` needs a value", "to test for an empty field use `is_blank: true`")
    if field.type == "list":
        return _list_test(field, op, literal, ignore_case, shown)
    if op in ("in", "not_in"):
        members = frozenset(_literal_list(field, literal, ignore_case, shown))
        test: Test = members.__contains__ if op == "in" else (lambda v: v not in members)
        return test, sorted(members, key=str)
    if op == "between":
        low, high = _bounds(field, literal)
        return (lambda v: low <= v <= high), [low, high]
    if isinstance(literal, list | dict):
        hint = "use `in: [...]` for one of several values" if op in ("eq", "ne") else None
        raise _LiteralError(f"`{shown}` expects a single value, got a {type(literal).__name__}", hint)
    value = _literal(field, literal, ignore_case, shown)
    return _scalar_test(op, value), value


def _bounds(field: FieldSpec, literal: Any) -> tuple[Any, Any]:
    if not isinstance(literal, list) or len(literal) != 2:
        raise _LiteralError(
            "`between` expects two values: [low, high]", "write e.g. `between: [10000, 50000]`"
        )
    low, high = (_literal(field, item, False, "between") for item in literal)
    if low > high:
        raise _LiteralError(f"`between`: low {low} is greater than high {high}", f"write [{high}, {low}]")
    return low, high


def _scalar_test(op: str, value: Any) -> Test:
    # partial(operator.lt, value)(v) is value < v, i.e. v > value: C-level calls, no Python frame.
    if op == "eq":
        return partial(operator.eq, value)
    if op == "ne":
        return partial(operator.ne, value)
    if op == "gt":
        return partial(operator.lt, value)
    if op == "gte":
        return partial(operator.le, value)
    if op == "lt":
        return partial(operator.gt, value)
    if op == "lte":
        return partial(operator.ge, value)
    if op == "contains":
        return lambda v: value in v
    if op == "starts_with":
        return operator.methodcaller("startswith", value)
    raise AssertionError(op)  # pragma: no cover - operator table and tests are in sync


def _int_test(op: str, expected: Any) -> Test | None:
    """Compare an int with a Decimal literal through int thresholds (int-int is ~2x faster):
    for integers, v > L is v > floor(L), v >= L is v >= ceil(L), and so on."""
    if op == "between":
        low, high = math.ceil(expected[0]), math.floor(expected[1])
        return lambda v: low <= v <= high
    if op in ("in", "not_in"):
        ints = frozenset(int(x) for x in expected if x == x.to_integral_value())
        return ints.__contains__ if op == "in" else (lambda v: v not in ints)
    if op in ("eq", "ne"):
        if expected != expected.to_integral_value():  # no int equals 2.5
            return _constant(op == "ne")
        return partial(operator.eq if op == "eq" else operator.ne, int(expected))
    bound = {"gt": math.floor, "gte": math.ceil, "lt": math.ceil, "lte": math.floor}[op](expected)
    return partial(_FLIPPED[op], bound)


# partial(operator.lt, bound)(v) is bound < v, i.e. v > bound.
_FLIPPED = {"gt": operator.lt, "gte": operator.le, "lt": operator.gt, "lte": operator.ge}


def _float_test(op: str, expected: Any) -> Test | None:
    """Compare a finite float f exactly as Decimal(repr(f)) would, without building it.

    D(f) = Decimal(repr(f)) is strictly increasing in f (repr round-trips and rounding is
    monotone), and for g = float(L) every f != g compares with g exactly as D(f) compares
    with L. Only f == g needs D(g) vs L, which is known now. None = no shortcut (e.g. L is
    beyond float range); the caller then converts through Decimal.
    """
    if op == "between":
        low, high = _float_test("gte", expected[0]), _float_test("lte", expected[1])
        if low is None or high is None:
            return None
        return lambda f: low(f) and high(f)
    if op in ("in", "not_in"):
        floats = frozenset(g for g in map(_same_float, expected) if g is not None)
        return floats.__contains__ if op == "in" else (lambda f: f not in floats)
    g = float(expected)
    if not math.isfinite(g):
        return None
    g_value = Decimal(repr(g))
    if op in ("eq", "ne"):
        if g_value != expected:  # no float is exactly L: eq never holds, ne always does
            return _constant(op == "ne")
        return partial(operator.eq if op == "eq" else operator.ne, g)
    if op in ("gt", "gte"):
        at_g = g_value > expected if op == "gt" else g_value >= expected
        return partial(operator.le if at_g else operator.lt, g)  # f >= g  |  f > g
    at_g = g_value < expected if op == "lt" else g_value <= expected
    return partial(operator.ge if at_g else operator.gt, g)  # f <= g  |  f < g


def _same_float(literal: Decimal) -> float | None:
    """The float whose decimal value is exactly ``literal``, if there is one."""
    g = float(literal)
    return g if math.isfinite(g) and Decimal(repr(g)) == literal else None


def _constant(result: bool) -> Test:
    return lambda f: result


def _list_test(field: FieldSpec, op: str, literal: Any, ignore_case: bool, shown: str) -> tuple[Test, Any]:
    if op in ("in", "not_in") and not isinstance(literal, list):
        raise _LiteralError(f"`{shown}` expects a list of values", f"write `{shown}: [{literal}]`")
    items = frozenset(
        _literal_list(field, literal if isinstance(literal, list) else [literal], ignore_case, shown)
    )
    expected = sorted(items)
    if op == "eq":
        return (lambda v: frozenset(v) == items), expected
    if op == "ne":
        return (lambda v: frozenset(v) != items), expected
    if op == "in":
        return (lambda v: not items.isdisjoint(v)), expected
    if op == "not_in":
        return items.isdisjoint, expected
    return items.issubset, expected  # contains: every listed value is present


def _literal_list(field: FieldSpec, literal: Any, ignore_case: bool, shown: str) -> list[Any]:
    if not isinstance(literal, list) or not literal:
        raise _LiteralError(f"`{shown}` expects a non-empty list of values", f"write `{shown}: [a, b]`")
    if field.type == "list":
        return [_literal(field, item, ignore_case, shown, item_type="string") for item in literal]
    return [_literal(field, item, ignore_case, shown) for item in literal]


def _literal(
    field: FieldSpec, literal: Any, ignore_case: bool, shown: str, item_type: str | None = None
) -> Any:
    field_type = item_type or field.type
    if isinstance(literal, list | dict):
        raise _LiteralError(f"`{shown}` expects single values here, got a {type(literal).__name__}")
    try:
        value = COERCERS[field_type](literal)
    except CoercionError as exc:
        raise _LiteralError(
            f"{literal!r} is not a valid {field_type} for `{field.name}`: {exc}",
            _literal_hint(field_type, literal),
        ) from None
    if value is None:
        raise _LiteralError(f"`{shown}` needs a value", "to test for an empty field use `is_blank: true`")
    return value.casefold() if ignore_case and isinstance(value, str) else value


def _literal_hint(field_type: str, literal: Any) -> str | None:
    if field_type in _DATES and isinstance(literal, str) and literal.strip().lower() in ("today", "now"):
        return "for dates relative to today use older_than, newer_than, within_last or within_next"
    if field_type in _DATES:
        return "write dates as YYYY-MM-DD"
    return None


# --- public entry points ----------------------------------------------------------------


def compile_criterion(
    spec: Any, fields: Mapping[str, FieldSpec], *, path: KeyPath, errors: ErrorCollector
) -> CompiledCriterion | None:
    """Compile one `when` tree; problems go to ``errors`` and None is returned."""
    before = len(errors.errors)
    root = _Compiler(fields, errors).compile(spec, path)
    if root is None or len(errors.errors) > before:
        return None
    return CompiledCriterion(root)


def compile_when(
    spec: Any, fields: Mapping[str, FieldSpec], *, source: str = "<criteria>"
) -> CompiledCriterion:
    """Compile criteria written as Python data (tests, benchmarks); raises MappingLoadError."""
    errors = ErrorCollector(source)
    criterion = compile_criterion(spec, fields, path=("when",), errors=errors)
    if criterion is None:
        raise MappingLoadError(errors.errors)
    return criterion
