"""Compiling a step's timing keys (remind_every, remind_max, escalate_after, escalate_to,
escalate_mode, timeout) into ``connector.approvals.timing.StepTiming``, with every mistake
reported at its line with a suggestion."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Protocol

from connector.approvals.business_time import CalendarTime
from connector.approvals.spec import RoleApprovers
from connector.approvals.timing import (
    Escalation,
    EscalationTarget,
    ManagerTarget,
    Reminders,
    RoleTarget,
    StepTiming,
    Timeout,
    TimerDuration,
    TimerDurationError,
    parse_timer_duration,
)
from connector.rules.errors import ErrorCollector, KeyPath
from connector.rules.schema import EscalateToModel, StepModel

_DURATION_HINT = (
    "e.g. `{key}: 24h` (units: min, h, d, w; business time when the connection sets working hours)"
)


class _Builder(Protocol):
    errors: ErrorCollector

    def role_ref(self, name: str, path: KeyPath, kind: str) -> RoleApprovers | None: ...


def step_timing(step: StepModel, path: KeyPath, builder: _Builder) -> StepTiming | None:
    """The step's timing, or None when it sets none (errors go to ``builder.errors``)."""
    errors = builder.errors
    reminders = _reminders(step, path, errors)
    escalation = _escalation(step, path, builder)
    timeout = _timeout(step, path, builder, escalation)
    _check_order(step, path, errors, reminders, escalation, timeout)
    if reminders is None and escalation is None and timeout is None:
        return None
    return StepTiming(reminders, escalation, timeout)


def _duration(value: Any, path: KeyPath, errors: ErrorCollector, key: str) -> TimerDuration | None:
    try:
        return parse_timer_duration(value)
    except TimerDurationError as exc:
        errors.add(path, f"{exc}, got {value!r}", _DURATION_HINT.format(key=key))
        return None


def _reminders(step: StepModel, path: KeyPath, errors: ErrorCollector) -> Reminders | None:
    if step.remind_every is None:
        if step.remind_max is not None:
            hint = "add `remind_every: 24h` (how often), or remove `remind_max`"
            errors.add(path + ("remind_max",), "`remind_max` needs `remind_every`", hint)
        return None
    every = _duration(step.remind_every, path + ("remind_every",), errors, "remind_every")
    if step.remind_max is not None and step.remind_max < 1:
        hint = "use 1 or more, or leave `remind_max` out to remind until the step closes"
        errors.add(path + ("remind_max",), f"`remind_max` must be at least 1, got {step.remind_max}", hint)
        return None
    return Reminders(every, step.remind_max) if every is not None else None


def _target(model: EscalateToModel, path: KeyPath, builder: _Builder) -> EscalationTarget | None:
    if model.manager_of is not None:
        return ManagerTarget(model.manager_of)
    kind, name = ("role", model.role) if model.role is not None else ("group", model.group)
    assert name is not None  # the schema requires exactly one
    found = builder.role_ref(name, path + (kind,), kind)
    return RoleTarget(found.role) if found is not None else None


def _escalation(step: StepModel, path: KeyPath, builder: _Builder) -> Escalation | None:
    errors = builder.errors
    timeout_escalates = step.timeout is not None and step.timeout.action == "escalate"
    if step.escalate_after is None:
        if step.escalate_to is not None and not timeout_escalates:
            hint = "add `escalate_after: 48h` (when), or `timeout: {after: 5d, action: escalate}`"
            errors.add(path + ("escalate_to",), "`escalate_to` needs `escalate_after`", hint)
        if "escalate_mode" in step.model_fields_set and not timeout_escalates:
            errors.add(
                path + ("escalate_mode",), "`escalate_mode` needs `escalate_after`", "add `escalate_after`"
            )
        return None
    after = _duration(step.escalate_after, path + ("escalate_after",), errors, "escalate_after")
    if step.escalate_to is None:
        hint = "add e.g. `escalate_to: {manager_of: approver}` (or owner, a role or a group)"
        errors.add(
            path + ("escalate_after",), "`escalate_after` needs `escalate_to`: whom to escalate to", hint
        )
        return None
    target = _target(step.escalate_to, path + ("escalate_to",), builder)
    if after is None or target is None:
        return None
    return Escalation(after, target, step.escalate_mode)


def _timeout(
    step: StepModel, path: KeyPath, builder: _Builder, escalation: Escalation | None
) -> Timeout | None:
    model = step.timeout
    if model is None:
        return None
    here = path + ("timeout",)
    if model.after is None:
        builder.errors.add(here, "`timeout` needs `after`", "e.g. `timeout: {after: 5d, action: reject}`")
        return None
    after = _duration(model.after, here + ("after",), builder.errors, "after")
    target = _target(model.to, here + ("to",), builder) if model.to is not None else None
    if model.action == "escalate" and model.to is None and step.escalate_to is None:
        hint = "add `to: {manager_of: approver}` under `timeout`, or `escalate_to` on the step"
        builder.errors.add(here + ("action",), "`action: escalate` needs a target", hint)
        return None
    if model.action != "escalate" and (model.to is not None or "mode" in model.model_fields_set):
        key = "to" if model.to is not None else "mode"
        hint = "`to` and `mode` only go with `action: escalate`"
        builder.errors.add(here + (key,), f"`{key}` has no effect with `action: {model.action}`", hint)
        return None
    if after is None or (model.to is not None and target is None):
        return None
    if (
        model.action == "escalate"
        and model.to is None
        and escalation is None
        and step.escalate_to is not None
    ):
        target = _target(step.escalate_to, path + ("escalate_to",), builder)
        if target is None:
            return None
    reason = model.reason.strip() if model.reason and model.reason.strip() else None
    return Timeout(
        after, model.action, reason, target, model.mode if model.to is not None else step.escalate_mode
    )


def _check_order(
    step: StepModel,
    path: KeyPath,
    errors: ErrorCollector,
    reminders: Reminders | None,
    escalation: Escalation | None,
    timeout: Timeout | None,
) -> None:
    """A time-out that closes the step before the escalation or first reminder makes them dead
    settings: say so rather than let an admin wait for something that never happens."""
    if timeout is None or timeout.action == "escalate":
        return
    ends = _length(timeout.after)
    if escalation is not None and _length(escalation.after) >= ends:
        hint = f"make `escalate_after` shorter than the time-out ({timeout.after}), or remove it"
        errors.add(
            path + ("escalate_after",),
            f"`escalate_after: {escalation.after}` is not before `timeout.after: {timeout.after}`: "
            "the step times out first, so it would never escalate",
            hint,
        )
    if reminders is not None and _length(reminders.every) >= ends:
        hint = f"make `remind_every` shorter than the time-out ({timeout.after}), or remove it"
        errors.add(
            path + ("remind_every",),
            f"`remind_every: {reminders.every}` is not shorter than `timeout.after: {timeout.after}`: "
            "no reminder would ever go out",
            hint,
        )


def _length(duration: TimerDuration) -> timedelta:
    return duration.length(CalendarTime())
