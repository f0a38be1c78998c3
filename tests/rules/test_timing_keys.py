"""The step timing keys of mapping files: compiled, and every mistake at its file:line with a hint."""

from __future__ import annotations

from pathlib import Path

import pytest

from connector.approvals.timing import (
    Escalation,
    ManagerTarget,
    Reminders,
    RoleTarget,
    StepTiming,
    Timeout,
    TimerDuration,
)
from connector.rules import load_mapping_file
from tests.rules.test_rules_loader import BASE, line_of, load_errors, write

STEP = "        approvers: [{field: owner_manager}]\n"
assert STEP in BASE


def with_timing(lines: str) -> str:
    return BASE.replace(STEP, STEP + "".join(f"        {line}\n" for line in lines.strip().splitlines()), 1)


def test_timing_keys_compile(tmp_path: Path) -> None:
    text = with_timing(
        """
remind_every: 24h
remind_max: 3
escalate_after: 2d
escalate_to: {manager_of: approver}
escalate_mode: replace
timeout: {after: 1w, action: reject, reason: "No answer within a week"}
"""
    )
    spec = load_mapping_file(write(tmp_path, "opp.yaml", text))
    assert spec.rules[0].steps[0].timing == StepTiming(
        reminders=Reminders(TimerDuration(24, "h"), 3),
        escalation=Escalation(TimerDuration(2, "d"), ManagerTarget("approver"), "replace"),
        timeout=Timeout(TimerDuration(1, "w"), "reject", "No answer within a week", None, "replace"),
    )
    assert spec.rules[0].steps[1].timing is None


@pytest.mark.parametrize(
    ("lines", "target", "timeout"),
    [
        ("escalate_after: 30min\nescalate_to: owner_manager", ManagerTarget("owner"), None),
        ("escalate_after: 4h\nescalate_to: {group: finance}", RoleTarget("finance"), None),
        ("escalate_after: 4h\nescalate_to: {role: general_manager}", RoleTarget("general_manager"), None),
        (
            "timeout: {after: 3d, action: escalate, to: {manager_of: owner}, mode: replace}",
            None,
            Timeout(TimerDuration(3, "d"), "escalate", None, ManagerTarget("owner"), "replace"),
        ),
    ],
)
def test_escalation_targets(tmp_path: Path, lines: str, target: object, timeout: object) -> None:
    spec = load_mapping_file(write(tmp_path, "opp.yaml", with_timing(lines)))
    timing = spec.rules[0].steps[0].timing
    assert timing is not None
    assert (timing.escalation.to if timing.escalation else None) == target
    assert timing.timeout == timeout


ERRORS = [
    ("remind_every: 24m", "remind_every: 24m", "steps[0].remind_every", "write minutes as `min`", "24h"),
    (
        "remind_every: soon",
        "remind_every: soon",
        "steps[0].remind_every",
        "expected a duration",
        "units: min",
    ),
    ("remind_every: 0h", "remind_every: 0h", "steps[0].remind_every", "longer than zero", None),
    ("remind_max: 2", "remind_max: 2", "steps[0].remind_max", "needs `remind_every`", "remind_every: 24h"),
    ("remind_every: 1h\nremind_max: 0", "remind_max: 0", "steps[0].remind_max", "at least 1", None),
    ("remind_every: 1h\nremind_max: lots", "remind_max: lots", "steps[0].remind_max", "whole number", None),
    (
        "escalate_after: 2d",
        "escalate_after: 2d",
        "steps[0].escalate_after",
        "needs `escalate_to`",
        "manager_of",
    ),
    ("escalate_to: owner_manager", "escalate_to", "steps[0].escalate_to", "needs `escalate_after`", None),
    (
        "escalate_after: 2d\nescalate_to: boss",
        "escalate_to: boss",
        "steps[0].escalate_to",
        "unknown escalation target 'boss'",
        "manager_of: approver",
    ),
    (
        "escalate_after: 2d\nescalate_to: {manager_of: ceo}",
        "escalate_to",
        "steps[0].escalate_to.manager_of",
        "'ceo' is not allowed",
        None,
    ),
    (
        "escalate_after: 2d\nescalate_to: {role: general_manger}",
        "escalate_to",
        "steps[0].escalate_to.role",
        "unknown role `general_manger`",
        "did you mean `general_manager`?",
    ),
    (
        "escalate_after: 2d\nescalate_to: {role: finance}",
        "escalate_to",
        "steps[0].escalate_to.role",
        "unknown role `finance`",
        "`finance` is a group",
    ),
    (
        "escalate_after: 2d\nescalate_to: {role: general_manager, group: finance}",
        "escalate_to",
        "steps[0].escalate_to",
        "exactly one of",
        None,
    ),
    (
        "escalate_after: 2d\nescalate_to: owner_manager\nescalate_mode: swap",
        "escalate_mode",
        "steps[0].escalate_mode",
        "'swap' is not allowed",
        None,
    ),
    ("timeout: {action: reject}", "timeout", "steps[0].timeout", "needs `after`", "after: 5d"),
    ("timeout: {after: 2d, action: rejct}", "timeout", "steps[0].timeout.action", "not allowed", "`reject`"),
    ("timeout: {after: 2d, action: escalate}", "timeout", "steps[0].timeout.action", "needs a target", "to:"),
    (
        "timeout: {after: 2d, action: approve, to: owner_manager}",
        "timeout",
        "steps[0].timeout.to",
        "no effect with `action: approve`",
        None,
    ),
    (
        "escalate_after: 3d\nescalate_to: owner_manager\ntimeout: {after: 2d, action: reject}",
        "escalate_after",
        "steps[0].escalate_after",
        "would never escalate",
        "shorter than the time-out",
    ),
    (
        "remind_every: 1w\ntimeout: {after: 2d, action: skip}",
        "remind_every",
        "steps[0].remind_every",
        "no reminder would ever go out",
        None,
    ),
    ("timeout_after: 2d", "timeout_after", "steps[0].timeout_after", "unknown key", None),
]


@pytest.mark.parametrize(("lines", "anchor", "key", "message", "hint"), ERRORS)
def test_timing_mistakes_name_file_line_and_a_fix(
    tmp_path: Path, lines: str, anchor: str, key: str, message: str, hint: str | None
) -> None:
    text = with_timing(lines)
    path = write(tmp_path, "opp.yaml", text)
    errors = load_errors(path)
    full_key = f"rules[0].{key}"
    matching = [e for e in errors if e.key == full_key]
    assert matching, [str(e) for e in errors]
    error = matching[0]
    assert error.line == line_of(text, anchor), str(error)
    assert message in error.message, str(error)
    if hint is not None:
        assert error.hint is not None and hint in error.hint, str(error)
    assert str(error).startswith(f"{path}:{error.line}: {full_key}: ")


def test_a_timing_key_on_the_rule_says_it_belongs_to_a_step(tmp_path: Path) -> None:
    text = BASE.replace("    expires_after: 180d\n", "    expires_after: 180d\n    remind_every: 24h\n")
    [error] = load_errors(write(tmp_path, "opp.yaml", text))
    assert error.key == "rules[0].remind_every" and error.hint == "`remind_every` belongs to a step"
