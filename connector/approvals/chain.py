"""Approver resolution: which user ids must act on a step, and how many approvals it needs.

Resolution rules
----------------
* Sources are resolved in the order the step lists them; the result keeps first-seen
  order and drops duplicates, so the same person reached through a role and a field
  counts once.
* ``UserApprovers``: the fixed ids, as given.
* ``RoleApprovers``: the ids of ``roles[role]``. A role missing from the mapping's roles
  is a configuration error and always raises ``ChainError`` (even when other sources
  resolve people), because a typo would otherwise silently drop approvers. A role that
  exists but is empty contributes nobody.
* ``FieldApprovers``: the record value may be one id, a list of ids, or ``;``-separated
  ids (Salesforce multi-selects); numbers (HubSpot / Bitrix24 user ids) become strings.
  An empty field (e.g. an owner without a manager) contributes nobody.
* ``ValueMapApprovers``: every value of the field (list or ``;``-separated text) adds the
  sources mapped to it. A value with no mapping entry adds the ``default`` sources, and so
  does an empty field: every value the record holds needs someone to look at it.
* Values are compared exactly after stripping surrounding whitespace.

Nobody to approve
-----------------
If a step resolves to nobody, ``resolve_approvers`` raises ``ChainError`` naming the step
and its sources. The engine never routes such a step elsewhere: the operation that would
open the step fails and changes nothing, so the request can never sit open waiting for
nobody. ``lifecycle.open_request`` checks every applicable step up front, so a broken
chain is reported when the record is submitted, not halfway through the approval.

Modes
-----
Which of the resolved users are assigned and how many approvals a step needs depend on
its mode: see ``connector.approvals.modes`` (the semantics: docs/mappings.md#step-modes).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from connector.approvals.errors import ChainError
from connector.approvals.modes import policy_for
from connector.approvals.routing import active_queue_members, managers_above, org_of
from connector.approvals.spec import (
    ApproverSource,
    FieldApprovers,
    ManagerApprovers,
    QueueApprovers,
    RoleApprovers,
    StepSpec,
    UserApprovers,
    ValueMapApprovers,
)


@dataclass(frozen=True)
class StepAssignment:
    """Who is assigned to a step and how many approvals close it."""

    approvers: tuple[str, ...]
    required: int


def assign_step(
    step: StepSpec, values: Mapping[str, Any], roles: Mapping[str, tuple[str, ...]]
) -> StepAssignment:
    """Resolve a step's approvers and size it as its mode says (``modes.StepModePolicy``)."""
    policy = policy_for(step.mode)
    approvers = policy.assignees(resolve_approvers(step, values, roles))
    return StepAssignment(approvers=approvers, required=policy.required_approvals(step, len(approvers)))


def resolve_approvers(
    step: StepSpec, values: Mapping[str, Any], roles: Mapping[str, tuple[str, ...]]
) -> tuple[str, ...]:
    """Ordered, de-duplicated user ids for ``step``; ``ChainError`` if nobody resolves."""
    users = _dedupe(_from_sources(step.approvers, values, roles, step.name))
    if not users:
        sources = ", ".join(describe_source(s) for s in step.approvers) or "no approver sources"
        raise ChainError(step.name, sources, "resolved to nobody; nobody could approve this step")
    return users


def required_approvals(step: StepSpec, approver_count: int) -> int:
    """Approvals needed to approve ``step`` when ``approver_count`` people are assigned."""
    return policy_for(step.mode).required_approvals(step, approver_count)


def describe_source(source: ApproverSource) -> str:
    """Short human description of a source, used in error messages."""
    if isinstance(source, UserApprovers):
        return f"users {list(source.users)!r}"
    if isinstance(source, RoleApprovers):
        return f"role {source.role!r}"
    if isinstance(source, FieldApprovers):
        return f"field {source.field!r}"
    if isinstance(source, ManagerApprovers):
        return f"manager_of {source.of!r} ({source.levels} level(s))"
    if isinstance(source, QueueApprovers):
        return f"queue {source.queue!r}"
    return f"value map on field {source.field!r}"


def _from_sources(
    sources: Iterable[ApproverSource],
    values: Mapping[str, Any],
    roles: Mapping[str, tuple[str, ...]],
    step_name: str,
) -> Iterator[str]:
    for source in sources:
        yield from _from_source(source, values, roles, step_name)


def _from_source(
    source: ApproverSource,
    values: Mapping[str, Any],
    roles: Mapping[str, tuple[str, ...]],
    step_name: str,
) -> Iterator[str]:
    if isinstance(source, UserApprovers):
        yield from source.users
    elif isinstance(source, RoleApprovers):
        yield from _role_members(source, roles, step_name)
    elif isinstance(source, FieldApprovers):
        yield from _atoms(values.get(source.field), step_name, source)
    elif isinstance(source, ManagerApprovers):
        yield from _managers(source, values, roles, step_name)
    elif isinstance(source, QueueApprovers):
        yield from _queue_members(source, roles, step_name)
    else:
        yield from _from_value_map(source, values, roles, step_name)


def _role_members(
    source: RoleApprovers, roles: Mapping[str, tuple[str, ...]], step_name: str
) -> tuple[str, ...]:
    if source.role not in roles:
        known = ", ".join(sorted(roles)) or "none"
        raise ChainError(step_name, describe_source(source), f"role is not defined (known roles: {known})")
    return roles[source.role]


def _managers(
    source: ManagerApprovers, values: Mapping[str, Any], roles: Mapping[str, tuple[str, ...]], step_name: str
) -> Iterator[str]:
    """Managers above each user in the field; a user without one contributes nobody."""
    org = org_of(roles)
    if org is None:
        raise ChainError(step_name, describe_source(source), "needs the user directory (manager chain)")
    for user in _atoms(values.get(source.of), step_name, source):
        yield from managers_above(org, user, source.levels)


def _queue_members(
    source: QueueApprovers, roles: Mapping[str, tuple[str, ...]], step_name: str
) -> tuple[str, ...]:
    org = org_of(roles)
    if org is None:
        raise ChainError(step_name, describe_source(source), "needs the user directory (CRM queues)")
    members = active_queue_members(org, source.queue)
    if members is None:
        known = ", ".join(org.queue_names()[:20]) or "none read yet; run `crm-approvals directory refresh`"
        raise ChainError(step_name, describe_source(source), f"the CRM has no such queue (known: {known})")
    return members


def _from_value_map(
    source: ValueMapApprovers,
    values: Mapping[str, Any],
    roles: Mapping[str, tuple[str, ...]],
    step_name: str,
) -> Iterator[str]:
    keys = _atoms(values.get(source.field), step_name, source)
    if not keys:
        yield from _from_sources(source.default, values, roles, step_name)
    for key in keys:
        mapped = source.mapping.get(key)
        yield from _from_sources(source.default if mapped is None else mapped, values, roles, step_name)


def _atoms(value: Any, step_name: str, source: ApproverSource) -> tuple[str, ...]:
    """A field value as a tuple of non-empty strings (ids or picklist values)."""
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(";") if part.strip())
    if isinstance(value, list | tuple):
        return tuple(atom for item in value for atom in _atoms(item, step_name, source))
    if isinstance(value, set | frozenset):
        # Sets have no order; sort so the assignment is reproducible.
        return tuple(sorted(atom for item in value for atom in _atoms(item, step_name, source)))
    if isinstance(value, bool):
        return ("true" if value else "false",)
    if isinstance(value, int | Decimal | float):
        return (str(value),)
    raise ChainError(step_name, describe_source(source), f"unsupported value type {type(value).__name__}")


def _dedupe(users: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(users))
