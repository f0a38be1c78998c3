"""The compiled per-step timing keys of a mapping file: reminders, escalation, time-out.

Pure data (the loader builds it, ``connector.approvals.timers`` acts on it). Semantics and
YAML: docs/mappings.md#reminders-escalation-and-time-outs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

from connector.approvals.business_time import BusinessTime, WorkingCalendar
from connector.errors import FatalError

TimerUnit = Literal["min", "h", "d", "w"]
TIMER_UNITS: tuple[TimerUnit, ...] = ("min", "h", "d", "w")
TimeoutAction = Literal["approve", "reject", "skip", "escalate"]
TIMEOUT_ACTIONS: tuple[TimeoutAction, ...] = ("approve", "reject", "skip", "escalate")
EscalationMode = Literal["add", "replace"]
ESCALATION_MODES: tuple[EscalationMode, ...] = ("add", "replace")
ManagerOf = Literal["approver", "owner"]
MANAGER_OF: tuple[ManagerOf, ...] = ("approver", "owner")

_DURATION = re.compile(r"^\s*([0-9]+)\s*(min|h|d|w)\s*$")


class TimerDurationError(FatalError, ValueError):
    """Text that is not a timer duration; the message says the expected form."""


@dataclass(frozen=True)
class TimerDuration:
    """`24h`, `30min`, `2d`, `1w`. In business time `d` is one working day's hours and `w` as
    many working days as the calendar's week has; `h` and `min` are working hours and minutes."""

    amount: int
    unit: TimerUnit

    def length(self, calendar: WorkingCalendar) -> timedelta:
        """How much time (of the calendar's kind) this is."""
        if self.unit == "min":
            return timedelta(minutes=self.amount)
        if self.unit == "h":
            return timedelta(hours=self.amount)
        days = self.amount * (7 if self.unit == "w" else 1)
        if isinstance(calendar, BusinessTime):
            per_week = len(calendar.workdays) if self.unit == "w" else 1
            return calendar.day_length * (self.amount * per_week)
        return timedelta(days=days)

    def __str__(self) -> str:
        return f"{self.amount}{self.unit}"


def parse_timer_duration(text: object) -> TimerDuration:
    """'24h' -> TimerDuration(24, 'h'); TimerDurationError says what is expected."""
    if not isinstance(text, str):
        raise TimerDurationError("expected a duration such as 30min, 24h, 2d or 1w")
    match = _DURATION.match(text)
    if not match:
        if re.match(r"^\s*[0-9]+\s*m\s*$", text):
            raise TimerDurationError("`m` is ambiguous here; write minutes as `min` (e.g. 30min)")
        raise TimerDurationError("expected a duration such as 30min, 24h, 2d or 1w")
    amount = int(match.group(1))
    if amount <= 0:
        raise TimerDurationError("a duration must be longer than zero")
    return TimerDuration(amount, match.group(2))  # type: ignore[arg-type]


@dataclass(frozen=True)
class ManagerTarget:
    """The manager (from the user directory) of the step's approvers or of the record's owner."""

    of: ManagerOf


@dataclass(frozen=True)
class RoleTarget:
    role: str  # a key of MappingSpec.roles (roles and groups share one namespace)


EscalationTarget = ManagerTarget | RoleTarget


@dataclass(frozen=True)
class Reminders:
    every: TimerDuration
    max: int | None = None  # None: until the step closes


@dataclass(frozen=True)
class Escalation:
    after: TimerDuration
    to: EscalationTarget
    mode: EscalationMode = "add"


@dataclass(frozen=True)
class Timeout:
    after: TimerDuration
    action: TimeoutAction
    reason: str | None = None  # written to the history; a default names the duration
    to: EscalationTarget | None = None  # action escalate: whom (default: the step's escalate_to)
    mode: EscalationMode = "add"


@dataclass(frozen=True)
class StepTiming:
    reminders: Reminders | None = None
    escalation: Escalation | None = None
    timeout: Timeout | None = None

    def timeout_escalation(self) -> Escalation | None:
        """What `timeout: {action: escalate}` escalates to: its own `to`, else the step's escalation."""
        if self.timeout is None or self.timeout.action != "escalate":
            return None
        if self.timeout.to is not None:
            return Escalation(self.timeout.after, self.timeout.to, self.timeout.mode)
        return self.escalation


def describe_target(target: EscalationTarget) -> str:
    if isinstance(target, ManagerTarget):
        return f"the {target.of}'s manager"
    return f"role {target.role!r}"
