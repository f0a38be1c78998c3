"""Step modes as policies: one object per ``mode`` a step may have, looked up in ``STEP_MODES``.

What each mode means is written once, in docs/mappings.md ("Step modes"); this module is
that text as code. Every policy answers the same questions, the abstract methods of
``StepModePolicy``:

* ``settings``: what the mode takes from the step's YAML (only ``quorum`` takes ``quorum:``),
  checked when the mapping loads;
* ``assignees``: which of the resolved approvers are asked;
* ``required_approvals``: how many approvals approve the step, once it is assigned;
* ``decide``: whether the votes so far decide the step, and how (what a rejection means).

A policy that misses a method cannot be instantiated, so this module fails at import, and
so it does when ``spec.StepMode`` (the names the schema accepts) and the table disagree;
tests/approvals/test_modes.py checks both. Pure: no I/O.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from types import MappingProxyType
from typing import Any, ClassVar, Literal, get_args

from connector.approvals.errors import ChainError
from connector.approvals.spec import StepMode, StepSpec

Decision = Literal["approve", "reject"]
DECISIONS: tuple[Decision, ...] = get_args(Decision)
DOCS = "docs/mappings.md#step-modes"


@dataclass(frozen=True)
class StepSettings:
    """A mode's settings from the step's YAML, named as ``StepSpec`` stores them."""

    quorum_count: int | None = None
    quorum_percent: Decimal | None = None


@dataclass(frozen=True)
class SettingsProblem:
    """Why a step's mode settings are invalid; the loader reports it at the step's ``key``."""

    key: str
    message: str
    hint: str | None = None


@dataclass(frozen=True)
class Tally:
    """The votes cast on one round of an open step (admin overrides never get here)."""

    assigned: int  # approvers assigned when the step opened
    required: int  # approvals that approve it, fixed when the step opened
    approvals: int
    rejections: int


class StepModePolicy(ABC):
    """How one step mode assigns, sizes and decides a step. Stateless; one instance per mode."""

    name: ClassVar[StepMode]

    @abstractmethod
    def settings(self, quorum: Any, possible_approvers: int | None) -> StepSettings | SettingsProblem:
        """Check the step's YAML ``quorum`` (None when absent) for this mode.

        ``possible_approvers`` is the number of distinct people when every approver source is
        fixed (users, roles, groups), None when a record field decides who is asked.
        """

    @abstractmethod
    def assignees(self, resolved: tuple[str, ...]) -> tuple[str, ...]:
        """Who of the resolved approvers (in resolution order, never empty) is asked."""

    @abstractmethod
    def required_approvals(self, step: StepSpec, assigned: int) -> int:
        """Approvals that approve ``step`` with ``assigned`` approvers; ``ChainError`` if never reachable."""

    @abstractmethod
    def decide(self, tally: Tally) -> Decision | None:
        """``approve`` / ``reject`` when the votes so far decide the step, else None (still open)."""


class OneMode(StepModePolicy):
    """``mode: one``: a single decider, the first resolved approver."""

    name = "one"

    def settings(self, quorum: Any, possible_approvers: int | None) -> StepSettings | SettingsProblem:
        return _no_settings(self.name, quorum)

    def assignees(self, resolved: tuple[str, ...]) -> tuple[str, ...]:
        return resolved[:1]

    def required_approvals(self, step: StepSpec, assigned: int) -> int:
        return 1

    def decide(self, tally: Tally) -> Decision | None:
        return _by_count(tally)


class AllMode(StepModePolicy):
    """``mode: all``: every assignee approves."""

    name = "all"

    def settings(self, quorum: Any, possible_approvers: int | None) -> StepSettings | SettingsProblem:
        return _no_settings(self.name, quorum)

    def assignees(self, resolved: tuple[str, ...]) -> tuple[str, ...]:
        return resolved

    def required_approvals(self, step: StepSpec, assigned: int) -> int:
        return assigned

    def decide(self, tally: Tally) -> Decision | None:
        return _by_count(tally)  # required == assigned: one rejection makes it unreachable


class AnyMode(StepModePolicy):
    """``mode: any``: the first vote decides."""

    name = "any"

    def settings(self, quorum: Any, possible_approvers: int | None) -> StepSettings | SettingsProblem:
        return _no_settings(self.name, quorum)

    def assignees(self, resolved: tuple[str, ...]) -> tuple[str, ...]:
        return resolved

    def required_approvals(self, step: StepSpec, assigned: int) -> int:
        return 1

    def decide(self, tally: Tally) -> Decision | None:
        if tally.approvals >= tally.required:
            return "approve"
        return "reject" if tally.rejections else None


class QuorumMode(StepModePolicy):
    """``mode: quorum``: ``quorum: N`` approvals, or ``quorum: "P%"`` of the assignees."""

    name = "quorum"

    def settings(self, quorum: Any, possible_approvers: int | None) -> StepSettings | SettingsProblem:
        parsed = _parse_quorum(quorum)
        if parsed is None:
            hint = "write `quorum: 2` (two approvals) or `quorum: 60%` (share of the approvers)"
            return SettingsProblem("quorum", f"`mode: quorum` needs a quorum, got {quorum!r}", hint)
        count = parsed.quorum_count
        if count is not None and possible_approvers is not None and count > possible_approvers:
            message = f"quorum {count} is more than the {possible_approvers} possible approvers of this step"
            return SettingsProblem("quorum", message, f"use at most {possible_approvers}, or add approvers")
        return parsed

    def assignees(self, resolved: tuple[str, ...]) -> tuple[str, ...]:
        return resolved

    def required_approvals(self, step: StepSpec, assigned: int) -> int:
        source = f"quorum of {assigned} approver(s)"
        count, percent = step.quorum_count, step.quorum_percent
        if count is not None and percent is None:
            required = count
        elif percent is not None and count is None:
            required = _percent_of(step, Decimal(percent), assigned, source)
        else:
            raise ChainError(step.name, source, "set exactly one of quorum_count and quorum_percent")
        if not 1 <= required <= assigned:
            raise ChainError(step.name, source, f"quorum of {required} can never be reached")
        return required

    def decide(self, tally: Tally) -> Decision | None:
        return _by_count(tally)


STEP_MODES: Mapping[str, StepModePolicy] = MappingProxyType(
    {policy.name: policy for policy in (OneMode(), AllMode(), AnyMode(), QuorumMode())}
)


def check_table(mode_names: Iterable[str], table: Mapping[str, StepModePolicy]) -> None:
    """``TypeError`` unless ``table`` has exactly one policy per mode name, filed under its name."""
    names = set(mode_names)
    if names != set(table):
        missing, extra = sorted(names - set(table)), sorted(set(table) - names)
        raise TypeError(
            f"step modes without a policy: {missing}; policies for unknown modes: {extra}. "
            f"Every mode in spec.StepMode needs a policy in modes.STEP_MODES and its semantics in {DOCS}"
        )
    for name, policy in table.items():
        if policy.name != name:
            raise TypeError(f"STEP_MODES[{name!r}] is the policy of mode {policy.name!r}")


check_table(get_args(StepMode), STEP_MODES)


def policy_for(mode: str) -> StepModePolicy:
    """The policy of ``mode``; ``ValueError`` for a name that is not a step mode."""
    policy = STEP_MODES.get(mode)
    if policy is None:
        known = ", ".join(STEP_MODES)
        raise ValueError(f"{mode!r} is not a step mode (known: {known}); see {DOCS}")
    return policy


def _no_settings(mode: str, quorum: Any) -> StepSettings | SettingsProblem:
    if quorum is not None:
        return SettingsProblem("quorum", f"`quorum` only applies to `mode: quorum` (this step is `{mode}`)")
    return StepSettings()


def _by_count(tally: Tally) -> Decision | None:
    """Approved at ``required`` approvals; rejected once those who have not rejected can't reach it."""
    if tally.approvals >= tally.required:
        return "approve"
    if tally.assigned - tally.rejections < tally.required:
        return "reject"
    return None


def _parse_quorum(value: Any) -> StepSettings | None:
    """``2`` / ``"2"`` -> a count, ``"60%"`` -> a share in (0, 100]; None when it is neither."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return StepSettings(quorum_count=value)
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit() and int(text) >= 1:
            return StepSettings(quorum_count=int(text))
        if text.endswith("%"):
            try:
                percent = Decimal(text[:-1].strip())
            except InvalidOperation:
                return None
            if percent.is_finite() and 0 < percent <= 100:  # NaN can't even be compared
                return StepSettings(quorum_percent=percent)
    return None


def _percent_of(step: StepSpec, percent: Decimal, assigned: int, source: str) -> int:
    if not Decimal(0) < percent <= Decimal(100):
        raise ChainError(step.name, source, f"quorum_percent {percent} is not in (0, 100]")
    # Round up: "60% of 3" must mean at least 60%, i.e. 2 people, never 1.
    return math.ceil(percent * assigned / Decimal(100))
