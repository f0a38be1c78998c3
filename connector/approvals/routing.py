"""Who actually gets a step: the org chart, CRM queues and deputies. Pure: no I/O.

The lifecycle resolves approvers against ``roles`` (a mapping of role/group name -> ids).
A ``RoutingContext`` *is* that mapping, carrying three more things the caller read from
the directory and the delegation table beforehand (or reads lazily through ``Org``):

* ``org``: the manager chain and CRM queue members (``connector.directory`` implements it);
* ``deputies``: the delegations in force today (out of office: user -> deputy);
* ``today``: the date delegations are judged on.

Plain mappings keep working everywhere: sources that need the org raise ``ChainError``
saying so, and nobody has a deputy.

Delegation chains and cycles
----------------------------
A deputy who is away too hands on to their own deputy, and so on (``route``). A cycle
(A -> B -> A) is refused when it would be created (``find_cycle``), but two delegations
set in different orders with date ranges that only later overlap can still meet; routing
then keeps the step with the person it was meant for and says why, so nothing is lost.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Protocol

MAX_CHAIN = 20  # longer deputy/manager chains than this are data errors, not org charts


class Org(Protocol):
    """The directory as routing sees it (``connector.directory.service.DirectoryOrg``)."""

    def manager_id(self, user_id: str) -> str | None:
        """The user's manager id as the CRM records it; None when none or unknown."""

    def is_active(self, user_id: str) -> bool:
        """Whether the CRM lists the user as active (unknown users count as active)."""

    def queue_members(self, queue: str) -> tuple[str, ...] | None:
        """Member ids of the CRM queue/group/team/department named or id'd ``queue``;
        None when the CRM has no such queue."""

    def queue_names(self) -> tuple[str, ...]:
        """Every queue the directory knows (for error messages)."""


@dataclass(frozen=True)
class Delegation:
    """``user`` is away from ``starts_on`` to ``ends_on`` (both inclusive); ``deputy`` acts for
    them on every rule (``rule`` None) or on that rule only."""

    user: str
    deputy: str
    starts_on: date
    ends_on: date
    rule: str | None = None
    id: int | None = None

    def in_force(self, today: date) -> bool:
        return self.starts_on <= today <= self.ends_on

    def covers(self, rule: str | None) -> bool:
        return self.rule is None or rule is None or self.rule == rule


@dataclass(frozen=True)
class Route:
    """Where a step meant for ``user`` goes: ``deputy`` (``user`` itself when nobody stands
    in), through ``chain`` (user, deputy, deputy's deputy...). ``note`` explains a cycle."""

    user: str
    deputy: str
    chain: tuple[str, ...]
    note: str | None = None

    @property
    def delegated(self) -> bool:
        return self.deputy != self.user


class RoutingContext(Mapping[str, tuple[str, ...]]):
    """The mapping's roles, plus the org chart, queues and today's deputies."""

    def __init__(
        self,
        roles: Mapping[str, tuple[str, ...]],
        *,
        org: Org | None = None,
        delegations: Iterable[Delegation] = (),
        today: date | None = None,
    ) -> None:
        self.roles = roles
        self.org = org
        self.today = today
        self.delegations = tuple(d for d in delegations if today is None or d.in_force(today))

    def __getitem__(self, key: str) -> tuple[str, ...]:
        return self.roles[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.roles)

    def __len__(self) -> int:
        return len(self.roles)

    def deputy_of(self, user: str, rule: str | None) -> str | None:
        """The deputy standing in for ``user`` on ``rule`` today; a delegation for that very
        rule wins over one for every rule."""
        own = [d for d in self.delegations if d.user == user and d.covers(rule)]
        specific = [d for d in own if d.rule is not None]
        chosen = (specific or own)[:1]
        return chosen[0].deputy if chosen else None

    def route(self, user: str, rule: str | None) -> Route:
        """Follow deputies from ``user``; a cycle keeps ``user`` (see the module docstring)."""
        chain = [user]
        current = user
        for _ in range(MAX_CHAIN):
            deputy = self.deputy_of(current, rule)
            if deputy is None:
                return Route(user, current, tuple(chain))
            if deputy in chain:
                loop = " -> ".join([*chain[chain.index(deputy) :], deputy])
                note = f"deputies form a cycle ({loop}); the step stays with {user}"
                return Route(user, user, (user,), note)
            chain.append(deputy)
            current = deputy
        note = f"deputy chain longer than {MAX_CHAIN}; the step stays with {user}"
        return Route(user, user, (user,), note)


def org_of(roles: Mapping[str, tuple[str, ...]]) -> Org | None:
    return roles.org if isinstance(roles, RoutingContext) else None


def route(roles: Mapping[str, tuple[str, ...]], user: str, rule: str | None) -> Route:
    """Where ``user``'s step goes; with a plain mapping, to ``user`` itself."""
    if isinstance(roles, RoutingContext):
        return roles.route(user, rule)
    return Route(user, user, (user,))


# --- the org chart ------------------------------------------------------------------------


def managers_above(org: Org, user: str, levels: int) -> tuple[str, ...]:
    """The first ``levels`` *active* managers above ``user``, nearest first. An inactive
    manager is passed over (their own manager takes the level); the walk stops at the top
    of the chain, or at a loop in the CRM's data."""
    found: list[str] = []
    seen = {user}
    current = user
    for _ in range(MAX_CHAIN):
        if len(found) >= levels:
            break
        manager = org.manager_id(current)
        if manager is None or manager in seen:
            break
        seen.add(manager)
        if org.is_active(manager):
            found.append(manager)
        current = manager
    return tuple(found)


def managers_of_approvers(org: Org, approvers: Sequence[str], levels: int = 1) -> tuple[str, ...]:
    """``{manager_of: approver}``: the managers of a step's approvers, de-duplicated, for
    escalation targets. Approvers without a manager contribute nobody."""
    return tuple(dict.fromkeys(m for a in approvers for m in managers_above(org, a, levels)))


def active_queue_members(org: Org, queue: str) -> tuple[str, ...] | None:
    """Active members of a CRM queue; None when the CRM has no such queue."""
    members = org.queue_members(queue)
    if members is None:
        return None
    return tuple(m for m in members if org.is_active(m))


# --- delegation cycles at set time ---------------------------------------------------------


@dataclass(frozen=True)
class _Path:
    users: tuple[str, ...]
    starts_on: date
    ends_on: date
    rule: str | None = None
    via: tuple[Delegation, ...] = field(default=())


def find_cycle(existing: Iterable[Delegation], new: Delegation) -> tuple[Delegation, ...] | None:
    """The delegations that, with ``new``, would hand a step back to ``new.user`` on some day
    and rule they all share; None when ``new`` closes no cycle."""
    if new.deputy == new.user:
        return (new,)
    edges = [d for d in existing if d.id is None or d.id != new.id]
    start = _Path((new.user, new.deputy), new.starts_on, new.ends_on, new.rule, (new,))
    stack = [start]
    while stack:
        path = stack.pop()
        for d in edges:
            if d.user != path.users[-1] or not d.covers(path.rule):
                continue
            starts, ends = max(path.starts_on, d.starts_on), min(path.ends_on, d.ends_on)
            if starts > ends:
                continue
            if d.deputy == new.user:
                return (*path.via, d)
            if d.deputy in path.users or len(path.users) > MAX_CHAIN:
                continue
            stack.append(_Path((*path.users, d.deputy), starts, ends, path.rule or d.rule, (*path.via, d)))
    return None


def describe_cycle(cycle: Sequence[Delegation]) -> str:
    """`A -> B (2026-12-01..2026-12-10) -> A (...)`, for the error message."""
    if len(cycle) == 1 and cycle[0].user == cycle[0].deputy:
        return f"{cycle[0].user} cannot be their own deputy"
    parts = [cycle[0].user]
    for d in cycle:
        scope = f", rule {d.rule}" if d.rule else ""
        parts.append(f"{d.deputy} ({d.starts_on.isoformat()}..{d.ends_on.isoformat()}{scope})")
    return " -> ".join(parts)
