"""The approval request state machine. Pure: no clock, no I/O; ``now`` is always passed in.

Request states::

    submitted -> pending (step k) -> approved -> expired
                                  -> rejected
              -> recalled (from submitted or pending)

Data model
----------
``ApprovalRequest`` (one row) owns three child row lists: ``steps`` (``StepState``, one row
per *activation* of a step, keyed by ``(request_id, index, round)``), ``votes`` (``Vote``,
keyed by ``(request_id, step_index, round, approver)``) and ``transitions``
(``Transition``, keyed by ``(request_id, seq)``). Every operation returns an ``Outcome``
holding a *copy* of the request with the change applied plus the rows it added or
changed; inputs are never mutated, and an operation that raises changes nothing.
``ApprovalRequest.version`` goes up by one per successful operation so storage can do
optimistic locking (``UPDATE ... WHERE id = ? AND version = ?``); the unique keys above
make a concurrent double vote / double transition fail in the database too.

Step modes
----------
How votes decide an open step depends on its mode: ``connector.approvals.modes`` (the
semantics are written in docs/mappings.md#step-modes). An admin override (below) decides
the step whatever the mode.

A step's ``when`` is evaluated when the chain reaches it, against the record snapshot
stored on the request; a false criterion records a ``skipped`` step row and transition.
If every step is skipped (or the rule has none) the request is approved at submit: the
outcome fires ``submit`` then ``approve`` and the approval transition has no actor.

Rejection
---------
``on_reject: reject`` rejects the request. ``on_reject: back`` re-opens the closest
earlier step that was approved in the current pass (skipped steps are jumped over) as a
new round with fresh approvers and no votes; the steps between are re-evaluated when the
chain moves forward again. ``back`` on the first non-skipped step rejects the request.

Votes
-----
Only an assignee of the open step may vote. An admin who is not an assignee may vote with
``is_admin=True``: the vote is recorded with ``acting_admin=True`` and decides the step
outright (an override, since an admin is not one of the M people a quorum counts). An
assignee who is also an admin votes as an ordinary assignee. The same person in two steps
votes in each step: an approval in one step never counts for another.

Record changes and restarts
---------------------------
The record snapshot is frozen at submission: approvers decide on what was submitted, and
later steps' entry criteria can't be steered by editing the record mid-approval. A change
of a ``restart_on_change`` field (snapshot value != new value) restarts the request:
the open step is cancelled, the snapshot is replaced, a ``restarted`` transition is
recorded, ``submit`` fires again and the chain starts over from the first applicable
step with no votes. Other edits change nothing. Comparing against the snapshot (not the
CRM's changed-field list) makes a redelivered webhook a no-op.

Deputies and the same approver
------------------------------
With a ``routing.RoutingContext`` as ``roles``, a place on a step whose holder is away goes to
their deputy when the step opens (``delegate_open_step`` moves places on a step already open):
the row's ``on_behalf_of`` maps deputy -> approver, a ``delegated`` transition says so, and the
deputy's vote records ``on_behalf_of``. ``same_approver: ask_once`` casts, when a step opens,
an automatic approval (``auto_reason``) for each of its approvers who approved an earlier step
of this pass; the step's mode still decides, so nobody else's place is ever cleared.

Comments and reassignment
-------------------------
A rejection needs a comment when the rule says ``reject_comment: required`` (the default
of mapping files). An admin may ``reassign`` the open step from an approver who has not
voted to someone else; the step keeps its votes and its mode.

Expiry and recall
-----------------
On approval ``expires_at = approved_at + rule.expires_after`` (when set). ``expire`` acts
only on an approved request with ``now >= expires_at`` and returns ``None`` otherwise, so
it is safe to run repeatedly. ``recall`` is allowed to the submitter or an admin while the
request is submitted or pending.

Timestamps should all be timezone-aware (UTC); mixing naive and aware values raises
``TypeError`` from ``datetime`` comparisons.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from typing import Any, Literal, TypeGuard

from connector.approvals.chain import StepAssignment, assign_step
from connector.approvals.errors import (
    ApprovalError,
    ChainError,
    CommentRequiredError,
    DuplicateVoteError,
    InvalidDecisionError,
    InvalidReassignError,
    NotAnApproverError,
    ReassignNotAllowedError,
    RecallNotAllowedError,
    RequestClosedError,
    RuleMismatchError,
    SelfApprovalNotAllowedError,
    StaleStepError,
    StepClosedError,
)
from connector.approvals.modes import DECISIONS, Decision, Tally, policy_for
from connector.approvals.routing import route
from connector.approvals.spec import ActionEvent, EvalContext, Route, RuleSpec, StepMode, StepSpec

RequestStatus = Literal["submitted", "waiting", "pending", "approved", "rejected", "recalled", "expired"]
# waiting (issue 12): held until an approval of a related record it `requires` is decided
ACTIVE_STATUSES: frozenset[RequestStatus] = frozenset({"submitted", "waiting", "pending"})
# pending: open for votes; cancelled: closed without a decision (recall, restart).
StepStatus = Literal["pending", "approved", "rejected", "skipped", "cancelled"]
TransitionKind = Literal[
    "submitted",  # request created (actor: submitter)
    "entered",  # a step opened for votes
    "skipped",  # a step's entry criteria were false
    "step_approved",  # a step closed approved (actor: deciding voter)
    "step_rejected",  # a step closed rejected (actor: deciding voter)
    "sent_back",  # on_reject=back: step_index is the rejecting step; an "entered" follows
    "approved",  # request approved (actor: last voter, None when every step was skipped)
    "rejected",  # request rejected
    "recalled",
    "expired",
    "restarted",  # a restart_on_change field changed; comment lists the fields
    "reassigned",  # an admin replaced an approver of the open step; comment says who by whom
    "carried_over",  # smart re-approval kept an unchanged step's approval; comment says why
    "crm_vote_refused",  # a decision field set in the CRM was not taken as a vote; comment says why
    "lock_reverted",  # an edit of a locked field was written back; comment lists the fields
    "lock_flagged",  # an edit of a locked field, recorded for the approvers; comment lists them
    "delegated",  # a deputy took an approver's place (out of office); comment: who for whom, why
    # step timing (connector.approvals.timers); actor None, comment says what and why
    "reminded",  # the open step's waiting approvers were reminded
    "escalated",  # approvers were added to (or replaced on) the open step
    "timed_out",  # the open step's time-out acted; its action's transitions follow
    "waiting",  # held for a related record's approval; comment names it
    "resumed",  # the related approval was granted; the chain starts
]
# Kinds that record something about the request without changing its status (see `flag`).
FLAG_KINDS: frozenset[TransitionKind] = frozenset({"crm_vote_refused", "lock_reverted", "lock_flagged"})
Roles = Mapping[str, tuple[str, ...]]


@dataclass
class StepState:
    """One activation of a step (row). Re-opening a step (back, restart) adds a new round."""

    request_id: str
    index: int  # position in RuleSpec.steps
    round: int  # 1 for the first activation of this index, 2 after a back/restart, ...
    name: str
    mode: StepMode
    approvers: tuple[str, ...]  # assigned user ids; () for skipped steps
    required: int  # approvals that approve the step; 0 for skipped steps
    status: StepStatus
    entered_at: datetime
    left_at: datetime | None = None
    # deputy -> the approver they stand in for (connector.approvals.routing); {} when nobody is away
    on_behalf_of: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Vote:
    """One vote (row); unique per (request_id, step_index, round, approver)."""

    request_id: str
    step_index: int
    round: int
    approver: str
    decision: Decision
    comment: str | None
    at: datetime
    acting_admin: bool = False
    on_behalf_of: str | None = None  # the voter is this approver's deputy
    auto_reason: str | None = None  # cast by the engine (same_approver: ask_once), and why


@dataclass(frozen=True)
class Transition:
    """One audit row. ``actor`` None means the engine acted on its own (skip, expiry, ...)."""

    request_id: str
    seq: int  # 1, 2, 3 ... per request: total order even when ``at`` ties
    kind: TransitionKind
    from_status: RequestStatus | None  # None only for the "submitted" row
    to_status: RequestStatus
    step_index: int | None
    actor: str | None
    comment: str | None
    at: datetime
    acting_admin: bool = False


@dataclass
class ApprovalRequest:
    """The request row plus its child rows (``steps``, ``votes``, ``transitions``)."""

    id: str
    rule_name: str
    record_ref: str  # opaque record identity chosen by the caller
    submitter: str
    status: RequestStatus
    current_step: int | None  # index of the open step while pending, else None
    record: dict[str, Any]  # canonical values snapshot (entry criteria, templates)
    record_previous: dict[str, Any] | None  # EvalContext.previous at submit / restart
    changed_fields: tuple[str, ...]  # EvalContext.changed_fields at submit / restart, sorted
    submitted_at: datetime
    updated_at: datetime
    approved_at: datetime | None = None
    expires_at: datetime | None = None
    closed_at: datetime | None = None  # left submitted/pending (approved/rejected/recalled)
    expired_at: datetime | None = None
    version: int = 0
    steps: list[StepState] = field(default_factory=list)
    votes: list[Vote] = field(default_factory=list)
    transitions: list[Transition] = field(default_factory=list)


@dataclass(frozen=True)
class FiredAction:
    """An action event to render (``actions.render_outcome_actions``) and write back."""

    event: ActionEvent
    actor: str | None  # becomes the template variable ``approver``
    comment: str | None


@dataclass(frozen=True)
class Outcome:
    """Result of an operation: the new request state and the rows to persist."""

    request: ApprovalRequest
    transitions: tuple[Transition, ...]  # new rows
    votes: tuple[Vote, ...]  # new rows
    steps: tuple[StepState, ...]  # new or updated rows (upsert by index + round)
    actions: tuple[FiredAction, ...]  # in firing order

    @property
    def events(self) -> tuple[ActionEvent, ...]:
        return tuple(a.event for a in self.actions)


# --- queries -----------------------------------------------------------------


def is_active(request: ApprovalRequest) -> bool:
    """True while submitted or pending: at most one such request per record and rule."""
    return request.status in ACTIVE_STATUSES


def current_step_state(request: ApprovalRequest) -> StepState | None:
    """The open step row, or None when the request is not pending."""
    if request.current_step is None:
        return None
    return _latest_row(request, request.current_step)


def step_votes(request: ApprovalRequest, step: StepState) -> list[Vote]:
    """Votes cast on this round of this step (earlier rounds don't count)."""
    return [v for v in request.votes if v.step_index == step.index and v.round == step.round]


def restart_fields(request: ApprovalRequest, rule: RuleSpec, ctx: EvalContext) -> frozenset[str]:
    """``restart_on_change`` fields whose new value differs from the request snapshot.

    Fields missing from ``ctx.values`` are ignored: a partial payload is no evidence of a
    change.
    """
    return frozenset(
        name
        for name in rule.restart_on_change
        if name in ctx.values and ctx.values[name] != request.record.get(name)
    )


def may_vote(
    request: ApprovalRequest, user: str, is_admin: bool = False, *, allow_self_approval: bool = False
) -> bool:
    """Whether ``cast_vote`` would accept a vote by ``user`` on the open step now
    (``allow_self_approval``: the rule's setting)."""
    step = current_step_state(request)
    if not is_active(request) or step is None or step.status != "pending":
        return False
    try:
        _check_not_self(request, user, allow_self_approval)
        _check_voter(request, step, user, is_admin)
    except ApprovalError:
        return False
    return True


def may_see(request: ApprovalRequest, user: str, is_admin: bool = False) -> bool:
    """Admins see every request; others those they submitted or approve (any step, any round)."""
    return (
        is_admin
        or user == request.submitter
        or any(user in step.approvers or user in step.on_behalf_of.values() for step in request.steps)
    )


def may_recall(request: ApprovalRequest, user: str, is_admin: bool = False) -> bool:
    """Whether ``recall`` would accept ``user`` now."""
    return is_active(request) and (user == request.submitter or is_admin)


def plan_chain(
    rule: RuleSpec, roles: Roles, ctx: EvalContext
) -> list[tuple[StepSpec, StepAssignment | None]]:
    """Each step with its assignment, or None when its entry criteria skip it.

    Raises ``ChainError`` for the first applicable step that can't be assigned; useful
    for previews (``crm-approvals explain``) and used to validate a chain up front.
    """
    return [(step, _assign(step, ctx.values, roles) if _applies(step, ctx) else None) for step in rule.steps]


def _assign(step: StepSpec, values: Mapping[str, Any], roles: Roles) -> StepAssignment:
    """People steps resolve their approvers; a service step has none (the service decides it)."""
    if step.is_automatic:
        return StepAssignment(approvers=(), required=0)
    return assign_step(step, values, roles)


# --- operations ----------------------------------------------------------------


def open_request(
    rule: RuleSpec,
    roles: Roles,
    ctx: EvalContext,
    *,
    record_ref: str,
    submitter: str,
    now: datetime,
    request_id: str | None = None,
    carried: Mapping[int, str] | None = None,
    hold: str | None = None,
) -> Outcome:
    """Submit a record to ``rule`` (the caller has already matched ``rule.when``).

    ``carried`` (step index -> why; ``connector.approvals.reapproval``) names steps that keep
    an earlier approval: they are recorded approved (``carried_over``) instead of opening.
    ``hold`` (issue 12) keeps the request ``waiting`` instead of opening a step: the text says
    what it waits for; ``resume`` or ``fail_waiting`` move it on.

    The whole chain is validated first (``ChainError`` if an applicable step has nobody to
    approve it), then the first applicable step opens. Fires ``submit`` (and ``approve``
    when every step is skipped). ``request_id`` defaults to a random UUID hex.
    """
    for step, assignment in plan_chain(rule, roles, ctx):
        if assignment is not None:
            _check_self_approval(rule, step, assignment, submitter)
    request = ApprovalRequest(
        id=request_id or uuid.uuid4().hex,
        rule_name=rule.name,
        record_ref=record_ref,
        submitter=submitter,
        status="submitted",
        current_step=None,
        record=dict(ctx.values),
        record_previous=None if ctx.previous is None else dict(ctx.previous),
        changed_fields=tuple(sorted(ctx.changed_fields)),
        submitted_at=now,
        updated_at=now,
    )
    txn = _Txn(request, now)
    txn.transition("submitted", "submitted", step_index=None, actor=submitter)
    txn.fire("submit", submitter, None)
    if hold is not None:
        txn.transition("waiting", "waiting", step_index=None, actor=None, comment=hold)
        return txn.outcome()
    _advance(txn, rule, roles, ctx, start=0, actor=None, carried=carried)
    return txn.outcome()


def cast_vote(
    request: ApprovalRequest,
    rule: RuleSpec,
    roles: Roles,
    *,
    approver: str,
    decision: str,
    step_index: int,
    now: datetime,
    comment: str | None = None,
    is_admin: bool = False,
    step_round: int | None = None,
    today: date | None = None,
) -> Outcome:
    """Record a vote on the open step and apply whatever it decides.

    ``step_index`` (and optionally ``step_round``) is the step the voter saw; anything
    else is a conflict. ``roles`` resolves approvers of steps this vote opens; ``today``
    (default ``now.date()``) feeds their entry criteria. Raises, in this order:
    ``InvalidDecisionError``, ``RequestClosedError``, ``RuleMismatchError``,
    ``StepClosedError`` / ``StaleStepError``, ``SelfApprovalNotAllowedError``,
    ``NotAnApproverError``, ``DuplicateVoteError``; and ``ChainError`` if a step it opens can't be assigned.
    """
    if not _is_decision(decision):
        raise InvalidDecisionError(f"decision must be one of {DECISIONS}, got {decision!r}")
    _require_active(request)
    step = _check_step(request, rule, step_index, step_round)
    _check_not_self(request, approver, rule.allow_self_approval, rule.name)
    acting_admin = _check_voter(request, step, approver, is_admin)
    if decision == "reject" and rule.reject_comment == "required" and not (comment or "").strip():
        raise CommentRequiredError(f"rule {rule.name!r} needs a comment with every rejection")
    txn = _Txn(copy.deepcopy(request), now)
    behalf = None if acting_admin else step.on_behalf_of.get(approver)
    txn.vote(step, approver, decision, comment, acting_admin, on_behalf_of=behalf)
    result = decision if acting_admin else _step_result(txn.request, txn.current_row())
    if result is None:
        return txn.outcome()
    ctx = _snapshot_ctx(txn.request, now, today)
    if result == "approve":
        _close_step(txn, "approved", approver, comment, acting_admin)
        _advance(txn, rule, roles, ctx, start=step_index + 1, actor=approver)
    else:
        _close_step(txn, "rejected", approver, comment, acting_admin)
        _after_rejection(txn, rule, roles, approver, comment, acting_admin)
    return txn.outcome()


def recall(
    request: ApprovalRequest,
    *,
    actor: str,
    now: datetime,
    comment: str | None = None,
    is_admin: bool = False,
) -> Outcome:
    """Withdraw an active request; only the submitter or an admin may. Fires ``recall``."""
    _require_active(request)
    if actor != request.submitter and not is_admin:
        raise RecallNotAllowedError(f"only the submitter {request.submitter!r} or an admin may recall")
    txn = _Txn(copy.deepcopy(request), now)
    _cancel_open_step(txn)
    acting_admin = actor != request.submitter
    txn.close("recalled", "recalled", actor=actor, comment=comment, acting_admin=acting_admin)
    txn.fire("recall", actor, comment)
    return txn.outcome()


def reassign(
    request: ApprovalRequest,
    *,
    step_index: int,
    old: str,
    new: str,
    actor: str,
    now: datetime,
    comment: str | None = None,
    is_admin: bool = False,
) -> Outcome:
    """An admin hands the open step from ``old`` (who has not voted) to ``new``.

    Fires no action: the record's status does not change. Raises
    ``ReassignNotAllowedError``, ``RequestClosedError``, ``StepClosedError`` /
    ``StaleStepError``, ``NotAnApproverError`` (``old`` is not on the step),
    ``DuplicateVoteError`` (``old`` already voted) or ``InvalidReassignError``.
    """
    if not is_admin:
        raise ReassignNotAllowedError("only an admin may reassign a step")
    _require_active(request)
    current = current_step_state(request)
    if current is None or current.status != "pending":
        raise StepClosedError(f"request {request.id} has no open step")
    if step_index != current.index:
        _raise_wrong_step(request, step_index, current)
    new = new.strip()
    if old not in current.approvers:
        raise NotAnApproverError(f"{old!r} is not an approver of step {current.index} ({current.name!r})")
    if any(v.approver == old for v in step_votes(request, current)):
        raise DuplicateVoteError(f"{old!r} already voted on step {current.index} ({current.name!r})")
    if not new:
        raise InvalidReassignError("name the user who should approve instead")
    if new in current.approvers:
        raise InvalidReassignError(f"{new!r} already approves step {current.index} ({current.name!r})")
    txn = _Txn(copy.deepcopy(request), now)
    row = txn.current_row()
    row.approvers = tuple(new if approver == old else approver for approver in row.approvers)
    row.on_behalf_of = {k: v for k, v in row.on_behalf_of.items() if k != old}
    txn.touch(row)
    note = f"{old} -> {new}" + (f": {comment}" if comment else "")
    txn.transition(
        "reassigned", txn.request.status, step_index=step_index, actor=actor, comment=note, acting_admin=True
    )
    return txn.outcome()


def expire(request: ApprovalRequest, now: datetime) -> Outcome | None:
    """Expire an approved request once ``now >= expires_at``; None (no-op) otherwise."""
    if request.status != "approved" or request.expires_at is None or now < request.expires_at:
        return None
    txn = _Txn(copy.deepcopy(request), now)
    txn.request.expired_at = now
    txn.transition("expired", "expired", step_index=None, actor=None)
    txn.fire("expire", None, None)
    return txn.outcome()


def on_record_change(
    request: ApprovalRequest,
    rule: RuleSpec,
    roles: Roles,
    ctx: EvalContext,
    now: datetime,
    carried: Callable[[EvalContext], Mapping[int, str]] | None = None,
) -> Outcome | None:
    """React to an edit of the record: restart when a restart field changed, else None.

    Never opens a second request. Returns None for closed requests too (whether a new
    request is needed then is the rule matcher's call). Raises ``ChainError`` (changing
    nothing) if the restarted chain has a step nobody can approve.
    """
    if not is_active(request):
        return None
    _check_rule_name(request, rule)
    changed = restart_fields(request, rule, ctx)
    if not changed:
        return None
    ctx = _merged_ctx(request, ctx)
    plan_chain(rule, roles, ctx)
    if request.status == "waiting":  # still held: take the new values, start when released
        txn = _Txn(copy.deepcopy(request), now)
        _replace_snapshot(txn.request, ctx)
        txn.transition("restarted", "waiting", step_index=None, actor=None, comment=_changed_note(changed))
        return txn.outcome()
    txn = _Txn(copy.deepcopy(request), now)
    _cancel_open_step(txn)
    _replace_snapshot(txn.request, ctx)
    txn.request.current_step = None
    kept = carried(ctx) if carried is not None else None  # smart re-approval, judged on the old request
    txn.transition("restarted", "submitted", step_index=None, actor=None, comment=_changed_note(changed))
    txn.fire("submit", None, None)
    _advance(txn, rule, roles, ctx, start=0, actor=None, carried=kept)
    return txn.outcome()


def flag(
    request: ApprovalRequest, kind: TransitionKind, *, actor: str | None, comment: str, now: datetime
) -> Outcome:
    """Record something the approvers should see (a locked field edited, a refused vote from
    the CRM) in the history, changing nothing else; ``kind`` is one of ``FLAG_KINDS``."""
    if kind not in FLAG_KINDS:
        raise ValueError(f"{kind!r} is not a flag; expected one of {sorted(FLAG_KINDS)}")
    _require_active(request)
    txn = _Txn(copy.deepcopy(request), now)
    txn.transition(kind, txn.request.status, step_index=request.current_step, actor=actor, comment=comment)
    return txn.outcome()


# --- internals -------------------------------------------------------------------


class _Txn:
    """Collects the rows one operation adds or changes on a (copied) request."""

    def __init__(self, request: ApprovalRequest, now: datetime) -> None:
        self.request = request
        self.now = now
        self._transitions: list[Transition] = []
        self._votes: list[Vote] = []
        self._steps: dict[tuple[int, int], StepState] = {}
        self._actions: list[FiredAction] = []

    def transition(
        self,
        kind: TransitionKind,
        to_status: RequestStatus,
        *,
        step_index: int | None,
        actor: str | None,
        comment: str | None = None,
        acting_admin: bool = False,
    ) -> None:
        req = self.request
        from_status: RequestStatus | None = None if kind == "submitted" else req.status
        row = Transition(
            request_id=req.id,
            seq=len(req.transitions) + 1,
            kind=kind,
            from_status=from_status,
            to_status=to_status,
            step_index=step_index,
            actor=actor,
            comment=comment,
            at=self.now,
            acting_admin=acting_admin,
        )
        req.status = to_status
        req.transitions.append(row)
        self._transitions.append(row)

    def close(
        self,
        kind: TransitionKind,
        to_status: RequestStatus,
        *,
        actor: str | None,
        comment: str | None = None,
        acting_admin: bool = False,
    ) -> None:
        """Final transition out of submitted/pending."""
        self.request.current_step = None
        self.request.closed_at = self.now
        self.transition(
            kind, to_status, step_index=None, actor=actor, comment=comment, acting_admin=acting_admin
        )

    def vote(
        self,
        step: StepState,
        approver: str,
        decision: Decision,
        comment: str | None,
        admin: bool,
        *,
        on_behalf_of: str | None = None,
        auto_reason: str | None = None,
    ) -> None:
        row = Vote(
            self.request.id,
            step.index,
            step.round,
            approver,
            decision,
            comment,
            self.now,
            admin,
            on_behalf_of,
            auto_reason,
        )
        self.request.votes.append(row)
        self._votes.append(row)

    def add_step(self, row: StepState) -> None:
        self.request.steps.append(row)
        self.touch(row)

    def touch(self, row: StepState) -> None:
        self._steps[(row.index, row.round)] = row

    def current_row(self) -> StepState:
        row = current_step_state(self.request)
        assert row is not None, "callers check the request is pending"
        return row

    def fire(self, event: ActionEvent, actor: str | None, comment: str | None) -> None:
        self._actions.append(FiredAction(event, actor, comment))

    def outcome(self) -> Outcome:
        self.request.version += 1
        self.request.updated_at = self.now
        return Outcome(
            request=self.request,
            transitions=tuple(self._transitions),
            votes=tuple(self._votes),
            steps=tuple(self._steps.values()),
            actions=tuple(self._actions),
        )


def _is_decision(value: object) -> TypeGuard[Decision]:
    return value in DECISIONS


def _applies(step: StepSpec, ctx: EvalContext) -> bool:
    return step.when is None or bool(step.when(ctx))


def _advance(
    txn: _Txn,
    rule: RuleSpec,
    roles: Roles,
    ctx: EvalContext,
    *,
    start: int,
    actor: str | None,
    carried: Mapping[int, str] | None = None,
) -> None:
    """Open the first applicable step from ``start``, recording skips and carried-over
    approvals; approve if none is left."""
    for index in range(start, len(rule.steps)):
        step = rule.steps[index]
        if not _applies(step, ctx):
            _skip_step(txn, step, index)
            continue
        if carried and index in carried:
            _carry_step(txn, step, index, assign_step(step, txn.request.record, roles), carried[index])
            continue
        _open_step(txn, rule, index, roles)
        decided_by = repeat_approvals(txn, rule)
        if decided_by is None:
            return
        actor = decided_by
    _approve_request(txn, rule, actor)


def _carry_step(txn: _Txn, step: StepSpec, index: int, assignment: StepAssignment, why: str) -> None:
    row = _new_row(txn, step, index, "approved", assignment)
    row.left_at = txn.now
    txn.add_step(row)
    txn.transition("carried_over", txn.request.status, step_index=index, actor=None, comment=why)


def _open_step(txn: _Txn, rule: RuleSpec, index: int, roles: Roles) -> None:
    step = rule.steps[index]
    assignment = _assign(step, txn.request.record, roles)
    _check_self_approval(rule, step, assignment, txn.request.submitter)
    row = _new_row(txn, step, index, "pending", assignment)
    handed, kept = _hand_to_deputies(row, rule, roles, txn.request.submitter)
    txn.add_step(row)
    txn.request.current_step = index
    # why someone away kept their place (a deputy cycle, ...) is said on the step's opening
    txn.transition("entered", "pending", step_index=index, actor=None, comment="; ".join(kept) or None)
    for note in handed:
        txn.transition("delegated", "pending", step_index=index, actor=None, comment=note)


def _hand_to_deputies(
    row: StepState, rule: RuleSpec, roles: Roles, submitter: str, voted: frozenset[str] = frozenset()
) -> tuple[list[str], list[str]]:
    """Give each place on ``row`` whose holder is away (and has not voted) to their deputy
    (``routing.route``); returns the notes for the history: places handed over, and places
    kept although their holder is away (a deputy cycle; a deputy who is the submitter, when the
    rule forbids self-approval, or who is already on the step)."""
    notes: list[str] = []
    kept: list[str] = []
    approvers = list(row.approvers)
    for i, holder in enumerate(approvers):
        if holder in voted:
            continue
        way = route(roles, holder, rule.name)
        if way.note is not None:
            kept.append(way.note)
        if not way.delegated:
            continue
        principal = row.on_behalf_of.get(holder, holder)
        if way.deputy == submitter and not rule.allow_self_approval:
            kept.append(f"{holder} is away, but their deputy {way.deputy} submitted this request: kept")
            continue
        if way.deputy in approvers:
            kept.append(f"{holder} is away, but their deputy {way.deputy} already approves this step: kept")
            continue
        approvers[i] = way.deputy
        row.on_behalf_of = {k: v for k, v in row.on_behalf_of.items() if k != holder}
        row.on_behalf_of[way.deputy] = principal
        notes.append(f"{holder} -> {way.deputy}: deputy for {principal} (" + " -> ".join(way.chain) + ")")
    row.approvers = tuple(approvers)
    return notes, kept


def delegate_open_step(
    request: ApprovalRequest, rule: RuleSpec, roles: Roles, now: datetime
) -> Outcome | None:
    """Hand places on the open step to the deputies of approvers who are away now and have not
    voted (a delegation set after the step opened); None when nothing changes. Votes already
    cast stay as they are."""
    if not is_active(request):
        return None
    _check_rule_name(request, rule)
    current = current_step_state(request)
    if current is None or current.status != "pending":
        return None
    voted = frozenset(v.approver for v in step_votes(request, current))
    txn = _Txn(copy.deepcopy(request), now)
    row = txn.current_row()
    notes, _kept = _hand_to_deputies(row, rule, roles, request.submitter, voted)
    if row.approvers == current.approvers:
        return None
    txn.touch(row)
    for note in notes:
        txn.transition("delegated", txn.request.status, step_index=row.index, actor=None, comment=note)
    return txn.outcome()


def repeat_approvals(txn: _Txn, rule: RuleSpec) -> str | None:
    """``same_approver: ask_once``: approvers of the step just opened who approved an earlier
    step of this pass approve it too, automatically and recorded as such. Returns who decided
    the step when those votes approve it (the caller moves on), else None. Only these people's
    own votes are cast: a step that still needs someone else stays open for them."""
    if rule.same_approver != "ask_once":
        return None
    row = txn.current_row()
    earlier = _approvals_this_pass(txn.request, row.index)
    decided_by = None
    for approver in row.approvers:
        if approver not in earlier:
            continue
        reason = f"same approver: {approver} approved step {earlier[approver]!r} of this request"
        txn.vote(
            row,
            approver,
            "approve",
            None,
            False,
            on_behalf_of=row.on_behalf_of.get(approver),
            auto_reason=reason,
        )
        if _step_result(txn.request, row) == "approve":
            _close_step(txn, "approved", approver, reason, False)
            decided_by = approver
            break
    return decided_by


def _approvals_this_pass(request: ApprovalRequest, before: int) -> dict[str, str]:
    """Who approved which earlier step whose latest round is approved: approver -> step name."""
    found: dict[str, str] = {}
    for index in range(before):
        row = _latest_row(request, index)
        if row is None or row.status != "approved":
            continue
        for vote in step_votes(request, row):
            if vote.decision == "approve" and not vote.acting_admin:
                found.setdefault(vote.approver, row.name)
    return found


def _check_self_approval(rule: RuleSpec, step: StepSpec, assignment: StepAssignment, submitter: str) -> None:
    """Unless the rule allows self-approval, the submitter's vote never counts, so a step that
    needs it could never be decided: refuse the request when it opens (a ChainError naming the
    rule and step) rather than route it to someone the mapping file does not name."""
    if rule.allow_self_approval or submitter not in assignment.approvers:
        return
    others = len(assignment.approvers) - 1
    if others < assignment.required:
        raise ChainError(
            step.name,
            f"rule {rule.name!r}",
            f"needs {assignment.required} approval(s) but its approvers besides the submitter {submitter!r} "
            f"are {others}, and the rule does not allow self-approval; add an approver to the step "
            "or set allow_self_approval: true on the rule",
        )


def _skip_step(txn: _Txn, step: StepSpec, index: int) -> None:
    row = _new_row(txn, step, index, "skipped", StepAssignment(approvers=(), required=0))
    row.left_at = txn.now
    txn.add_step(row)
    txn.transition("skipped", txn.request.status, step_index=index, actor=None)


def _new_row(
    txn: _Txn, step: StepSpec, index: int, status: StepStatus, assignment: StepAssignment
) -> StepState:
    rounds = sum(1 for s in txn.request.steps if s.index == index)
    return StepState(
        request_id=txn.request.id,
        index=index,
        round=rounds + 1,
        name=step.name,
        mode=step.mode,
        approvers=assignment.approvers,
        required=assignment.required,
        status=status,
        entered_at=txn.now,
    )


def _approve_request(txn: _Txn, rule: RuleSpec, actor: str | None) -> None:
    req = txn.request
    req.approved_at = txn.now
    req.expires_at = None if rule.expires_after is None else txn.now + rule.expires_after
    txn.close("approved", "approved", actor=actor)
    txn.fire("approve", actor, None)


def _close_step(txn: _Txn, status: StepStatus, actor: str, comment: str | None, acting_admin: bool) -> None:
    row = txn.current_row()
    row.status = status
    row.left_at = txn.now
    txn.touch(row)
    kind: TransitionKind = "step_approved" if status == "approved" else "step_rejected"
    txn.transition(
        kind, "pending", step_index=row.index, actor=actor, comment=comment, acting_admin=acting_admin
    )


def _after_rejection(
    txn: _Txn, rule: RuleSpec, roles: Roles, actor: str, comment: str | None, acting_admin: bool
) -> None:
    index = txn.current_row().index
    target = _back_target(txn.request, index) if rule.steps[index].on_reject == "back" else None
    if target is None:
        txn.close("rejected", "rejected", actor=actor, comment=comment, acting_admin=acting_admin)
        txn.fire("reject", actor, comment)
        return
    txn.transition(
        "sent_back", "pending", step_index=index, actor=actor, comment=comment, acting_admin=acting_admin
    )
    _open_step(txn, rule, target, roles)


def _back_target(request: ApprovalRequest, index: int) -> int | None:
    """Closest earlier step approved in this pass; skipped steps are jumped over.

    Every index below the current one has a row from the current pass (the chain records
    a skipped or entered row for each step it passes), so the latest row is the one to
    look at.
    """
    for earlier in range(index - 1, -1, -1):
        row = _latest_row(request, earlier)
        if row is not None and row.status == "approved":
            return earlier
    return None


def _cancel_open_step(txn: _Txn) -> None:
    row = current_step_state(txn.request)
    if row is not None and row.status == "pending":
        row.status = "cancelled"
        row.left_at = txn.now
        txn.touch(row)


def _step_result(request: ApprovalRequest, step: StepState) -> Decision | None:
    """Whether the votes so far decide the step, and how: the step mode's call."""
    votes = step_votes(request, step)
    approvals = sum(1 for v in votes if v.decision == "approve")
    tally = Tally(len(step.approvers), step.required, approvals, len(votes) - approvals)
    return policy_for(step.mode).decide(tally)


def _latest_row(request: ApprovalRequest, index: int) -> StepState | None:
    rows = [s for s in request.steps if s.index == index]
    return max(rows, key=lambda s: s.round) if rows else None


def _require_active(request: ApprovalRequest) -> None:
    if not is_active(request):
        raise RequestClosedError(f"request {request.id} is {request.status}")


def _check_rule_name(request: ApprovalRequest, rule: RuleSpec) -> None:
    if rule.name != request.rule_name:
        raise RuleMismatchError(f"request {request.id} runs rule {request.rule_name!r}, not {rule.name!r}")


def _check_step(
    request: ApprovalRequest, rule: RuleSpec, step_index: int, step_round: int | None
) -> StepState:
    """The open step, if it is the one the caller saw; else a conflict error."""
    _check_rule_name(request, rule)
    current = current_step_state(request)
    if current is None or current.status != "pending":
        raise StepClosedError(f"request {request.id} has no open step")
    if current.index >= len(rule.steps) or rule.steps[current.index].name != current.name:
        raise RuleMismatchError(f"rule {rule.name!r} no longer has step {current.name!r} at {current.index}")
    if step_index != current.index:
        _raise_wrong_step(request, step_index, current)
    if step_round is not None and step_round != current.round:
        cls = StepClosedError if step_round < current.round else StaleStepError
        raise cls(f"step {step_index} is at round {current.round}, not {step_round}")
    return current


def _raise_wrong_step(request: ApprovalRequest, step_index: int, current: StepState) -> None:
    seen = _latest_row(request, step_index)
    where = f"current step is {current.index} ({current.name!r})"
    if seen is not None:
        raise StepClosedError(f"step {step_index} ({seen.name!r}) is {seen.status}; {where}")
    raise StaleStepError(f"step {step_index} is not open; {where}")


def _check_not_self(request: ApprovalRequest, voter: str, allowed: bool, rule_name: str = "") -> None:
    """The submitter may not vote on their own request unless the rule allows self-approval
    (admins included: an admin override of one's own request is still self-approval)."""
    if voter == request.submitter and not allowed:
        raise SelfApprovalNotAllowedError(
            f"{voter!r} submitted this request and its rule {rule_name or request.rule_name!r} "
            "does not allow self-approval (allow_self_approval: true in the mapping file allows it)"
        )


def _check_voter(request: ApprovalRequest, step: StepState, approver: str, is_admin: bool) -> bool:
    """Returns whether the vote is an admin override; raises if the voter may not vote."""
    if approver not in step.approvers:
        if is_admin:
            return True
        raise NotAnApproverError(f"{approver!r} is not an approver of step {step.index} ({step.name!r})")
    if any(v.approver == approver for v in step_votes(request, step)):
        raise DuplicateVoteError(f"{approver!r} already voted on step {step.index} ({step.name!r})")
    return False


def _snapshot_ctx(request: ApprovalRequest, now: datetime, today: date | None) -> EvalContext:
    """Entry criteria of later steps see the record as submitted, not as edited since."""
    return EvalContext(
        values=request.record,
        previous=request.record_previous,
        changed_fields=frozenset(request.changed_fields),
        today=today or now.date(),
        now=now,
    )


def _merged_ctx(request: ApprovalRequest, ctx: EvalContext) -> EvalContext:
    """``ctx`` with fields the payload lacks filled in from the snapshot (partial webhooks)."""
    return replace(ctx, values={**request.record, **ctx.values})


def _replace_snapshot(request: ApprovalRequest, ctx: EvalContext) -> None:
    request.record = dict(ctx.values)
    request.record_previous = None if ctx.previous is None else dict(ctx.previous)
    request.changed_fields = tuple(sorted(ctx.changed_fields))


def _changed_note(changed: frozenset[str]) -> str:
    return "changed: " + ", ".join(sorted(changed))


# --- issue 12: waiting for a related approval, and steps the service decides ------------------


def resume(
    request: ApprovalRequest,
    rule: RuleSpec,
    roles: Roles,
    *,
    now: datetime,
    comment: str | None = None,
    values: Mapping[str, Any] | None = None,
    today: date | None = None,
) -> Outcome | None:
    """A ``waiting`` request's dependency was approved: start its chain (None if not waiting).

    ``values`` update the snapshot first (e.g. ``company.approval: approved``), so step
    criteria see the dependency as it now is."""
    if request.status != "waiting":
        return None
    _check_rule_name(request, rule)
    txn = _Txn(copy.deepcopy(request), now)
    if values:
        txn.request.record = {**txn.request.record, **values}
    ctx = _snapshot_ctx(txn.request, now, today)
    plan_chain(rule, roles, ctx)
    txn.transition("resumed", "submitted", step_index=None, actor=None, comment=comment)
    _advance(txn, rule, roles, ctx, start=0, actor=None)
    return txn.outcome()


def fail_waiting(request: ApprovalRequest, *, reason: str, now: datetime) -> Outcome | None:
    """A ``waiting`` request's dependency was rejected or lapsed: reject it with that reason."""
    if request.status != "waiting":
        return None
    txn = _Txn(copy.deepcopy(request), now)
    txn.close("rejected", "rejected", actor=None, comment=reason)
    txn.fire("reject", None, reason)
    return txn.outcome()


def route_step(
    request: ApprovalRequest,
    rule: RuleSpec,
    roles: Roles,
    *,
    step_index: int,
    step_round: int,
    route: Route,
    message: str | None,
    actor: str,
    now: datetime,
    today: date | None = None,
) -> Outcome:
    """Apply a service step's verdict: continue, send back to a named step, or reject.

    Raises ``StepClosedError``/``StaleStepError`` when that round of the step is no longer the
    open one (an admin decided it meanwhile): the verdict is then moot."""
    _require_active(request)
    step = _check_step(request, rule, step_index, step_round)
    txn = _Txn(copy.deepcopy(request), now)
    if route.action == "continue":
        _close_step(txn, "approved", actor, message, False)
        _advance(txn, rule, roles, _snapshot_ctx(txn.request, now, today), start=step.index + 1, actor=None)
        return txn.outcome()
    if route.action == "reject":
        _close_step(txn, "rejected", actor, message, False)
        txn.close("rejected", "rejected", actor=actor, comment=message)
        txn.fire("reject", actor, message)
        return txn.outcome()
    target = next(i for i, s in enumerate(rule.steps) if s.name == route.to)
    row = txn.current_row()
    row.status, row.left_at = "rejected", now
    txn.touch(row)
    txn.transition("sent_back", "pending", step_index=step.index, actor=actor, comment=message)
    _open_step(txn, rule, target, roles)
    return txn.outcome()
