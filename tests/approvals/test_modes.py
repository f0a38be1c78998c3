"""Step-mode policies (connector.approvals.modes): the table, and each mode's decisions."""

from __future__ import annotations

import inspect
import re
from decimal import Decimal
from pathlib import Path
from typing import Any, get_args

import pytest

from connector.approvals.errors import ChainError
from connector.approvals.modes import (
    STEP_MODES,
    AllMode,
    AnyMode,
    OneMode,
    QuorumMode,
    SettingsProblem,
    StepModePolicy,
    StepSettings,
    Tally,
    check_table,
    policy_for,
)
from connector.approvals.spec import StepMode, StepSpec, UserApprovers
from connector.rules.schema import StepModel

MAPPINGS_DOC = Path(__file__).resolve().parents[2] / "docs" / "mappings.md"


# --- the table ---------------------------------------------------------------------


def test_table_has_one_policy_per_mode_the_schema_accepts() -> None:
    # `mode` is optional since service steps (kind: check/duplicate) have none
    optional = get_args(StepModel.model_fields["mode"].annotation)
    schema_modes = next(get_args(arg) for arg in optional if arg is not type(None))
    assert set(schema_modes) == set(get_args(StepMode)) == set(STEP_MODES)
    for name, policy in STEP_MODES.items():
        assert policy.name == name
        assert isinstance(policy, StepModePolicy)
        assert not inspect.isabstract(type(policy))


def test_every_policy_implements_every_method_itself() -> None:
    # Inheriting a sibling's method would hide a forgotten decision behind another mode's.
    required = StepModePolicy.__abstractmethods__
    assert required == {"settings", "assignees", "required_approvals", "decide"}
    for policy in STEP_MODES.values():
        assert required <= set(vars(type(policy))), type(policy).__name__


def test_a_policy_missing_a_method_cannot_be_created() -> None:
    class Veto(StepModePolicy):
        name = "one"

        def settings(self, quorum: Any, possible_approvers: int | None) -> StepSettings | SettingsProblem:
            return StepSettings()

        def assignees(self, resolved: tuple[str, ...]) -> tuple[str, ...]:
            return resolved

        def required_approvals(self, step: StepSpec, assigned: int) -> int:
            return assigned

    with pytest.raises(TypeError, match="decide"):
        Veto()  # type: ignore[abstract]


def test_check_table_refuses_a_missing_or_unknown_mode() -> None:
    with pytest.raises(TypeError, match=r"without a policy: \['veto'\]"):
        check_table([*STEP_MODES, "veto"], STEP_MODES)
    partial = {name: STEP_MODES[name] for name in ("one", "all", "any")}
    with pytest.raises(TypeError, match=r"without a policy: \['quorum'\].*docs/mappings.md#step-modes"):
        check_table(get_args(StepMode), partial)
    with pytest.raises(TypeError, match=r"unknown modes: \['quorum'\]"):
        check_table(("one", "all", "any"), STEP_MODES)
    with pytest.raises(TypeError, match="policy of mode 'all'"):
        check_table(("one", "all"), {"one": AllMode(), "all": AllMode()})
    check_table(get_args(StepMode), STEP_MODES)  # the real table passes


def test_policy_for_names_the_known_modes() -> None:
    assert isinstance(policy_for("quorum"), QuorumMode)
    with pytest.raises(ValueError, match=r"'quorm' is not a step mode \(known: one, all, any, quorum\)"):
        policy_for("quorm")


def test_every_mode_is_described_in_the_docs() -> None:
    text = MAPPINGS_DOC.read_text(encoding="utf-8")
    section = text.split("### Step modes", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(\w+)` \|", section, flags=re.MULTILINE))
    assert documented == set(STEP_MODES)


# --- decisions -----------------------------------------------------------------------


def tally(assigned: int, required: int, approvals: int, rejections: int) -> Tally:
    return Tally(assigned=assigned, required=required, approvals=approvals, rejections=rejections)


@pytest.mark.parametrize(
    ("mode", "votes", "expected"),
    [
        pytest.param("one", tally(1, 1, 0, 0), None, id="one-no-vote"),
        pytest.param("one", tally(1, 1, 1, 0), "approve", id="one-approves"),
        pytest.param("one", tally(1, 1, 0, 1), "reject", id="one-rejects"),
        pytest.param("any", tally(3, 1, 0, 0), None, id="any-no-vote"),
        pytest.param("any", tally(3, 1, 1, 0), "approve", id="any-first-approval"),
        pytest.param("any", tally(3, 1, 0, 1), "reject", id="any-first-rejection-with-two-left"),
        pytest.param("all", tally(3, 3, 2, 0), None, id="all-two-of-three"),
        pytest.param("all", tally(3, 3, 3, 0), "approve", id="all-everyone"),
        pytest.param("all", tally(3, 3, 0, 1), "reject", id="all-first-vote-rejects"),
        pytest.param("all", tally(3, 3, 2, 1), "reject", id="all-last-vote-rejects"),
        pytest.param("quorum", tally(3, 2, 1, 0), None, id="quorum-2of3-one-approval"),
        pytest.param("quorum", tally(3, 2, 1, 1), None, id="quorum-2of3-still-reachable"),
        pytest.param("quorum", tally(3, 2, 0, 1), None, id="quorum-2of3-one-rejection"),
        pytest.param("quorum", tally(3, 2, 2, 1), "approve", id="quorum-2of3-reached"),
        pytest.param("quorum", tally(3, 2, 0, 2), "reject", id="quorum-2of3-unreachable"),
        pytest.param("quorum", tally(3, 2, 1, 2), "reject", id="quorum-2of3-unreachable-after-approval"),
        pytest.param("quorum", tally(4, 2, 0, 2), None, id="quorum-2of4-exactly-reachable"),
        pytest.param("quorum", tally(4, 2, 0, 3), "reject", id="quorum-2of4-one-short"),
        pytest.param("quorum", tally(3, 1, 0, 2), None, id="quorum-1of3-last-can-approve"),
        pytest.param("quorum", tally(3, 1, 0, 3), "reject", id="quorum-1of3-all-rejected"),
        pytest.param("quorum", tally(3, 3, 0, 1), "reject", id="quorum-3of3-first-rejection"),
        pytest.param("quorum", tally(3, 3, 3, 0), "approve", id="quorum-3of3-everyone"),
    ],
)
def test_decide(mode: StepMode, votes: Tally, expected: str | None) -> None:
    assert STEP_MODES[mode].decide(votes) == expected


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("one", ("a",)), ("any", ("a", "b", "c")), ("all", ("a", "b", "c")), ("quorum", ("a", "b", "c"))],
)
def test_assignees(mode: StepMode, expected: tuple[str, ...]) -> None:
    assert STEP_MODES[mode].assignees(("a", "b", "c")) == expected


def quorum_step(**kwargs: Any) -> StepSpec:
    return StepSpec(name="Board", mode="quorum", approvers=(UserApprovers(("x",)),), **kwargs)


@pytest.mark.parametrize(
    ("policy", "step", "assigned", "expected"),
    [
        pytest.param(OneMode(), quorum_step(), 1, 1, id="one"),
        pytest.param(AnyMode(), quorum_step(), 4, 1, id="any"),
        pytest.param(AllMode(), quorum_step(), 4, 4, id="all"),
        pytest.param(QuorumMode(), quorum_step(quorum_count=1), 1, 1, id="count-1-of-1"),
        pytest.param(QuorumMode(), quorum_step(quorum_count=4), 4, 4, id="count-equals-assigned"),
        pytest.param(QuorumMode(), quorum_step(quorum_percent=Decimal("50")), 1, 1, id="half-of-1-rounds-up"),
        pytest.param(QuorumMode(), quorum_step(quorum_percent=Decimal("50")), 5, 3, id="half-of-5-rounds-up"),
        pytest.param(QuorumMode(), quorum_step(quorum_percent=Decimal("0.1")), 7, 1, id="tiny-share-is-1"),
        pytest.param(QuorumMode(), quorum_step(quorum_percent=Decimal("99.9")), 7, 7, id="almost-all"),
    ],
)
def test_required_approvals(policy: StepModePolicy, step: StepSpec, assigned: int, expected: int) -> None:
    assert policy.required_approvals(step, assigned) == expected


def test_quorum_above_the_assignees_is_a_chain_error_naming_the_step() -> None:
    with pytest.raises(
        ChainError, match=r"step 'Board': quorum of 2 approver\(s\): quorum of 3 can never be"
    ):
        QuorumMode().required_approvals(quorum_step(quorum_count=3), 2)


# --- settings from YAML ----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["one", "any", "all"])
def test_modes_without_settings_refuse_a_quorum(mode: StepMode) -> None:
    assert STEP_MODES[mode].settings(None, 3) == StepSettings()
    problem = STEP_MODES[mode].settings(2, 3)
    assert problem == SettingsProblem(
        "quorum", f"`quorum` only applies to `mode: quorum` (this step is `{mode}`)"
    )


@pytest.mark.parametrize(
    ("quorum", "possible", "expected"),
    [
        pytest.param(2, 3, StepSettings(quorum_count=2), id="count"),
        pytest.param(3, 3, StepSettings(quorum_count=3), id="count-equals-possible"),
        pytest.param(5, None, StepSettings(quorum_count=5), id="count-unknown-possible"),
        pytest.param(" 2 ", 3, StepSettings(quorum_count=2), id="count-as-text"),
        pytest.param("60%", 3, StepSettings(quorum_percent=Decimal("60")), id="percent"),
        pytest.param(" 33.3 % ", 3, StepSettings(quorum_percent=Decimal("33.3")), id="percent-spaces"),
        pytest.param(
            "100%", 0, StepSettings(quorum_percent=Decimal("100")), id="percent-not-checked-statically"
        ),
    ],
)
def test_quorum_settings(quorum: Any, possible: int | None, expected: StepSettings) -> None:
    assert QuorumMode().settings(quorum, possible) == expected


@pytest.mark.parametrize(
    "quorum",
    [None, 0, -1, True, Decimal("1.5"), "0", "two", "0%", "150%", "abc%", "nan%", "inf%", "-5%", [2]],
)
def test_bad_quorum_is_a_problem_with_a_hint(quorum: Any) -> None:
    problem = QuorumMode().settings(quorum, 3)
    assert isinstance(problem, SettingsProblem)
    assert problem.key == "quorum"
    assert problem.message == f"`mode: quorum` needs a quorum, got {quorum!r}"
    assert problem.hint is not None and "60%" in problem.hint


def test_quorum_above_the_possible_approvers_is_a_problem() -> None:
    problem = QuorumMode().settings(3, 2)
    assert problem == SettingsProblem(
        "quorum",
        "quorum 3 is more than the 2 possible approvers of this step",
        "use at most 2, or add approvers",
    )
