"""Bounds on what an admin's template may cost: time, size, loops, numbers.

Templates come from mapping files, and one that runs for seconds or builds gigabytes
would stall a vote or the worker. jinja2's sandbox blocks private attributes but bounds
nothing, and Jinja evaluates constant expressions while *compiling* (`{{ 10**(10**10) }}`
hangs the loader). So, on top of the immutable sandbox:

* every `**`, `*`, `%` and `+` goes through `call_binop`, which checks the operands first
  (an intercepted operator is never folded at compile time either);
* every filter is wrapped: checked before it runs where one call can blow up (`center`,
  `join`, `replace`, `format`, ...), and marked as needing the render context, which
  keeps Jinja from running it at compile time;
* the template's tree is rewritten before compiling: each `{% for %}` iterates through a
  counter, each `~` concatenation, list/tuple/dict literal and output piece is checked;
* every call, attribute and item access, loop step and operator checks the time budget.

Each check raises `TemplateLimitError`. Everything runs at render time, within a budget
(`render_budget`); outside one (compile time, nothing of the template runs) only the size
checks apply. Limits are documented in docs/mappings.md ("Limits").
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from decimal import Decimal
from itertools import chain, islice
from typing import Any, cast

from jinja2 import nodes, pass_context
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from connector.errors import FatalError

MAX_CHARS = 131_072  # longest text or list a template may build (Salesforce's long text area)
MAX_PRODUCED_CHARS = 4 * MAX_CHARS  # all output of one render, buffers of {% set %} blocks included
MAX_RANGE = 1_000  # items of one range()
MAX_LOOP_ITERATIONS = 10_000  # loop steps of one render, all loops together
MAX_INT_BITS = 4_096  # integers up to about 10**1233
MAX_DECIMAL_EXPONENT = 1_000  # decimals up to 10**1000
MAX_NESTING = 32  # lists in lists
RENDER_SECONDS = 1.0  # time budget of one render

# Methods that format or pad without a bound we could check cheaply; filters do the same job.
BLOCKED_METHODS = frozenset({"format", "format_map", "translate", "maketrans", "to_bytes", "expandtabs"})
_PRINTF = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?")


class TemplateLimitError(FatalError):
    """A template went over one of the limits above."""


@dataclass
class _Budget:
    deadline: float
    iterations: int = 0
    produced: int = 0


_BUDGET: ContextVar[_Budget | None] = ContextVar("template_budget", default=None)


@contextmanager
def render_budget(seconds: float = RENDER_SECONDS) -> Iterator[None]:
    """The time, loop and output budget of one render."""
    token = _BUDGET.set(_Budget(time.monotonic() + seconds))
    try:
        yield
    finally:
        _BUDGET.reset(token)


def tick(iterations: int = 0) -> None:
    """Charge the running render: fails once its time or loop budget is spent."""
    budget = _BUDGET.get()
    if budget is None:
        return
    if time.monotonic() > budget.deadline:
        raise TemplateLimitError(f"rendering took longer than its {RENDER_SECONDS} s budget")
    if iterations:
        budget.iterations += iterations
        if budget.iterations > MAX_LOOP_ITERATIONS:
            raise TemplateLimitError(f"loops ran more than {MAX_LOOP_ITERATIONS} steps in all")


def checked(value: Any) -> Any:
    """The value, if it is within the size limits (see `_weight`)."""
    if type(value) is str and len(value) <= MAX_CHARS:
        return value  # the common case, fast
    _weight(value, 0, {})
    return value


def _weight(item: Any, depth: int, seen: dict[int, int]) -> int:
    """About the characters `str(item)` would have, counting a list that appears twice twice
    (`[x, x]` nested in a loop doubles each time); each list is weighed once (`seen`)."""
    if isinstance(item, str):
        weight = len(item)
    elif isinstance(item, bool) or item is None:
        weight = 1
    elif isinstance(item, int):
        if item.bit_length() > MAX_INT_BITS:
            raise TemplateLimitError(f"a number above 2**{MAX_INT_BITS}")
        weight = item.bit_length() // 3 + 1
    elif isinstance(item, Decimal):
        if item.is_finite() and item.adjusted() > MAX_DECIMAL_EXPONENT:
            raise TemplateLimitError(f"a number above 10**{MAX_DECIMAL_EXPONENT}")
        weight = 1
    elif isinstance(item, list | tuple | set | frozenset | dict):
        if id(item) in seen:
            return seen[id(item)]
        if depth >= MAX_NESTING:
            raise TemplateLimitError(f"lists nested more than {MAX_NESTING} deep")
        tick()
        weight = len(item)
        # keys and values, not items(): a temporary pair's id could be reused and hit `seen`
        for child in chain(item.keys(), item.values()) if isinstance(item, dict) else item:
            weight += _weight(child, depth + 1, seen)
            if weight > MAX_CHARS:
                break
        seen[id(item)] = weight
    else:
        weight = 1
    if weight > MAX_CHARS:
        raise TemplateLimitError(f"a value longer than {MAX_CHARS} characters or items")
    return weight


def _length(value: Any) -> int:
    return len(value) if isinstance(value, str | list | tuple | dict | set | frozenset) else 1


def _width(value: Any, what: str) -> None:
    if isinstance(value, int) and value > MAX_CHARS:
        raise TemplateLimitError(f"{what} {value} is over {MAX_CHARS}")


def check_printf(text: Any) -> None:
    """`'%0999999d' % 1` and `'%*d' % (n, 1)` pad without bound: refuse big or `*` widths."""
    if not isinstance(text, str):
        return
    for match in _PRINTF.finditer(text):
        for size in match.groups():
            if size == "*":
                raise TemplateLimitError("`*` widths in % formatting are not allowed; write the number")
            _width(int(size) if size else 0, "a % format width")


def check_replace(text: Any, old: Any, new: Any, count: Any = None) -> None:
    if not (isinstance(text, str) and isinstance(old, str) and isinstance(new, str)):
        return
    found = len(text) + 1 if old == "" else text.count(old)
    if isinstance(count, int) and count >= 0:
        found = min(found, count)
    if len(text) + found * max(0, len(new) - len(old)) > MAX_CHARS:
        raise TemplateLimitError(f"replace() would build more than {MAX_CHARS} characters")


def sized(items: Any) -> Any:
    """An iterator (`range(9)|map(...)`) as a list, so what it would build can be checked."""
    if isinstance(items, Iterator):
        items = list(islice(items, MAX_CHARS + 1))
        if len(items) > MAX_CHARS:
            raise TemplateLimitError(f"more than {MAX_CHARS} items")
    return items


def check_join(items: Any, separator: Any = "") -> None:
    sized_items = isinstance(items, list | tuple | str | dict | set | frozenset | range)
    if isinstance(separator, str) and sized_items and len(separator) * max(len(items) - 1, 0) > MAX_CHARS:
        raise TemplateLimitError(f"join() would build more than {MAX_CHARS} characters")


def check_power(base: Any, exponent: Any) -> None:
    integers = isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1
    if integers and (abs(base).bit_length() - 1) * exponent > MAX_INT_BITS:  # the result checks the rest
        raise TemplateLimitError(f"{base} ** {exponent} is above 2**{MAX_INT_BITS}")


def check_repeat(left: Any, right: Any) -> None:
    for sequence, count in ((left, right), (right, left)):
        repeats = isinstance(count, int) and not isinstance(sequence, int | float | Decimal)
        if repeats and count > 0 and _length(sequence) * count > MAX_CHARS:
            raise TemplateLimitError(f"repeating would build more than {MAX_CHARS} characters or items")
    integers = isinstance(left, int) and isinstance(right, int)
    if integers and left.bit_length() + right.bit_length() > MAX_INT_BITS + 1:
        raise TemplateLimitError(f"a product above 2**{MAX_INT_BITS}")


def bounded_range(*args: int) -> range:
    tick()
    numbers = range(*args)
    try:
        count = len(numbers)
    except OverflowError:  # more items than a machine word counts
        count = MAX_RANGE + 1
    if count > MAX_RANGE:
        raise TemplateLimitError(f"range() of more than {MAX_RANGE} items")
    return numbers


@pass_context  # a filter with the context: called directly, never run at compile time
def counted(_context: Context, iterable: Iterable[Any]) -> Iterator[Any]:
    """What every `{% for %}` iterates through: one budget step per item."""
    for item in iterable:
        tick(iterations=1)
        yield item


@pass_context
def concatenated(_context: Context, *parts: Any) -> str:
    """`a ~ b`: checked before the text exists."""
    tick()
    texts = [str(checked(part)) for part in parts]
    if sum(map(len, texts)) > MAX_CHARS:
        raise TemplateLimitError(f"`~` would build more than {MAX_CHARS} characters")
    return "".join(texts)


@pass_context
def output(_context: Context, value: Any) -> Any:
    """Every piece of output, also into `{% set %}` blocks and macros, counts against the budget."""
    tick()
    checked(value)
    budget = _BUDGET.get()
    if budget is not None:
        budget.produced += len(value) if isinstance(value, str) else 16
        if budget.produced > MAX_PRODUCED_CHARS:
            raise TemplateLimitError(f"the template wrote more than {MAX_PRODUCED_CHARS} characters")
    return value


@pass_context
def literal(_context: Context, value: Any) -> Any:
    """A list, tuple or dict literal: `[x, x]` nested in a loop would double without bound."""
    tick()
    return checked(value)


# --- filters ---------------------------------------------------------------------------


def _check_indent(value: Any, width: Any = 4, *_args: Any, **_kwargs: Any) -> None:
    per_line = len(width) if isinstance(width, str) else width
    if isinstance(per_line, int):
        _width((str(value).count("\n") + 1) * per_line, "indent() would add")


def _check_wordwrap(value: Any, width: Any = 79, _long: Any = True, wrapstring: Any = None, *_a: Any) -> None:
    if isinstance(width, int) and width > 0 and isinstance(wrapstring, str):
        _width((len(str(value)) // width + 1) * len(wrapstring), "wordwrap() would add")


def _check_tojson(_value: Any, indent: Any = None) -> None:
    if isinstance(indent, int) and indent > 16:
        raise TemplateLimitError("tojson() indent is over 16")


def _check_sum(_value: Any, _attribute: Any = None, start: Any = 0) -> None:
    if not isinstance(start, int | float | Decimal):
        raise TemplateLimitError("sum() adds numbers; use join for text and lists")


# Filters one call of which can build much more than it was given: checked first.
FILTER_CHECKS: dict[str, Callable[..., None]] = {
    "center": lambda _value, width=80, *_a, **_k: _width(width, "center() width"),
    "indent": _check_indent,
    "wordwrap": _check_wordwrap,
    "format": lambda value, *_a, **_k: check_printf(value),
    "replace": lambda value, old="", new="", count=None: check_replace(str(value), old, new, count),
    "batch": lambda _value, linecount=1, *_a, **_k: _width(linecount, "batch() size"),
    "slice": lambda _value, slices=1, *_a, **_k: _width(slices, "slice() count"),
    "tojson": _check_tojson,
    "sum": _check_sum,
}


def bounded_filter(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    passes = getattr(getattr(function, "jinja_pass_arg", None), "name", None)
    check = FILTER_CHECKS.get(name)

    @pass_context  # also keeps Jinja from running the filter at compile time
    def bounded(context: Context, *args: Any, **kwargs: Any) -> Any:
        tick()
        if name == "join" and args:
            args = (sized(args[0]), *args[1:])
            check_join(args[0], args[1] if len(args) > 1 else kwargs.get("d", ""))
        elif check is not None:
            check(*args, **kwargs)
        if passes == "context":
            result = function(context, *args, **kwargs)
        elif passes == "eval_context":
            result = function(context.eval_ctx, *args, **kwargs)
        elif passes == "environment":
            result = function(context.environment, *args, **kwargs)
        else:
            result = function(*args, **kwargs)
        return checked(result)

    bounded.__name__ = getattr(function, "__name__", name)
    return bounded


# --- the environment -------------------------------------------------------------------


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox with every operator, call and access checked (module docstring)."""

    intercepted_binops = frozenset({"**", "*", "%", "+"})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.globals.pop("lipsum", None)  # generates any amount of text
        self.globals["range"] = bounded_range
        self.filters = {name: bounded_filter(name, f) for name, f in self.filters.items()}
        # BoundedTree's checks, as filters: a filter call is direct, a global goes through `call`
        self.filters.update(_counted=counted, _concatenated=concatenated, _output=output, _literal=literal)

    def add_filter(self, name: str, function: Callable[..., Any]) -> None:
        self.filters[name] = bounded_filter(name, function)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        tick()
        if operator == "**":
            check_power(left, right)
        elif operator == "*":
            check_repeat(left, right)
        elif operator == "%" and isinstance(left, str):
            check_printf(left)
        return checked(self.binop_table[operator](left, right))

    def call(self, __context: Context, __obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        tick()
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str):
            method = getattr(__obj, "__name__", "")
            if method in ("center", "ljust", "rjust", "zfill") and args:
                _width(args[0], f"{method}() width")
            elif method == "replace" and len(args) >= 2:
                check_replace(owner, *args[:3])
            elif method == "join" and args:
                args = (sized(args[0]), *args[1:])
                check_join(args[0], owner)
        return checked(super().call(__context, __obj, *args, **kwargs))

    def getattr(self, obj: Any, attribute: str) -> Any:
        tick()
        return checked(super().getattr(obj, attribute))

    def getitem(self, obj: Any, argument: Any) -> Any:
        tick()
        return checked(super().getitem(obj, argument))

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        return attr not in BLOCKED_METHODS and super().is_safe_attribute(obj, attr, value)

    def wrap_str_format(self, value: Any) -> None:
        return None  # str.format is refused by is_safe_attribute instead of sandboxed


class BoundedTree(NodeTransformer):
    """Rewrites a parsed template so loops, concatenations, literals and output are checked."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = _call("_counted", cast(nodes.Expr, node.iter))
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return _call("_concatenated", *node.nodes)

    def visit_Output(self, node: nodes.Output) -> nodes.Node:
        self.generic_visit(node)
        node.nodes = [
            _call("_output", nodes.Const(child.data) if isinstance(child, nodes.TemplateData) else child)
            for child in node.nodes
        ]
        return node

    def _literal(self, node: nodes.Expr) -> nodes.Node:
        self.generic_visit(node)
        return _call("_literal", node)

    visit_List = visit_Dict = _literal

    def visit_Tuple(self, node: nodes.Tuple) -> nodes.Node:
        return self._literal(node) if node.ctx == "load" else self.generic_visit(node)


def _call(name: str, first: nodes.Expr, *rest: nodes.Expr) -> nodes.Filter:
    return nodes.Filter(first, name, list(rest), [], None, None, lineno=first.lineno)
