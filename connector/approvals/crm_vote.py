"""Voting from inside the CRM (``crm_vote:`` of a rule). Pure: no clock, no I/O.

The current step's approver sets the rule's decision field (``Approval_Decision__c =
Approve``) and, optionally, a comment field. The vote is cast as the user the CRM names as
the change's author (last-modified-by), never as anyone the field's value might name. Then:

* the vote is taken: the decision (and comment) fields are cleared, ready for the next step;
* anyone else set it (not an approver of the open step, the submitter of their own request,
  a second vote, a rejection without the comment the rule needs, or the CRM did not say
  who): the fields go back to what they held before and ``crm_vote_refused`` says why;
* an unknown value (``Maybe``): the fields are cleared and ``crm_vote_refused`` names the
  values that work.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from connector.approvals.errors import ApprovalError
from connector.approvals.lifecycle import ApprovalRequest, Outcome, Roles, cast_vote, flag, is_active
from connector.approvals.spec import CrmVoteSpec, EvalContext, RuleSpec


@dataclass(frozen=True)
class CrmVoteResult:
    outcome: Outcome  # the vote, or the crm_vote_refused row
    write_back: Mapping[str, Any]  # canonical field -> value: cleared, or restored
    voted: bool


def read_crm_vote(
    request: ApprovalRequest,
    rule: RuleSpec,
    roles: Roles,
    ctx: EvalContext,
    *,
    voter: str | None,
    now: datetime,
) -> CrmVoteResult | None:
    """The vote (or refusal) this change carries; None when the decision field was not set."""
    spec = rule.crm_vote
    if spec is None or not is_active(request) or spec.decision not in ctx.changed_fields:
        return None
    raw = ctx.values.get(spec.decision)
    if raw is None or str(raw).strip() == "":
        return None  # cleared (by us, after a vote) or never set
    cleared = {name: None for name in spec.fields}
    decision = spec.decision_for(raw)
    if decision is None:
        note = f"{spec.decision} = {str(raw)[:100]!r} is not a decision; {_expected(spec)}"
        return CrmVoteResult(_refused(request, voter, note, now), cleared, voted=False)
    if voter is None:
        note = f"{spec.decision} = {raw!r} was set, but the CRM did not say by whom; no vote was cast"
        return CrmVoteResult(_refused(request, None, note, now), _restored(spec, ctx), voted=False)
    comment = ctx.values.get(spec.comment) if spec.comment else None
    try:
        outcome = cast_vote(
            request,
            rule,
            roles,
            approver=voter,
            decision=decision,
            step_index=-1 if request.current_step is None else request.current_step,
            now=now,
            comment=(str(comment).strip() or None) if comment is not None else None,
            today=ctx.today,
        )
    except ApprovalError as exc:
        note = f"{voter} set {spec.decision} = {raw!r}: not taken as a vote ({exc}); the field was reverted"
        return CrmVoteResult(_refused(request, voter, note, now), _restored(spec, ctx), voted=False)
    return CrmVoteResult(outcome, cleared, voted=True)


def _refused(request: ApprovalRequest, voter: str | None, note: str, now: datetime) -> Outcome:
    return flag(request, "crm_vote_refused", actor=voter, comment=note, now=now)


def _restored(spec: CrmVoteSpec, ctx: EvalContext) -> dict[str, Any]:
    """The vote fields as last seen before this change (blank when never seen)."""
    previous = ctx.previous or {}
    return {name: previous.get(name) for name in spec.fields}


def _expected(spec: CrmVoteSpec) -> str:
    return f"set it to {' or '.join(repr(v) for v in (*spec.approve, *spec.reject))}"
