"""Smart re-approval: which steps keep an earlier approval when a request restarts or a
rejected record is resubmitted. Pure: no clock, no I/O.

A step keeps its approval when all of these hold (and says so in the history):

* smart re-approval is on for it: the step's ``smart_reapproval`` or else the rule's;
* its latest activation in the earlier request was approved (by votes, or carried over
  itself), so a rejected, cancelled, skipped or never-reached step is asked again;
* none of its inputs changed: the fields its ``when`` and its approvers read plus its own
  ``inputs:`` (``StepSpec.inputs``) hold the values the earlier request was decided on;
* it resolves to the same approvers as when it was approved (a role edited in the mapping
  file, say, asks the new people).

Whether the step applies at all is judged by the chain as usual: a step whose inputs are
unchanged applies exactly when it applied before.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from connector.approvals.chain import assign_step
from connector.approvals.errors import ChainError
from connector.approvals.lifecycle import ApprovalRequest, Roles, StepState, Vote
from connector.approvals.spec import RuleSpec, StepSpec


def keeps_approval(rule: RuleSpec, step: StepSpec) -> bool:
    """Whether smart re-approval applies to ``step`` (its own setting wins over the rule's)."""
    return rule.smart_reapproval if step.smart_reapproval is None else step.smart_reapproval


def carried_steps(
    rule: RuleSpec, before: ApprovalRequest, values: Mapping[str, Any], roles: Roles
) -> dict[int, str]:
    """Step index -> why it keeps its approval, judged against ``before`` (the request being
    restarted, or the rejected one a resubmission follows) and the record's new ``values``
    (canonical names)."""
    kept: dict[int, str] = {}
    for index, step in enumerate(rule.steps):
        if not keeps_approval(rule, step):
            continue
        row = _latest_row(before, index)
        if row is None or row.status != "approved" or row.name != step.name:
            continue
        if any(_differs(values, before.record, name) for name in step.inputs):
            continue
        try:
            approvers = assign_step(step, {**before.record, **values}, roles).approvers
        except ChainError:
            continue  # nobody to approve it now: the chain reports that when it opens the step
        if set(approvers) != set(row.approvers):
            continue
        kept[index] = _reason(before, row, step)
    return kept


def _reason(before: ApprovalRequest, row: StepState, step: StepSpec) -> str:
    voters = [v.approver for v in _votes(before, row) if v.decision == "approve"]
    by = f"approved by {', '.join(voters)}" if voters else "approved earlier (carried over)"
    inputs = ", ".join(sorted(step.inputs)) if step.inputs else "none (no criteria or field approvers)"
    return f"{by} in request {before.id}; unchanged inputs: {inputs}"


def _votes(request: ApprovalRequest, row: StepState) -> list[Vote]:
    return [v for v in request.votes if v.step_index == row.index and v.round == row.round]


def _differs(values: Mapping[str, Any], before: Mapping[str, Any], name: str) -> bool:
    # A field missing from a partial payload is no evidence of a change (as for restarts).
    return name in values and values[name] != before.get(name)


def _latest_row(request: ApprovalRequest, index: int) -> StepState | None:
    rows = [s for s in request.steps if s.index == index]
    return max(rows, key=lambda s: s.round) if rows else None
