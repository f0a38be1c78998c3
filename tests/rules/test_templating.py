"""Action value templates: sandbox, native results, load-time checks."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from connector.rules.templating import (
    LiteralValue,
    TemplateCompileError,
    TemplateRenderError,
    TemplateValue,
    check_template,
    compile_value,
    days,
    is_template,
    render_context,
)

TODAY = date(2024, 6, 15)
NOW = datetime(2024, 6, 15, 12, 30, tzinfo=UTC)
FIELDS = ("amount", "status", "product_lines", "items", "close_date")


def variables(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "today": TODAY,
        "now": NOW,
        "record": {
            "amount": Decimal("1500.50"),
            "status": "Pending",
            "product_lines": ["Hardware"],
            "items": 3,
            "close_date": "2024-07-01",
        },
        "approver": "005XX0000000001",
        "comment": "Looks fine",
        "request": {"id": 42, "rule": "large-deal", "status": "approved"},
        "rule": {"name": "large-deal", "steps": ("manager",), "expires_after": timedelta(days=180)},
    }
    return {**base, **extra}


def render(source: str, **extra: Any) -> Any:
    return compile_value(source, record_fields=FIELDS)(variables(**extra))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("{{ x }}", True),
        ("{% if x %}a{% endif %}", True),
        ("Approved", False),
        ("{ not a template }", False),
        ("50% {off}", False),
        (None, False),
        (12, False),
        (["{{ x }}"], False),
    ],
)
def test_is_template(value: Any, expected: bool) -> None:
    assert is_template(value) is expected


@pytest.mark.parametrize("value", ["Approved", None, 12, Decimal("1.5"), True, "{ x }"])
def test_literals_are_returned_as_written(value: Any) -> None:
    renderer = compile_value(value)
    assert isinstance(renderer, LiteralValue)
    assert renderer(variables()) == value


def test_literal_list_is_copied() -> None:
    renderer = compile_value(["a"])
    renderer({}).append("b")
    assert renderer({}) == ["a"]


NATIVE_CASES = [
    ("{{ today + days(180) }}", "2024-12-12"),  # a date becomes ISO text
    ("{{ today + (180|days) }}", "2024-12-12"),  # days as a filter
    ("{{ today - days(1) }}", "2024-06-14"),
    ("{{ now }}", "2024-06-15T12:30:00+00:00"),
    ("{{ record.amount }}", Decimal("1500.50")),  # one expression keeps its type
    ("{{ record['amount'] * 2 }}", Decimal("3001.00")),
    ("{{ record.items }}", 3),  # a field called `items`, not dict.items
    ("{{ comment }}", "Looks fine"),
    ("{{ approver }}", "005XX0000000001"),
    ("{{ request.id }}", 42),
    ("{{ rule.name }}", "large-deal"),
    ("{{ rule.expires_after.days }}", 180),
    ("  {{ request.status }}  ", "approved"),  # surrounding whitespace is not text
    ("{{- request.rule -}}", "large-deal"),
    ("{{ record.amount > 1000 }}", True),
    ("{{ none_value }}", None),
]


@pytest.mark.parametrize(("source", "expected"), NATIVE_CASES)
def test_single_expression_keeps_native_type(source: str, expected: Any) -> None:
    renderer = TemplateValue(source)
    result = renderer(variables(none_value=None))
    assert result == expected
    assert type(result) is type(expected)


TEXT_CASES = [
    ("Approved by {{ approver }}", "Approved by 005XX0000000001"),
    ("{{ request.rule }}: {{ comment }}", "large-deal: Looks fine"),
    ("Rejected: {{ comment }}", "Rejected: "),  # None renders as empty text, not "None"
    ("{% if record.amount > 1000 %}big{% else %}small{% endif %}", "big"),
    ("until {{ today + days(30) }}", "until 2024-07-15"),
    ("{{ record.amount }}{{ record.items }}", "1500.503"),
]


@pytest.mark.parametrize(("source", "expected"), TEXT_CASES)
def test_mixed_templates_render_text(source: str, expected: str) -> None:
    result = render(source, comment=None) if "Rejected" in source else render(source)
    assert result == expected


def test_none_comment_clears_the_field() -> None:
    assert render("{{ comment }}", comment=None) is None


def test_today_and_now_default_to_the_current_utc_clock() -> None:
    context = render_context({})
    assert context["now"].tzinfo is UTC
    assert context["today"] == context["now"].date()
    assert TemplateValue("{{ today }}")({}) == datetime.now(UTC).date().isoformat()


@pytest.mark.parametrize(
    ("value", "expected"),
    [(180, timedelta(days=180)), (Decimal("1.5"), timedelta(days=1.5)), ("7", timedelta(days=7))],
)
def test_days(value: Any, expected: timedelta) -> None:
    assert days(value) == expected


@pytest.mark.parametrize("value", [True, None, [1]])
def test_days_rejects_non_numbers(value: Any) -> None:
    with pytest.raises(TypeError):
        days(value)


# --- sandbox -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__ }}",
        "{{ record.__class__ }}",
        "x{{ comment.__class__.__mro__[1].__subclasses__() }}",
        "{{ (comment|attr('__class__')) }}",
        "{{ request.id.__class__ }}",
    ],
)
def test_sandbox_blocks_private_attributes_at_render(source: str) -> None:
    # Rendered WITHOUT the load-time checks: the sandbox itself must refuse.
    with pytest.raises(TemplateRenderError, match="sandbox") as info:
        TemplateValue(source, "f.yaml:9: rules[0].on.approve.set.status")(variables())
    assert "unsafe" in str(info.value)
    assert "f.yaml:9: rules[0].on.approve.set.status" in str(info.value)


def test_sandbox_is_immutable() -> None:
    values = variables()
    with pytest.raises(TemplateRenderError, match="sandbox"):
        TemplateValue("{{ record.product_lines.append('Services') }}")(values)
    assert values["record"]["product_lines"] == ["Hardware"]


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("{{ missing }}", "'missing' is undefined"),
        ("Hi {{ missing }}", "'missing' is undefined"),
        ("{{ record.nope }}", "nope"),
        ("{{ today + 'x' }}", "TypeError"),
        ("{{ record.amount / 0 }}", "DivisionByZero"),
    ],
)
def test_render_errors_are_template_render_errors(source: str, message: str) -> None:
    with pytest.raises(TemplateRenderError, match=message):
        TemplateValue(source)(variables())


# --- load-time checks --------------------------------------------------------------------------

CHECK_CASES = [
    ("{{ today + days(180) }}", [], []),
    ("{{ record.amount }} {{ request.status }} {{ rule.name }}", [], []),
    ("{% for p in record.product_lines %}{{ p }};{% endfor %}", [], []),
    ("{{ today + dayz(180) }}", ["unknown template variable `dayz`"], ["did you mean `days`?"]),
    ("{{ coment }}", ["unknown template variable `coment`"], ["did you mean `comment`?"]),
    ("{{ xyz }}", ["unknown template variable `xyz`"], ["available variables are"]),
    ("{{ record.amout }}", ["`record` has no attribute `amout`"], ["did you mean `amount`?"]),
    ("{{ record['stauts'] }}", ["`record` has no attribute `stauts`"], ["did you mean `status`?"]),
    ("{{ request.stauts }}", ["`request` has no attribute `stauts`"], ["did you mean `status`?"]),
    ("{{ approver.name }}", ["`approver` has no attribute `name`"], ["plain value"]),
    ("{{ ''.__class__.__mro__ }}", ["private attributes such as `__mro__`", "`__class__`"], [None, None]),
    ("{{ record['_x'] }}", ["private attributes such as `_x`"], [None]),
    ("{{ today + }}", ["template syntax error"], ["templates look like"]),
    ("{% if x %}", ["template syntax error"], ["templates look like"]),
    ("{{ comment|nosuch }}", ["No filter named 'nosuch'"], ["templates look like"]),
    ("line1\n{{ oops ", ["template syntax error (template line 2)"], ["templates look like"]),
]


@pytest.mark.parametrize(("source", "messages", "hints"), CHECK_CASES)
def test_check_template(source: str, messages: list[str], hints: list[str | None]) -> None:
    problems = check_template(source, record_fields=FIELDS)
    assert len(problems) == len(messages), problems
    for (message, hint), want_message, want_hint in zip(problems, messages, hints, strict=True):
        assert want_message in message
        if want_hint is not None:
            assert hint is not None and want_hint in hint


def test_compile_value_raises_with_every_problem() -> None:
    with pytest.raises(TemplateCompileError) as info:
        compile_value("{{ coment }} {{ record.amout }}", record_fields=FIELDS)
    assert len(info.value.problems) == 2


def test_record_attributes_are_not_checked_without_fields() -> None:
    assert check_template("{{ record.anything }}") == []
