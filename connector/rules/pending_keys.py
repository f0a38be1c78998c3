"""Compiling and checking the rule keys about a pending request's record (issue 11 items
4-6): ``crm_vote`` (voting from a CRM field), ``lock`` (locked fields) and the step keys of
smart re-approval (``smart_reapproval``, ``inputs``). Pure: the loader's `_SpecBuilder`
passes itself in for field look-ups and error reporting (file:line and a suggestion).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from connector.approvals.spec import (
    ApproverSource,
    Criterion,
    CrmVoteSpec,
    FieldApprovers,
    LockSpec,
    ValueMapApprovers,
)
from connector.rules.errors import KeyPath
from connector.rules.schema import RuleModel, StepModel

if TYPE_CHECKING:
    from connector.rules.loader import _SpecBuilder

VOTE_FIELD_TYPES = ("string",)  # a picklist or text field the approver sets


def build_crm_vote(builder: _SpecBuilder, rule: RuleModel, path: KeyPath) -> CrmVoteSpec | None:
    model = rule.crm_vote
    assert model is not None
    where = path + ("crm_vote",)
    decision = builder.field_ref(model.decision, where + ("decision",), types=VOTE_FIELD_TYPES)
    comment = (
        builder.field_ref(model.comment, where + ("comment",), types=VOTE_FIELD_TYPES)
        if model.comment is not None
        else None
    )
    ok = decision is not None and (model.comment is None or comment is not None)
    if decision is not None and decision.is_related:
        builder.errors.add(
            where + ("decision",),
            f"`{decision.name}` is a field of a related record ({decision.api_name}); "
            "it cannot be cleared after a vote",
            "use a field of the record itself, e.g. Approval_Decision__c",
        )
        ok = False
    if decision is not None and comment is not None and decision.name == comment.name:
        builder.errors.add(where + ("comment",), "the comment field is the decision field", "name two fields")
        ok = False
    if decision is not None and decision.name in rule.restart_on_change:
        builder.errors.add(
            where + ("decision",),
            f"`{decision.name}` is also in `restart_on_change`: every vote would restart the request",
            f"remove `{decision.name}` from `restart_on_change`",
        )
        ok = False
    both = {v.casefold() for v in model.approve} & {v.casefold() for v in model.reject}
    if both:
        builder.errors.add(
            where + ("reject",),
            f"{', '.join(sorted(repr(v) for v in both))} both approves and rejects",
            "give each decision its own values",
        )
        ok = False
    if not ok or decision is None:
        return None
    return CrmVoteSpec(
        decision.name,
        comment.name if comment is not None else None,
        tuple(v.strip() for v in model.approve),
        tuple(v.strip() for v in model.reject),
    )


def build_lock(builder: _SpecBuilder, rule: RuleModel, path: KeyPath) -> LockSpec | None:
    model = rule.lock
    assert model is not None
    where = path + ("lock",)
    vote_fields = {rule.crm_vote.decision, rule.crm_vote.comment} if rule.crm_vote else set()
    fields: set[str] = set()
    ok = True
    for i, name in enumerate(model.fields):
        spec = builder.field_ref(name, where + ("fields", i))
        if spec is None:
            ok = False
            continue
        if name in fields:
            builder.errors.add(where + ("fields", i), f"`{name}` is listed twice", "list each field once")
            ok = False
        elif name in vote_fields:
            builder.errors.add(
                where + ("fields", i),
                f"`{name}` is a `crm_vote` field: approvers must be able to set it",
                f"remove `{name}` from `lock.fields`",
            )
            ok = False
        elif model.mode == "revert" and spec.is_related:
            builder.errors.add(
                where + ("fields", i),
                f"`{name}` is a field of a related record ({spec.api_name}); `revert` cannot write it back",
                "lock it with `mode: flag`, or lock a field of the record itself",
            )
            ok = False
        fields.add(name)
    return LockSpec(frozenset(fields), model.mode) if ok else None


def step_inputs(
    builder: _SpecBuilder,
    step: StepModel,
    path: KeyPath,
    when: Criterion | None,
    approvers: Sequence[ApproverSource],
) -> frozenset[str]:
    """What a step's approval depends on: the fields its `when` and approvers read and its
    own `inputs:` (unknown names are reported)."""
    read: set[str] = set()
    fields_read = getattr(when, "fields_read", None)
    if fields_read is not None:
        read.update(fields_read())
    for source in approvers:
        read.update(_approver_fields(source))
    for i, name in enumerate(step.inputs):
        if builder.field_ref(name, path + ("inputs", i)) is not None:
            read.add(name)
    return frozenset(read)


def _approver_fields(source: Any) -> set[str]:
    if isinstance(source, FieldApprovers):
        return {source.field}
    if isinstance(source, ValueMapApprovers):
        nested = [s for sources in source.mapping.values() for s in sources] + list(source.default)
        return {source.field}.union(*(_approver_fields(s) for s in nested))
    return set()
