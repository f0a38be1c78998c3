"""Approver resolution and required-approval counts (connector.approvals.chain)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from connector.approvals.chain import assign_step, required_approvals, resolve_approvers
from connector.approvals.errors import ChainError
from connector.approvals.spec import (
    ApproverSource,
    FieldApprovers,
    RoleApprovers,
    StepMode,
    StepSpec,
    UserApprovers,
    ValueMapApprovers,
)

ROLES: dict[str, tuple[str, ...]] = {
    "finance": ("fin1", "fin2"),
    "legal": ("legal1",),
    "empty": (),
}


def step(*sources: ApproverSource, mode: StepMode = "all", **kwargs: Any) -> StepSpec:
    return StepSpec(name="Review", mode=mode, approvers=tuple(sources), **kwargs)


def resolve(*sources: ApproverSource, values: dict[str, Any] | None = None) -> tuple[str, ...]:
    return resolve_approvers(step(*sources), values or {}, ROLES)


PRODUCT_MAP = ValueMapApprovers(
    field="product_line",
    mapping={
        "Hardware": (UserApprovers(("hw_lead",)),),
        "Software": (RoleApprovers("finance"),),
        "Services": (FieldApprovers("owner_manager"),),
    },
    default=(UserApprovers(("cfo",)),),
)


@pytest.mark.parametrize(
    ("sources", "values", "expected"),
    [
        pytest.param((UserApprovers(("u2", "u1")),), {}, ("u2", "u1"), id="fixed-users-keep-order"),
        pytest.param((RoleApprovers("finance"),), {}, ("fin1", "fin2"), id="role"),
        pytest.param((FieldApprovers("owner"),), {"owner": "005A"}, ("005A",), id="field-single-id"),
        pytest.param((FieldApprovers("owner"),), {"owner": 42}, ("42",), id="field-numeric-id"),
        pytest.param((FieldApprovers("cc"),), {"cc": ["a", "b"]}, ("a", "b"), id="field-list"),
        pytest.param((FieldApprovers("cc"),), {"cc": " a ;b;; c "}, ("a", "b", "c"), id="field-semicolons"),
        pytest.param(
            (UserApprovers(("fin2",)), RoleApprovers("finance"), FieldApprovers("owner")),
            {"owner": "fin1"},
            ("fin2", "fin1"),
            id="dedupe-across-sources-first-seen-order",
        ),
        pytest.param(
            (FieldApprovers("owner_manager"), RoleApprovers("legal")),
            {"owner_manager": None},
            ("legal1",),
            id="empty-field-contributes-nobody",
        ),
        pytest.param(
            (RoleApprovers("empty"), UserApprovers(("x",))), {}, ("x",), id="empty-role-contributes-nobody"
        ),
        pytest.param((PRODUCT_MAP,), {"product_line": "Hardware"}, ("hw_lead",), id="value-map-single"),
        pytest.param(
            (PRODUCT_MAP,),
            {"product_line": "Hardware;Software"},
            ("hw_lead", "fin1", "fin2"),
            id="value-map-multiselect-text",
        ),
        pytest.param(
            (PRODUCT_MAP,),
            {"product_line": ["Software", "Services"], "owner_manager": "mgr"},
            ("fin1", "fin2", "mgr"),
            id="value-map-list-with-field-source",
        ),
        pytest.param(
            (PRODUCT_MAP,), {"product_line": "Consulting"}, ("cfo",), id="value-map-unmapped-default"
        ),
        pytest.param(
            (PRODUCT_MAP,),
            {"product_line": "Hardware;Consulting"},
            ("hw_lead", "cfo"),
            id="value-map-unmapped-value-among-mapped-adds-default",
        ),
        pytest.param((PRODUCT_MAP,), {"product_line": None}, ("cfo",), id="value-map-empty-field-default"),
    ],
)
def test_resolve_approvers(
    sources: tuple[ApproverSource, ...], values: dict[str, Any], expected: tuple[str, ...]
) -> None:
    assert resolve(*sources, values=values) == expected


def test_unknown_role_is_an_error_even_when_others_resolve() -> None:
    with pytest.raises(ChainError) as err:
        resolve(UserApprovers(("u1",)), RoleApprovers("finanse"))
    assert err.value.step == "Review"
    assert "finanse" in str(err.value) and "finance" in str(err.value)


@pytest.mark.parametrize(
    ("sources", "values"),
    [
        pytest.param((FieldApprovers("owner_manager"),), {}, id="missing-field"),
        pytest.param((FieldApprovers("owner_manager"),), {"owner_manager": " ; "}, id="blank-ids"),
        pytest.param((RoleApprovers("empty"),), {}, id="empty-role"),
        pytest.param(
            (ValueMapApprovers("product_line", {"Hardware": (UserApprovers(("hw",)),)}),),
            {"product_line": "Other"},
            id="value-map-without-default",
        ),
        pytest.param((), {}, id="no-sources"),
    ],
)
def test_nobody_resolved_names_step_and_sources(sources: tuple[ApproverSource, ...], values: dict) -> None:
    with pytest.raises(ChainError) as err:
        resolve(*sources, values=values)
    assert err.value.step == "Review"
    assert "nobody" in str(err.value)
    for source in sources:
        assert repr(getattr(source, "field", getattr(source, "role", ""))) in err.value.source


def test_unsupported_field_value_type_is_an_error() -> None:
    with pytest.raises(ChainError, match="dict"):
        resolve(FieldApprovers("owner"), values={"owner": {"id": "1"}})


def test_set_values_resolve_in_sorted_order() -> None:
    assert resolve(FieldApprovers("cc"), values={"cc": {"b", "a", "c"}}) == ("a", "b", "c")


@pytest.mark.parametrize(
    ("mode", "kwargs", "count", "expected"),
    [
        ("one", {}, 1, 1),
        ("any", {}, 5, 1),
        ("all", {}, 4, 4),
        ("quorum", {"quorum_count": 2}, 3, 2),
        ("quorum", {"quorum_count": 3}, 3, 3),
        ("quorum", {"quorum_percent": Decimal("60")}, 3, 2),  # 1.8 rounds up
        ("quorum", {"quorum_percent": Decimal("50")}, 4, 2),  # exact
        ("quorum", {"quorum_percent": Decimal("34")}, 3, 2),  # 1.02 rounds up
        ("quorum", {"quorum_percent": Decimal("33.3")}, 3, 1),  # 0.999 rounds up to 1
        ("quorum", {"quorum_percent": Decimal("100")}, 3, 3),
        ("quorum", {"quorum_percent": Decimal("1")}, 3, 1),
    ],
)
def test_required_approvals(mode: StepMode, kwargs: dict, count: int, expected: int) -> None:
    assert required_approvals(step(UserApprovers(("x",)), mode=mode, **kwargs), count) == expected


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"quorum_count": 4}, id="count-above-assigned"),
        pytest.param({"quorum_count": 0}, id="count-zero"),
        pytest.param({"quorum_percent": Decimal("0")}, id="percent-zero"),
        pytest.param({"quorum_percent": Decimal("101")}, id="percent-above-100"),
        pytest.param({}, id="neither"),
        pytest.param({"quorum_count": 2, "quorum_percent": Decimal("50")}, id="both"),
    ],
)
def test_unsatisfiable_quorum_is_a_chain_error(kwargs: dict) -> None:
    with pytest.raises(ChainError) as err:
        required_approvals(step(UserApprovers(("x",)), mode="quorum", **kwargs), 3)
    assert err.value.step == "Review"


def test_one_mode_assigns_the_first_resolved_user_only() -> None:
    spec = step(FieldApprovers("owner_manager"), RoleApprovers("finance"), mode="one")
    assignment = assign_step(spec, {"owner_manager": "mgr"}, ROLES)
    assert assignment.approvers == ("mgr",)
    assert assignment.required == 1


def test_one_mode_falls_back_to_next_source_when_first_is_empty() -> None:
    spec = step(FieldApprovers("owner_manager"), RoleApprovers("finance"), mode="one")
    assert assign_step(spec, {"owner_manager": None}, ROLES).approvers == ("fin1",)


def test_assign_quorum_uses_resolved_count() -> None:
    spec = step(RoleApprovers("finance"), RoleApprovers("legal"), mode="quorum", quorum_percent=Decimal("60"))
    assignment = assign_step(spec, {}, ROLES)
    assert assignment.approvers == ("fin1", "fin2", "legal1")
    assert assignment.required == 2
