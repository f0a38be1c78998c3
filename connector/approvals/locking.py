"""Record locking while a request is pending (``lock:`` of a rule). Pure: no clock, no I/O.

An edit of a locked field by anyone but an admin is answered by the rule's lock mode, one
object per mode in ``LOCK_MODES``:

* ``revert`` writes back the value the request was opened with (the request's record
  snapshot, replaced only by a restart) and records ``lock_reverted`` in the history;
* ``flag`` leaves the CRM alone and records ``lock_flagged``, for the approvers to see.

Locked fields that are also ``restart_on_change`` fields restart the request instead, and
the fields of ``crm_vote`` are the approver's to set, so neither is judged here.
An edit counts once: the field must be among the change's changed fields (the pipeline
compares with the last-seen values), so a redelivery or a later unrelated edit does not
flag the same edit again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar

from connector.approvals.lifecycle import ApprovalRequest, Outcome, TransitionKind, flag, is_active
from connector.approvals.spec import EvalContext, LockMode, RuleSpec


@dataclass(frozen=True)
class LockedEdit:
    field: str  # canonical
    opened_with: Any  # the value in the request's snapshot
    new: Any  # the value the edit set


@dataclass(frozen=True)
class LockResponse:
    outcome: Outcome  # the history row
    write_back: Mapping[str, Any]  # canonical field -> value to write to the CRM (may be empty)


class LockPolicy:
    mode: ClassVar[LockMode]
    kind: ClassVar[TransitionKind]
    verb: ClassVar[str]

    def write_back(self, edits: tuple[LockedEdit, ...]) -> dict[str, Any]:
        return {}

    def respond(
        self, request: ApprovalRequest, edits: tuple[LockedEdit, ...], editor: str | None, now: datetime
    ) -> LockResponse:
        who = editor or "an unknown user (the CRM did not say)"
        changes = "; ".join(f"{e.field}: {_shown(e.opened_with)} -> {_shown(e.new)}" for e in edits)
        note = f"locked field(s) edited by {who} while pending ({changes}); {self.verb}"
        return LockResponse(
            flag(request, self.kind, actor=editor, comment=note, now=now), self.write_back(edits)
        )


class RevertLock(LockPolicy):
    mode = "revert"
    kind = "lock_reverted"
    verb = "written back to the values the request was opened with"

    def write_back(self, edits: tuple[LockedEdit, ...]) -> dict[str, Any]:
        return {e.field: e.opened_with for e in edits}


class FlagLock(LockPolicy):
    mode = "flag"
    kind = "lock_flagged"
    verb = "kept, and shown to the approvers"


LOCK_MODES: Mapping[LockMode, LockPolicy] = {p.mode: p for p in (RevertLock(), FlagLock())}


def locked_edits(request: ApprovalRequest, rule: RuleSpec, ctx: EvalContext) -> tuple[LockedEdit, ...]:
    """Edits of the rule's locked fields in this change, against the request's snapshot."""
    if rule.lock is None or not is_active(request):
        return ()
    exempt = rule.restart_on_change | (rule.crm_vote.fields if rule.crm_vote else frozenset())
    return tuple(
        LockedEdit(name, request.record.get(name), ctx.values[name])
        for name in sorted(rule.lock.fields - exempt)
        if name in ctx.values and name in ctx.changed_fields and ctx.values[name] != request.record.get(name)
    )


def answer_edits(
    request: ApprovalRequest,
    rule: RuleSpec,
    ctx: EvalContext,
    *,
    editor: str | None,
    admins: frozenset[str],
    now: datetime,
) -> LockResponse | None:
    """The lock mode's answer to this change, or None (nothing locked edited, or an admin)."""
    if rule.lock is None or (editor is not None and editor in admins):
        return None
    edits = locked_edits(request, rule, ctx)
    if not edits:
        return None
    return LOCK_MODES[rule.lock.mode].respond(request, edits, editor, now)


def _shown(value: Any) -> str:
    return "(blank)" if value in (None, "") else repr(value) if isinstance(value, str) else str(value)
