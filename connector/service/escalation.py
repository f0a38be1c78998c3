"""Whom an escalation names: managers from the user directory, or a role/group of the mapping.

Managers are found by the same walk as `{manager_of: ...}` approvers (`routing.managers_above`):
the nearest *active* manager, passing over inactive ones.
"""

from __future__ import annotations

from collections.abc import Mapping

from connector.approvals.lifecycle import ApprovalRequest, StepState, step_votes
from connector.approvals.routing import Org, managers_above, managers_of_approvers
from connector.approvals.timers import Resolved, TargetResolver
from connector.approvals.timing import EscalationTarget, ManagerTarget

OWNER_FIELDS = ("owner", "submitter")  # canonical fields naming the record's owner, first found wins


def manager_of(org: Org, user_id: str) -> str | None:
    """The id of the person's nearest active manager; None when none is known."""
    return next(iter(managers_above(org, user_id, 1)), None)


def target_resolver(org: Org, roles: Mapping[str, tuple[str, ...]]) -> TargetResolver:
    def resolve(target: EscalationTarget, request: ApprovalRequest, row: StepState) -> Resolved:
        if not isinstance(target, ManagerTarget):
            members = roles.get(target.role, ())
            return Resolved(members, None if members else f"role {target.role!r} has no members")
        if target.of == "owner":
            owner = next(
                (str(request.record[f]) for f in OWNER_FIELDS if request.record.get(f)), request.submitter
            )
            found = manager_of(org, owner)
            return Resolved(
                (found,) if found else (), None if found else f"no manager of {owner} in the directory"
            )
        voted = {v.approver for v in step_votes(request, row)}
        waiting = [a for a in row.approvers if a not in voted]
        managers = managers_of_approvers(org, waiting)
        note = None if managers else f"no manager of {', '.join(waiting) or 'the approvers'} in the directory"
        return Resolved(managers, note)

    return resolve
