"""Mapping keys of issue 11 items 2-3 and 7: `manager_of` / `levels`, `queue`, `same_approver`:
what they compile to, and each mistake reported with file:line and a suggestion."""

from __future__ import annotations

from pathlib import Path

import pytest

from connector.approvals.spec import ManagerApprovers, QueueApprovers
from connector.rules import load_mapping_file
from tests.rules.test_rules_loader import BASE, line_of, load_errors, write

MANAGER = "approvers: [{field: owner_manager}]"


def test_new_keys_compile(tmp_path: Path) -> None:
    text = BASE.replace(
        MANAGER, "approvers: [{manager_of: owner_manager, levels: 2}, {queue: Finance Queue}]"
    )
    text = text.replace(
        "    restart_on_change: [amount]", "    restart_on_change: [amount]\n    same_approver: ask_once"
    )
    spec = load_mapping_file(write(tmp_path, "opp.yaml", text))
    rule = spec.rules[0]
    assert rule.same_approver == "ask_once"
    assert rule.steps[0].approvers == (ManagerApprovers("owner_manager", 2), QueueApprovers("Finance Queue"))


def test_defaults(tmp_path: Path) -> None:
    text = BASE.replace(MANAGER, "approvers: [{manager_of: owner_manager}]")
    rule = load_mapping_file(write(tmp_path, "opp.yaml", text)).rules[0]
    assert rule.same_approver == "ask_each_step"
    assert rule.steps[0].approvers == (ManagerApprovers("owner_manager", 1),)


CASES = [
    (
        "approvers: [{manager_of: approver}]",
        "rules[0].steps[0].approvers[0].manager_of",
        "is for escalation targets",
        "{manager_of: owner}",
    ),
    (
        "approvers: [{manager_of: ownr}]",
        "rules[0].steps[0].approvers[0].manager_of",
        "unknown field `ownr`",
        "declare it",
    ),
    (
        "approvers: [{manager_of: amount}]",
        "rules[0].steps[0].approvers[0].manager_of",
        "field `amount` is money",
        None,
    ),
    (
        "approvers: [{field: owner_manager, levels: 2}]",
        "rules[0].steps[0].approvers[0]",
        "`levels` only goes with `manager_of`",
        "{manager_of: owner, levels: 2}",
    ),
    (
        "approvers: [{manager_of: owner_manager, levels: 0}]",
        "rules[0].steps[0].approvers[0]",
        "`levels` must be 1 to 10",
        "levels: 2",
    ),
    (
        "approvers: [{queue: Finance, user: 005X}]",
        "rules[0].steps[0].approvers[0]",
        "exactly one of",
        None,
    ),
    (
        "approvers: [{queu: Finance}]",
        "rules[0].steps[0].approvers[0].queu",
        "unknown key `queu`",
        "did you mean `queue`?",
    ),
]


@pytest.mark.parametrize(("new", "key", "message", "hint"), CASES)
def test_mistakes_name_file_line_and_a_fix(
    tmp_path: Path, new: str, key: str, message: str, hint: str | None
) -> None:
    text = BASE.replace(MANAGER, new, 1)
    path = write(tmp_path, "opp.yaml", text)
    errors = [e for e in load_errors(path) if e.key == key]
    assert errors, [str(e) for e in load_errors(path)]
    error = errors[0]
    assert error.line == line_of(text, new)
    assert message in error.message, str(error)
    if hint is not None:
        assert error.hint is not None and hint in error.hint, str(error)
    assert str(error).startswith(f"{path}:{error.line}: {key}: ")


def test_same_approver_typo_suggests_the_value(tmp_path: Path) -> None:
    text = BASE.replace("    expires_after: 180d", "    expires_after: 180d\n    same_approver: ask_onse")
    path = write(tmp_path, "opp.yaml", text)
    (error,) = [e for e in load_errors(path) if e.key == "rules[0].same_approver"]
    assert error.line == line_of(text, "ask_onse")
    assert "expected `ask_once` or `ask_each_step`" in error.message or "ask_once" in error.message
    assert error.hint is not None and "`ask_once`" in error.hint


def test_same_approver_in_a_step_says_where_it_belongs(tmp_path: Path) -> None:
    text = BASE.replace("        mode: one\n", "        mode: one\n        same_approver: ask_once\n")
    path = write(tmp_path, "opp.yaml", text)
    (error,) = [e for e in load_errors(path) if e.key.endswith("same_approver")]
    assert error.hint is not None and "belongs to a rule" in error.hint
