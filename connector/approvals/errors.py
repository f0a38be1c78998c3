"""Exceptions raised by the approval engine.

Every error carries a stable machine-readable ``code`` so the REST layer can put it in an
error body; the HTTP status of each class is chosen in the web layer (webhooks/errors.py).
All derive from the project's root error (connector/errors.py):

===========================  ==============================================
The engine raises before changing anything, so after any of these the caller's state is
exactly what it was.
"""

from __future__ import annotations

from connector.errors import CrmApprovalsError, FatalError


class ApprovalError(CrmApprovalsError):
    """Base class of everything the approval engine raises on purpose."""

    code = "approval_error"


class ChainError(ApprovalError, FatalError):
    """A step's approver chain can't be built: unknown role, nobody resolved, bad quorum.

    ``step`` is the step name and ``source`` a human description of the approver source
    (e.g. ``role 'finance'``) so the message says exactly what to fix in the mapping.
    """

    code = "chain_error"

    def __init__(self, step: str, source: str, reason: str) -> None:
        self.step = step
        self.source = source
        self.reason = reason
        super().__init__(f"step {step!r}: {source}: {reason}")


class RuleMismatchError(ApprovalError):
    """The rule given to an operation is not the one the request was opened with.

    Raised when the rule name differs or the mapping was edited so the request's current
    step no longer exists under the same name: applying a vote then would silently vote on
    a different step.
    """

    code = "rule_mismatch"


class ActionRenderError(ApprovalError, FatalError):
    """A ValueRenderer failed; names the canonical field so the mapping can be fixed."""

    code = "action_render_error"

    def __init__(self, field: str, cause: BaseException) -> None:
        self.field = field
        self.cause = cause
        super().__init__(f"rendering field {field!r} failed: {type(cause).__name__}: {cause}")


class InvalidDecisionError(ApprovalError, ValueError):
    """The decision is not one of ``approve`` / ``reject``."""

    code = "invalid_decision"


class CommentRequiredError(InvalidDecisionError):
    """The rule (``reject_comment: required``, the default of mapping files) wants a reason."""

    code = "comment_required"


class InvalidReassignError(InvalidDecisionError):
    """A reassignment names nobody, or someone who already approves the step."""

    code = "invalid_reassign"


class PermissionDeniedError(ApprovalError):
    """The actor may not perform this operation."""

    code = "permission_denied"


class NotAnApproverError(PermissionDeniedError):
    """The voter is not assigned to the current step and did not act as admin."""

    code = "not_an_approver"


class SelfApprovalNotAllowedError(PermissionDeniedError):
    """The submitter voted on their own request and the rule does not allow self-approval."""

    code = "self_approval_not_allowed"


class RecallNotAllowedError(PermissionDeniedError):
    """Only the submitter (or an admin) may recall a request."""

    code = "recall_not_allowed"


class ReassignNotAllowedError(PermissionDeniedError):
    """Only an admin may hand a step's approval to someone else."""

    code = "reassign_not_allowed"


class ConflictError(ApprovalError):
    """The operation does not fit the request's current state."""

    code = "conflict"


class RequestClosedError(ConflictError):
    """The request is no longer active (approved, rejected, recalled or expired)."""

    code = "request_closed"


class StepClosedError(ConflictError):
    """The step (or the round of it) the caller saw has already been decided or skipped."""

    code = "step_closed"


class StaleStepError(ConflictError):
    """The step index the caller saw is not the request's current step (optimistic lock)."""

    code = "stale_step"


class DuplicateVoteError(ConflictError):
    """The approver already voted on this round of this step."""

    code = "duplicate_vote"


class InvalidDelegationError(ApprovalError, ValueError):
    """A deputy setting that can't be kept: dates, unknown user or rule, a deputy of oneself."""

    code = "invalid_delegation"


class DelegationCycleError(InvalidDelegationError):
    """The deputy would hand steps back to the user (A -> B -> A) on some day they share."""

    code = "delegation_cycle"


class DelegationNotAllowedError(PermissionDeniedError):
    """Someone other than the user (or an admin) set or cancelled their deputy."""

    code = "delegation_not_allowed"


class DelegationNotFoundError(ApprovalError, LookupError):
    """No delegation with that id (that the caller may see)."""

    code = "delegation_not_found"
