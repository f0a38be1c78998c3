"""Whom an escalation names: managers from the user directory, or a role/group of the mapping.

`manager_of` is the one place escalation asks for someone's manager; walking further up the
hierarchy (levels, skipping inactive people) belongs there.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from sqlalchemy.orm import Session

from connector.approvals.lifecycle import ApprovalRequest, StepState, step_votes
from connector.approvals.timers import Resolved, TargetResolver
from connector.approvals.timing import EscalationTarget, ManagerTarget
from connector.directory import Person

OWNER_FIELDS = ("owner", "submitter")  # canonical fields naming the record's owner, first found wins


class ManagerDirectory(Protocol):
    def manager_of(
        self, connection: str, user_id: str, *, session: Session | None = None
    ) -> Person | None: ...


def manager_of(directory: ManagerDirectory, connection: str, user_id: str) -> str | None:
    """The id of the person's active manager as the CRM records it; None when none is known."""
    manager = directory.manager_of(connection, user_id)
    return manager.id if manager is not None and manager.active else None


def target_resolver(
    directory: ManagerDirectory, connection: str, roles: Mapping[str, tuple[str, ...]]
) -> TargetResolver:
    def resolve(target: EscalationTarget, request: ApprovalRequest, row: StepState) -> Resolved:
        if not isinstance(target, ManagerTarget):
            members = roles.get(target.role, ())
            return Resolved(members, None if members else f"role {target.role!r} has no members")
        if target.of == "owner":
            owner = next(
                (str(request.record[f]) for f in OWNER_FIELDS if request.record.get(f)), request.submitter
            )
            found = manager_of(directory, connection, owner)
            return Resolved(
                (found,) if found else (), None if found else f"no manager of {owner} in the directory"
            )
        voted = {v.approver for v in step_votes(request, row)}
        waiting = [a for a in row.approvers if a not in voted]
        managers = tuple(
            dict.fromkeys(m for m in (manager_of(directory, connection, a) for a in waiting) if m)
        )
        note = None if managers else f"no manager of {', '.join(waiting) or 'the approvers'} in the directory"
        return Resolved(managers, note)

    return resolve
