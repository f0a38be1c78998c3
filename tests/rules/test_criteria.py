"""Criteria compiler and type coercion: every operator, combinator and coercion edge case."""

from __future__ import annotations

import math
import random
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest

from connector.approvals.spec import EvalContext, FieldSpec
from connector.rules.coerce import (
    CoercionError,
    CoercionFailure,
    Duration,
    add_months,
    coerce,
    parse_duration,
    try_coerce,
)
from connector.rules.criteria import (
    Change,
    CompiledCriterion,
    RelativeExpectation,
    _float_test,
    _int_test,
    _scalar_test,
    compile_when,
)
from connector.rules.errors import MappingLoadError

TODAY = date(2024, 6, 15)
NOW = datetime(2024, 6, 15, 12, 0, tzinfo=UTC)

FIELDS: dict[str, FieldSpec] = {
    spec.name: spec
    for spec in (
        FieldSpec("amount", "Amount", "money"),
        FieldSpec("score", "Account.Score__c", "number"),
        FieldSpec("stage", "StageName", "string"),
        FieldSpec("owner", "OwnerId", "user"),
        FieldSpec("lines", "Product_Lines__c", "list"),
        FieldSpec("close", "CloseDate", "date"),
        FieldSpec("seen_at", "LastSeen__c", "datetime"),
        FieldSpec("vip", "VIP__c", "boolean"),
    )
}


def ctx(
    values: dict[str, Any] | None = None,
    previous: dict[str, Any] | None = None,
    changed: tuple[str, ...] = (),
    today: date = TODAY,
    now: datetime = NOW,
) -> EvalContext:
    return EvalContext(values or {}, previous, frozenset(changed), today, now)


def evaluate(spec: Any, context: EvalContext) -> bool:
    """Compile, evaluate, and check that explain reaches the same verdict as the hot path."""
    criterion = compile_when(spec, FIELDS)
    result = criterion(context)
    assert criterion._root.trace(context, []) is result
    return result


def compile_error(spec: Any) -> MappingLoadError:
    with pytest.raises(MappingLoadError) as info:
        compile_when(spec, FIELDS)
    return info.value


# --- operators ----------------------------------------------------------------------------

OPERATOR_CASES = [
    # (condition, value, expected)
    ({"stage": {"eq": "Closed Won"}}, "Closed Won", True),
    ({"stage": {"eq": "Closed Won"}}, "closed won", False),  # case-sensitive by default
    ({"stage": {"eq": "Closed Won"}}, None, False),
    ({"stage": "Closed Won"}, "Closed Won", True),  # scalar shorthand = eq
    ({"stage": {"ne": "Closed Won"}}, "Open", True),
    ({"stage": {"ne": "Closed Won"}}, "Closed Won", False),
    ({"stage": {"ne": "Closed Won"}}, None, True),  # a blank stage is "not Closed Won"
    ({"stage": {"ne": "Closed Won"}}, "   ", True),
    ({"amount": {"gt": 100000}}, 100001, True),
    ({"amount": {"gt": 100000}}, 100000, False),
    ({"amount": {"gt": 100000}}, None, False),
    ({"amount": {"gte": 100000}}, 100000, True),
    ({"amount": {"gte": 100000}}, 99999.99, False),
    ({"amount": {"lt": 100000}}, 99999.99, True),
    ({"amount": {"lt": 100000}}, 100000, False),
    ({"amount": {"lte": 100000}}, 100000, True),
    ({"amount": {"lte": 100000}}, "100,000.01", False),
    ({"amount": {"between": [10, 20]}}, 10, True),  # inclusive
    ({"amount": {"between": [10, 20]}}, 20, True),
    ({"amount": {"between": [10, 20]}}, 20.01, False),
    ({"amount": {"between": [10, 20]}}, 9.99, False),
    ({"stage": {"in": ["A", "B"]}}, "B", True),
    ({"stage": {"in": ["A", "B"]}}, "C", False),
    ({"stage": {"in": ["A", "B"]}}, None, False),
    ({"stage": {"not_in": ["A", "B"]}}, "C", True),
    ({"stage": {"not_in": ["A", "B"]}}, "A", False),
    ({"stage": {"not_in": ["A", "B"]}}, None, True),
    ({"score": {"in": [1, 2.5]}}, "2.50", True),  # numbers compare by value
    ({"stage": {"contains": "Won"}}, "Closed Won", True),
    ({"stage": {"contains": "Won"}}, "Closed Lost", False),
    ({"stage": {"starts_with": "Closed"}}, "Closed Lost", True),
    ({"stage": {"starts_with": "Closed"}}, "Open (Closed)", False),
    ({"owner": {"starts_with": "005"}}, " 005XX ", True),  # user ids are trimmed
    ({"stage": {"is_blank": True}}, None, True),
    ({"stage": {"is_blank": True}}, "", True),
    ({"stage": {"is_blank": True}}, " \t", True),
    ({"stage": {"is_blank": True}}, "x", False),
    ({"lines": {"is_blank": True}}, [], True),
    ({"lines": {"is_blank": True}}, ";;", True),
    ({"stage": {"is_blank": False}}, "x", True),
    ({"stage": {"is_not_blank": True}}, "x", True),
    ({"stage": {"is_not_blank": True}}, None, False),
    ({"amount": {"is_not_blank": True}}, "abc", True),  # present, even though unreadable
    ({"vip": {"eq": True}}, "yes", True),
    ({"vip": True}, 1, True),
    ({"vip": {"eq": False}}, "No", True),
    ({"vip": {"eq": True}}, "maybe", False),
    ({"close": {"gt": "2024-01-01"}}, "2024-01-02", True),
    ({"close": {"lte": "2024-01-01"}}, "2024-01-02", False),
    ({"close": {"eq": "2024-01-01"}}, "2024-01-01T23:30:00-05:00", True),  # date keeps its own day
    ({"seen_at": {"gt": "2024-06-15T10:00:00Z"}}, "2024-06-15T11:30:00+02:00", False),  # 09:30Z
    ({"seen_at": {"gt": "2024-06-15T10:00:00Z"}}, "2024-06-15T10:30:00", True),  # naive = UTC
]


@pytest.mark.parametrize(("condition", "value", "expected"), OPERATOR_CASES)
def test_operator(condition: dict[str, Any], value: Any, expected: bool) -> None:
    field = next(iter(condition))
    assert evaluate(condition, ctx({field: value})) is expected


LIST_CASES = [
    ({"lines": {"contains": "Hardware"}}, "Hardware;Services", True),
    ({"lines": {"contains": "Hardware"}}, ["Services"], False),
    ({"lines": {"contains": ["Hardware", "Services"]}}, ["Services", "Hardware", "X"], True),
    ({"lines": {"contains": ["Hardware", "Services"]}}, "Hardware", False),
    ({"lines": {"in": ["Hardware", "Cloud"]}}, "Services; Cloud", True),  # any overlap
    ({"lines": {"in": ["Hardware", "Cloud"]}}, "Services", False),
    ({"lines": {"not_in": ["Hardware", "Cloud"]}}, "Services", True),
    ({"lines": {"not_in": ["Hardware", "Cloud"]}}, ["Cloud"], False),
    ({"lines": {"not_in": ["Hardware"]}}, None, True),
    ({"lines": {"eq": ["A", "B"]}}, "B;A", True),  # same set, any order
    ({"lines": {"eq": ["A", "B"]}}, "A;B;C", False),
    ({"lines": {"eq": "A"}}, ["A"], True),
    ({"lines": {"ne": ["A"]}}, "A;B", True),
    ({"lines": {"contains": "hardware", "ignore_case": True}}, "HARDWARE;x", True),
    ({"lines": {"contains": "hardware"}}, "HARDWARE;x", False),
    ({"lines": {"contains": "A"}}, {"not": "a list"}, False),  # unreadable value
]


@pytest.mark.parametrize(("condition", "value", "expected"), LIST_CASES)
def test_list_operators(condition: dict[str, Any], value: Any, expected: bool) -> None:
    assert evaluate(condition, ctx({"lines": value})) is expected


IGNORE_CASE_CASES = [
    ({"eq": "closed won", "ignore_case": True}, "Closed WON", True),
    ({"ne": "closed won", "ignore_case": True}, "Closed WON", False),
    ({"in": ["a", "B"], "ignore_case": True}, "b", True),
    ({"not_in": ["a", "B"], "ignore_case": True}, "b", False),
    ({"contains": "WON", "ignore_case": True}, "closed won", True),
    ({"starts_with": "CLOSED", "ignore_case": True}, "closed won", True),
    ({"eq": "Straße", "ignore_case": True}, "STRASSE", True),  # casefold, not lower
    ({"eq": "closed won", "ignore_case": False}, "Closed Won", False),
]


@pytest.mark.parametrize(("condition", "value", "expected"), IGNORE_CASE_CASES)
def test_ignore_case(condition: dict[str, Any], value: Any, expected: bool) -> None:
    assert evaluate({"stage": condition}, ctx({"stage": value})) is expected


# --- combinators --------------------------------------------------------------------------

BIG = {"amount": {"gt": 100000}}
RISKY = {"score": {"lt": 70}}
LOST = {"stage": {"eq": "Closed Lost"}}

COMBINATOR_CASES = [
    ({"all": [BIG, RISKY]}, {"amount": 200000, "score": 50}, True),
    ({"all": [BIG, RISKY]}, {"amount": 200000, "score": 80}, False),
    ({"all": [BIG, RISKY, {"not": LOST}]}, {"amount": 200000, "score": 50, "stage": "Open"}, True),
    ({"all": [BIG, RISKY, {"not": LOST}, BIG]}, {"amount": 200000, "score": 50, "stage": "Open"}, True),
    ({"all": [BIG, RISKY, {"not": LOST}, BIG]}, {"amount": 1, "score": 50, "stage": "Open"}, False),
    ({"any": [BIG, RISKY]}, {"amount": 1, "score": 50}, True),
    ({"any": [BIG, RISKY]}, {"amount": 1, "score": 80}, False),
    ({"any": [BIG, RISKY, LOST]}, {"stage": "Closed Lost"}, True),
    ({"any": [BIG, RISKY, LOST, LOST]}, {"stage": "Open"}, False),
    ({"any": [BIG, RISKY, LOST, LOST]}, {"stage": "Closed Lost"}, True),
    ({"not": LOST}, {"stage": "Closed Lost"}, False),
    ({"not": LOST}, {"stage": None}, True),
    ({"not": {"not": LOST}}, {"stage": "Closed Lost"}, True),
    ({"all": [BIG]}, {"amount": 200000}, True),
    ({"any": [RISKY]}, {"score": 80}, False),
    ({**BIG, **RISKY}, {"amount": 200000, "score": 50}, True),  # several keys = AND
    ({**BIG, **RISKY}, {"amount": 200000, "score": 90}, False),
    ({"amount": {"gt": 10, "lt": 20}}, {"amount": 15}, True),  # several operators = AND
    ({"amount": {"gt": 10, "lt": 20}}, {"amount": 25}, False),
    (
        {"all": [BIG, {"any": [RISKY, {"not": LOST}]}]},
        {"amount": 200000, "score": 80, "stage": "Open"},
        True,
    ),
    (
        {"all": [BIG, {"any": [RISKY, {"not": LOST}]}]},
        {"amount": 200000, "score": 80, "stage": "Closed Lost"},
        False,
    ),
    ({"not": {"amount": {"gt": 5}}}, {"amount": "abc"}, True),  # not inverts a bad value's false
]


@pytest.mark.parametrize(("spec", "values", "expected"), COMBINATOR_CASES)
def test_combinators(spec: dict[str, Any], values: dict[str, Any], expected: bool) -> None:
    assert evaluate(spec, ctx(values)) is expected


def test_all_short_circuits_in_the_hot_path() -> None:
    # A bad value later in the list must not be reached, nor raise, once the first is false.
    criterion = compile_when({"all": [BIG, {"lines": {"contains": "x"}}]}, FIELDS)
    assert criterion(ctx({"amount": 1, "lines": object()})) is False


# --- changes -------------------------------------------------------------------------------

CHANGE_CASES = [
    # (condition, values, previous, changed_fields, expected)
    ({"changed": True}, {"stage": "B"}, {"stage": "A"}, (), True),
    ({"changed": True}, {"stage": "A"}, {"stage": "A"}, (), False),
    ({"changed": True}, {"stage": "A"}, {"stage": "A"}, ("stage",), True),  # CRM says so
    ({"changed": True}, {"stage": "A"}, None, (), False),  # never seen: no change known
    ({"changed": True}, {"stage": "A"}, {}, (), False),  # previous lacks the field
    ({"changed": False}, {"stage": "A"}, {"stage": "A"}, (), True),
    ({"changed": False}, {"stage": "B"}, {"stage": "A"}, (), False),
    ({"changed_to": "B"}, {"stage": "B"}, {"stage": "A"}, (), True),
    ({"changed_to": "B"}, {"stage": "B"}, {"stage": "B"}, (), False),
    ({"changed_to": "B"}, {"stage": "C"}, {"stage": "A"}, (), False),
    ({"changed_to": "B"}, {"stage": "B"}, None, ("stage",), True),
    ({"changed_to": ["B", "C"]}, {"stage": "C"}, {"stage": "A"}, (), True),  # any of
    ({"changed_to": "b", "ignore_case": True}, {"stage": "B"}, {"stage": "A"}, (), True),
    ({"changed_from": "A"}, {"stage": "B"}, {"stage": "A"}, (), True),
    ({"changed_from": "A"}, {"stage": "B"}, {"stage": "X"}, (), False),
    ({"changed_from": "A"}, {"stage": "A"}, {"stage": "A"}, (), False),
    ({"changed_from": "A"}, {"stage": "B"}, None, ("stage",), False),  # previous unknown
    ({"changed_from": ["A", "X"]}, {"stage": "B"}, {"stage": "X"}, (), True),
    ({"changed_from": "A", "changed_to": "B"}, {"stage": "B"}, {"stage": "A"}, (), True),
    ({"changed_from": "A", "changed_to": "B"}, {"stage": "C"}, {"stage": "A"}, (), False),
]


@pytest.mark.parametrize(("condition", "values", "previous", "changed", "expected"), CHANGE_CASES)
def test_change_operators(
    condition: dict[str, Any],
    values: dict[str, Any],
    previous: dict[str, Any] | None,
    changed: tuple[str, ...],
    expected: bool,
) -> None:
    assert evaluate({"stage": condition}, ctx(values, previous, changed)) is expected


@pytest.mark.parametrize(
    ("field", "before", "after", "expected"),
    [
        ("amount", 100000, "100,000.00", False),  # same amount, different shape: no change
        ("amount", 100000, 100000.5, True),
        ("lines", "A;B", ["B", "A"], False),  # multi-select order is not a change
        ("lines", "A;B", "A", True),
        ("close", "2024-01-01", "2024-01-01T00:00:00Z", False),
        ("amount", "abc", "abd", True),  # unreadable values compare as written
    ],
)
def test_changed_compares_coerced_values(field: str, before: Any, after: Any, expected: bool) -> None:
    assert evaluate({field: {"changed": True}}, ctx({field: after}, {field: before})) is expected


# --- dates relative to today -----------------------------------------------------------------

RELATIVE_CASES = [
    # today is 2024-06-15
    ({"older_than": "30d"}, "2024-05-15", True),  # 31 days ago
    ({"older_than": "30d"}, "2024-05-16", False),  # exactly 30 days ago
    ({"newer_than": "30d"}, "2024-05-16", True),
    ({"newer_than": "30d"}, "2024-05-15", False),
    ({"newer_than": "30d"}, "2024-07-01", True),  # future dates are newer
    ({"within_last": "30d"}, "2024-07-01", False),
    ({"within_last": "30d"}, "2024-06-15", True),
    ({"within_last": "1w"}, "2024-06-08", True),
    ({"within_last": "1w"}, "2024-06-07", False),
    ({"within_next": "7d"}, "2024-06-22", True),
    ({"within_next": "7d"}, "2024-06-23", False),
    ({"within_next": "7d"}, "2024-06-14", False),  # past dates are not "next"
    ({"older_than": "6m"}, "2023-12-14", True),  # calendar months
    ({"older_than": "6m"}, "2023-12-15", False),
    ({"older_than": "1y"}, "2023-06-14", True),
    ({"older_than": "1y"}, "2023-06-15", False),
    ({"older_than": "30d"}, None, False),
    ({"older_than": "30d"}, "not a date", False),
]


@pytest.mark.parametrize(("condition", "value", "expected"), RELATIVE_CASES)
def test_relative_dates(condition: dict[str, Any], value: Any, expected: bool) -> None:
    assert evaluate({"close": condition}, ctx({"close": value})) is expected


@pytest.mark.parametrize(
    ("condition", "value", "now", "expected"),
    [
        ({"older_than": "2d"}, "2024-06-13T11:59:59Z", NOW, True),
        ({"older_than": "2d"}, "2024-06-13T12:00:00Z", NOW, False),
        ({"older_than": "2d"}, "2024-06-13T13:59:59+02:00", NOW, True),  # 11:59:59Z
        ({"within_next": "1d"}, "2024-06-16T12:00:00Z", NOW, True),
        ({"within_next": "1d"}, "2024-06-16T12:00:01Z", NOW, False),
        ({"older_than": "2d"}, "2024-06-13T11:00:00", NOW.replace(tzinfo=None), True),  # naive now
    ],
)
def test_relative_datetimes_use_now(
    condition: dict[str, Any], value: str, now: datetime, expected: bool
) -> None:
    assert evaluate({"seen_at": condition}, ctx({"seen_at": value}, now=now)) is expected


# --- coercion -------------------------------------------------------------------------------

COERCE_CASES = [
    # (type, raw, expected)
    ("money", 0.1, Decimal("0.1")),  # via str: not Decimal(0.1000000000000000055...)
    ("money", 0.1 + 0.2, Decimal("0.30000000000000004")),  # the float really is not 0.3
    ("money", "100,000.50", Decimal("100000.50")),
    ("money", "$1,234.50", Decimal("1234.50")),
    ("money", "-$1,234.50", Decimal("-1234.50")),
    ("money", "1,234.50 USD", Decimal("1234.50")),
    ("money", "EUR 99", Decimal("99")),
    ("money", "99 €", Decimal("99")),
    ("money", 100000, Decimal("100000")),
    ("money", Decimal("1.10"), Decimal("1.10")),
    ("money", "  ", None),
    ("money", None, None),
    ("number", "1e3", Decimal("1000")),
    ("number", "-12.5", Decimal("-12.5")),
    ("date", "2024-05-01", date(2024, 5, 1)),
    ("date", "2024-05-01T23:30:00-05:00", date(2024, 5, 1)),
    ("date", datetime(2024, 5, 1, 23, 0, tzinfo=UTC), date(2024, 5, 1)),
    ("date", 1714521600000, date(2024, 5, 1)),  # HubSpot: ms since epoch
    ("date", "1714521600000", date(2024, 5, 1)),
    ("datetime", "2024-05-01T12:00:00Z", datetime(2024, 5, 1, 12, tzinfo=UTC)),
    ("datetime", "2024-05-01T12:00:00.000+0000", datetime(2024, 5, 1, 12, tzinfo=UTC)),  # Salesforce
    ("datetime", "2024-05-01T14:00:00+02:00", datetime(2024, 5, 1, 12, tzinfo=UTC)),
    ("datetime", "2024-05-01T12:00:00", datetime(2024, 5, 1, 12, tzinfo=UTC)),  # naive = UTC
    ("datetime", "2024-05-01", datetime(2024, 5, 1, tzinfo=UTC)),
    ("datetime", date(2024, 5, 1), datetime(2024, 5, 1, tzinfo=UTC)),
    (
        "datetime",
        datetime(2024, 5, 1, 12, tzinfo=timezone(timedelta(hours=-3))),
        datetime(2024, 5, 1, 15, tzinfo=UTC),
    ),
    ("boolean", "true", True),
    ("boolean", "FALSE", False),
    ("boolean", "Yes", True),
    ("boolean", "no", False),
    ("boolean", "1", True),
    ("boolean", 0, False),
    ("boolean", "", None),
    ("string", 42, "42"),
    ("string", True, "true"),
    ("string", "  ", None),
    ("string", " padded ", " padded "),  # compared exactly as sent
    ("user", 12345, "12345"),
    ("user", " 005XX ", "005XX"),
    ("list", "A; B ;;C", ("A", "B", "C")),
    ("list", ["A", " B", "", None], ("A", "B")),
    ("list", [], None),
    ("list", 7, ("7",)),
]


@pytest.mark.parametrize(("field_type", "raw", "expected"), COERCE_CASES)
def test_coerce(field_type: str, raw: Any, expected: Any) -> None:
    value = coerce(raw, field_type)
    assert value == expected
    assert type(value) is type(expected)


BAD_VALUES = [
    ("money", "1,23,4"),
    ("money", "12abc"),
    ("money", "1.234,56"),  # European decimal comma is not guessed
    ("money", True),
    ("money", float("nan")),
    ("money", float("inf")),
    ("money", Decimal("NaN")),
    ("money", "Infinity"),
    ("money", "$"),
    ("money", "-"),
    ("number", [1]),
    ("date", "05/01/2024"),
    ("date", "2024-13-01"),
    ("date", True),
    ("datetime", "yesterday"),
    ("datetime", 10**20),
    ("boolean", "maybe"),
    ("boolean", 2),
    ("string", ["a"]),
    ("list", {"a": 1}),
]


@pytest.mark.parametrize(("field_type", "raw"), BAD_VALUES)
def test_coerce_rejects(field_type: str, raw: Any) -> None:
    with pytest.raises(CoercionError):
        coerce(raw, field_type)
    assert isinstance(try_coerce(raw, field_type), CoercionFailure)


@pytest.mark.parametrize(
    ("field", "raw"),
    [
        ("amount", "abc"),
        ("amount", True),
        ("amount", float("nan")),
        ("close", "31/12/2024"),
        ("vip", "maybe"),
    ],
)
def test_bad_values_make_conditions_false_not_errors(field: str, raw: Any) -> None:
    positive = {"amount": {"gt": 0}, "close": {"gt": "2000-01-01"}, "vip": {"eq": True}}[field]
    negative = {"amount": {"ne": 0}, "close": {"ne": "2000-01-01"}, "vip": {"ne": True}}[field]
    assert evaluate({field: positive}, ctx({field: raw})) is False
    assert evaluate({field: negative}, ctx({field: raw})) is False  # even `ne` is false


def test_decimal_not_float_semantics() -> None:
    # 0.1 + 0.2 != 0.3 in floats; a CRM sending 0.3 must equal the literal 0.3 exactly.
    assert evaluate({"amount": {"eq": 0.3}}, ctx({"amount": 0.3})) is True
    assert evaluate({"amount": {"eq": Decimal("0.3")}}, ctx({"amount": "0.30"})) is True
    assert evaluate({"amount": {"gt": 0.1}}, ctx({"amount": 0.1})) is False  # float(0.1) > Decimal(0.1)
    assert evaluate({"amount": {"eq": 0.3}}, ctx({"amount": 0.1 + 0.2})) is False


def test_float_shortcut_matches_decimal_path() -> None:
    # Floats are compared against precomputed thresholds; this must agree with
    # Decimal(repr(f)) everywhere, including the floats right next to each literal.
    literals = [
        Decimal(x) for x in ("0", "0.1", "0.3", "100000", "100000.50", "-5", "1e20", "1e-320", "1e400")
    ]
    floats = [0.1, 0.2, 0.1 + 0.2, 0.3, 100000.5, -0.0, 0.0, 5e-324, 1e20, 9007199254740993.0]
    for literal in literals:
        g = float(literal)
        floats += [g, math.nextafter(g, math.inf), math.nextafter(g, -math.inf)]
    rng = random.Random(7)
    floats += [rng.uniform(-1e6, 1e6) for _ in range(300)]
    floats = [f for f in floats if math.isfinite(f)]
    for op in ("eq", "ne", "gt", "gte", "lt", "lte"):
        for literal in literals:
            fast = _float_test(op, literal)
            if fast is None:  # beyond float range: the leaf converts through Decimal instead
                assert math.isinf(float(literal))
                continue
            exact = _scalar_test(op, literal)
            mismatches = [f for f in floats if fast(f) != exact(Decimal(repr(f)))]
            assert not mismatches, (op, literal, mismatches[:3])


def test_int_shortcut_matches_decimal_path() -> None:
    literals = [Decimal(x) for x in ("0", "0.5", "-0.5", "70", "69.5", "100000.5", "-3", "1e3", "2.000")]
    for op in ("eq", "ne", "gt", "gte", "lt", "lte"):
        for literal in literals:
            fast, exact = _int_test(op, literal), _scalar_test(op, literal)
            mismatches = [v for v in range(-20, 1200) if fast(v) != exact(v)]
            assert not mismatches, (op, literal, mismatches[:3])
    between = _int_test("between", [Decimal("0.5"), Decimal("9.5")])
    assert [v for v in range(-3, 13) if between(v)] == list(range(1, 10))
    assert _int_test("in", [Decimal("2"), Decimal("2.5")])(2) is True
    assert _int_test("not_in", [Decimal("2"), Decimal("2.5")])(3) is True


NOT_FUSION_CASES = [
    (field, {op: literal}, value)
    for field, op, literal, values in (
        ("stage", "eq", "A", ["A", "B", None, "  ", 5, ["x"]]),
        ("stage", "ne", "A", ["A", "B", None, ["x"]]),
        ("stage", "in", ["A", "B"], ["A", "C", None, {"x": 1}]),
        ("stage", "not_in", ["A", "B"], ["A", "C", None, {"x": 1}]),
        ("owner", "eq", "005X", [" 005X ", "005Y", None]),
        ("amount", "gt", 10.5, [11, 10, 10.5, 10.6, "10.50", None, "bad", float("nan"), True]),
        ("amount", "gte", 10, [10, 9.99, None, "x"]),
        ("amount", "lt", 10, [9, 10.0, None, float("inf")]),
        ("amount", "lte", 10, [10, 10.01, None]),
        ("amount", "eq", 0.3, [0.3, 0.1 + 0.2, "0.30", None]),
        ("amount", "in", [1, 2.5], [1, 2.5, 3, None]),
        ("lines", "in", ["A"], ["A;B", "B", None, {"x": 1}]),
        ("lines", "eq", ["A", "B"], ["B;A", "A", None]),
        ("close", "gt", "2024-01-01", ["2024-01-02", "2023-12-31", None, "bad"]),
    )
    for value in values
]


@pytest.mark.parametrize(("field", "condition", "value"), NOT_FUSION_CASES)
def test_not_of_a_leaf_is_exactly_the_inverse(field: str, condition: dict[str, Any], value: Any) -> None:
    # `not` around one leaf is compiled into the complement operator; it must still be `not`.
    context = ctx({field: value})
    assert evaluate({"not": {field: condition}}, context) is not evaluate({field: condition}, context)
    ignore = {**condition, "ignore_case": True}
    if field in ("stage", "owner", "lines"):
        assert evaluate({"not": {field: ignore}}, context) is not evaluate({field: ignore}, context)


def test_literals_beyond_float_range_still_work() -> None:
    assert evaluate({"amount": {"lt": "1e400"}}, ctx({"amount": 1e300})) is True
    assert evaluate({"amount": {"gt": "1e400"}}, ctx({"amount": 1e300})) is False


def test_int_and_decimal_values_compare_exactly() -> None:
    assert evaluate({"amount": {"gt": "100000.5"}}, ctx({"amount": 100001})) is True
    assert evaluate({"amount": {"gt": "100000.5"}}, ctx({"amount": 100000})) is False
    assert evaluate({"amount": {"eq": 10}}, ctx({"amount": Decimal("10.00")})) is True


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("180d", Duration(180, "d")),
        ("2w", Duration(2, "w")),
        (" 6 m ", Duration(6, "m")),
        ("1y", Duration(1, "y")),
    ],
)
def test_parse_duration(text: str, expected: Duration) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["180", "6 months", "1.5d", "-3d", "3h", 180, None])
def test_parse_duration_rejects(text: Any) -> None:
    with pytest.raises(CoercionError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("moment", "months", "expected"),
    [
        (date(2024, 1, 31), 1, date(2024, 2, 29)),  # clamped to the month's end (leap year)
        (date(2023, 3, 31), -1, date(2023, 2, 28)),
        (date(2024, 6, 15), -6, date(2023, 12, 15)),
        (date(2024, 2, 29), 12, date(2025, 2, 28)),
    ],
)
def test_add_months(moment: date, months: int, expected: date) -> None:
    assert add_months(moment, months) == expected


# --- explain ---------------------------------------------------------------------------------


def test_explain_traces_every_leaf_with_actual_values() -> None:
    criterion = compile_when({"all": [BIG, {"any": [RISKY, {"not": LOST}]}]}, FIELDS)
    traces = criterion.explain(ctx({"amount": "250,000", "score": 80, "stage": "Closed Lost"}))
    rows = [(t.path, t.field, t.operator, t.expected, t.actual, t.result) for t in traces]
    assert rows == [
        ("when.all", None, "all", None, None, False),
        ("when.all[0].amount.gt", "amount", "gt", Decimal(100000), Decimal(250000), True),
        ("when.all[1].any", None, "any", None, None, False),
        ("when.all[1].any[0].score.lt", "score", "lt", Decimal(70), Decimal(80), False),
        ("when.all[1].any[1].not", None, "not", None, None, False),
        ("when.all[1].any[1].not.stage.eq", "stage", "eq", "Closed Lost", "Closed Lost", True),
    ]


def test_explain_evaluates_leaves_the_hot_path_skipped() -> None:
    criterion = compile_when({"all": [BIG, RISKY]}, FIELDS)
    traces = criterion.explain(ctx({"amount": 1, "score": 10}))
    assert [t.field for t in traces if t.field] == ["amount", "score"]  # no short-circuit
    assert traces[-1].result is True


def test_explain_shows_why_a_value_could_not_be_read() -> None:
    (trace,) = compile_when(BIG, FIELDS).explain(ctx({"amount": "12abc"}))
    assert trace.result is False
    assert isinstance(trace.actual, CoercionFailure)
    assert "cannot read '12abc' as money" in str(trace.actual)


def test_explain_resolves_relative_windows_and_changes() -> None:
    criterion = compile_when({"close": {"older_than": "30d"}, "stage": {"changed_to": "Won"}}, FIELDS)
    context = ctx({"close": "2024-01-01", "stage": "Won"}, {"stage": "Open"})
    close, stage = criterion.explain(context)
    assert isinstance(close.expected, RelativeExpectation)
    assert str(close.expected) == "30d (before 2024-05-16)"
    assert close.actual == date(2024, 1, 1) and close.result is True
    assert stage.actual == Change("Open", "Won", reported=False)
    assert str(stage.actual) == "'Open' -> 'Won'"


def test_shorthand_multi_key_and_multi_operator_paths() -> None:
    criterion = compile_when({"stage": "Won", "amount": {"gt": 1, "lt": 9}}, FIELDS)
    paths = [t.path for t in criterion.explain(ctx({"stage": "Won", "amount": 5}))]
    assert paths == ["when.stage", "when.amount.gt", "when.amount.lt"]


def test_compiled_criterion_satisfies_the_protocol() -> None:
    criterion = compile_when(BIG, FIELDS)
    assert isinstance(criterion, CompiledCriterion)
    assert callable(criterion) and callable(criterion.explain)
    assert "when.amount.gt" in repr(criterion)


def test_admin_text_is_never_executed() -> None:
    payload = "__import__('os').system('touch /tmp/pwned')"
    assert evaluate({"stage": {"eq": payload}}, ctx({"stage": payload})) is True
    assert evaluate({"stage": {"eq": payload}}, ctx({"stage": "x"})) is False


# --- compile errors -----------------------------------------------------------------------------

COMPILE_ERRORS = [
    # (spec, key path, message fragment, hint fragment)
    ({"amount": {"gte_": 5}}, "when.amount.gte_", "unknown operator `gte_`", "did you mean `gte`?"),
    ({"amount": {"zzz": 5}}, "when.amount.zzz", "unknown operator", "expected one of"),
    ({"amount": {"score": {"gt": 5}}}, "when.amount.score", "unknown operator", "one level up"),
    ({"amonut": {"gt": 5}}, "when.amonut", "unknown field `amonut`", "did you mean `amount`?"),
    ({"StageName": "Won"}, "when.StageName", "unknown field", "CRM API name"),
    ({"gt": 5}, "when.gt", "unknown field", "operators go under a field"),
    ({"stage": {"gt": 5}}, "when.stage.gt", "does not work on string field", "type: number"),
    ({"vip": {"contains": "x"}}, "when.vip.contains", "does not work on boolean", "use `eq` or `in`"),
    ({"amount": {"older_than": "3d"}}, "when.amount.older_than", "does not work on money", None),
    ({"amount": {"gt": "lots"}}, "when.amount.gt", "'lots' is not a valid money", None),
    ({"close": {"gt": "today"}}, "when.close.gt", "not a valid date", "older_than"),
    ({"amount": {"between": [20, 10]}}, "when.amount.between", "low 20 is greater than high 10", "[10, 20]"),
    ({"amount": {"between": [1]}}, "when.amount.between", "two values", None),
    ({"stage": {"in": "A"}}, "when.stage.in", "non-empty list", None),
    ({"stage": {"in": []}}, "when.stage.in", "non-empty list", None),
    ({"lines": {"in": "A"}}, "when.lines.in", "expects a list", None),
    ({"stage": {"eq": None}}, "when.stage.eq", "needs a value", "is_blank"),
    ({"stage": {"eq": ["A", "B"]}}, "when.stage.eq", "single value", "in: [...]"),
    ({"stage": ["A", "B"]}, "when.stage", "bare list", "in: [...]"),
    ({"stage": None}, "when.stage", "no condition", "is_blank"),
    ({"stage": {}}, "when.stage", "no operator", None),
    ({"stage": {"is_blank": "perhaps"}}, "when.stage.is_blank", "true or false", None),
    ({"stage": {"changed": 3}}, "when.stage.changed", "true or false", None),
    ({"close": {"older_than": "180"}}, "when.close.older_than", "duration", "180d"),
    ({"close": {"older_than": "6 months"}}, "when.close.older_than", "duration", "m (months)"),
    ({"amount": {"gt": 1, "ignore_case": True}}, "when.amount.ignore_case", "only applies to text", None),
    ({"stage": {"eq": "a", "ignore_case": "yes"}}, "when.stage.ignore_case", "true or false", None),
    ({"all": []}, "when.all", "non-empty list", None),
    ({"any": {"stage": "A"}}, "when.any", "non-empty list", None),
    ({"not": [{"stage": "A"}]}, "when.not", "got a list", "wrap the list in `all:`"),
    ({}, "when", "empty condition", None),
    ([{"stage": "A"}], "when", "got a list", "all:"),
    ("stage == 'A'", "when", "expected a condition mapping", "amount: {gt: 100000}"),
    ({"all": [{"stage": "A"}, 5]}, "when.all[1]", "expected a condition mapping", None),
]


@pytest.mark.parametrize(("spec", "key", "message", "hint"), COMPILE_ERRORS)
def test_compile_errors(spec: Any, key: str, message: str, hint: str | None) -> None:
    errors = compile_error(spec).errors
    assert [e.key for e in errors] == [key]
    assert message in errors[0].message
    if hint is not None:
        assert errors[0].hint is not None and hint in errors[0].hint


def test_compile_reports_every_error_not_just_the_first() -> None:
    errors = compile_error(
        {"all": [{"amonut": {"gt": 1}}, {"stage": {"gtt": 1}}, {"score": {"lt": "x"}}]}
    ).errors
    assert [e.key for e in errors] == ["when.all[0].amonut", "when.all[1].stage.gtt", "when.all[2].score.lt"]
