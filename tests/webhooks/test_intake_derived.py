"""What the intake works out once per configuration object instead of per delivery
(webhooks/intake.py `derived`), the storability walk every delivery's values take, and the
answer every stored delivery gets."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import pytest
from flask import Flask, jsonify

from connector.config import ConnectionConfig
from connector.storage.inbox import AcceptResult
from webhooks.intake import MAX_JSON_DEPTH, MAX_JSON_DIGITS, check_object, derived, stored_answer, unstorable


def test_derived_values_belong_to_one_configuration_object() -> None:
    calls: list[str] = []

    def compute(label: str) -> Any:
        def run() -> str:
            calls.append(label)
            return label

        return run

    first = ConnectionConfig("crm", "sandbox", {"OBJECTS": "deal"})
    equal_but_new = ConnectionConfig("crm", "sandbox", {"OBJECTS": "deal"})
    assert derived(first, "x", compute("a")) == "a"
    assert derived(first, "x", compute("b")) == "a"  # worked out once for this object
    assert derived(first, "y", compute("c")) == "c"  # another fact of the same object
    assert derived(equal_but_new, "x", compute("d")) == "d"  # another object: its own value
    assert calls == ["a", "c", "d"]


def test_another_connection_object_is_checked_against_its_own_objects() -> None:
    deals = ConnectionConfig("crm", "sandbox", {"OBJECTS": "Deal,contact"})
    tickets = ConnectionConfig("crm", "sandbox", {"OBJECTS": "ticket"})
    assert check_object(deals, "deal") == "Deal"
    assert check_object(deals, "CONTACT") == "contact"
    assert check_object(tickets, "ticket") == "ticket"
    with pytest.raises(Exception, match="does not accept 'deal'"):
        check_object(tickets, "deal")


DEEP: Any = "leaf"
for _ in range(MAX_JSON_DEPTH):
    DEEP = [DEEP]


@pytest.mark.parametrize(
    ("value", "nul", "problem"),
    [
        ({"a": "b", "n": [1, 2.5, None, True]}, True, None),
        (OrderedDict(a=["x", ("y", "z")]), True, None),
        ([DEEP], False, "nests deeper"),
        (DEEP, False, None),
        ({"a": "\x00"}, True, "NUL"),
        ({"a": "\x00"}, False, None),
        ({"a\x00": 1}, True, "NUL"),
        (("x", "\x00"), True, "NUL"),
        (OrderedDict(a="\ud800"), False, "surrogate"),
        (["\x00\ud800"], True, "surrogate"),  # both: the surrogate is named
        ([10**MAX_JSON_DIGITS - 1], True, None),
        ([10**MAX_JSON_DIGITS], True, "digits"),
        ({"a": -(10**MAX_JSON_DIGITS)}, True, "digits"),
        ([float("nan")], True, "NaN"),
        ({"a": {"b": [float("inf")]}}, True, "NaN"),
        (float("-inf"), True, "NaN"),
        ("\ud800", False, "surrogate"),
        (10**MAX_JSON_DIGITS, True, "digits"),
    ],
)
def test_unstorable_names_what_the_database_would_refuse(value: Any, nul: bool, problem: str | None) -> None:
    found = unstorable(value, nul=nul)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


@pytest.mark.parametrize(("accepted", "duplicates", "status"), [(1, 0, 202), (0, 2, 200), (12, 3, 202)])
def test_the_stored_answer_is_what_jsonify_wrote(accepted: int, duplicates: int, status: int) -> None:
    with Flask("answer").app_context():
        answer = stored_answer(AcceptResult(accepted=accepted, duplicates=duplicates))
        before = jsonify(accepted=accepted, duplicates=duplicates)
        assert (answer.get_data(), answer.headers, answer.status_code) == (
            before.get_data(),
            before.headers,
            status,
        )
        assert stored_answer(AcceptResult(accepted=0, duplicates=1), 200).status_code == 200
