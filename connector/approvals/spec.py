"""The compiled shape of a mapping file.

The rule loader (``connector.rules``) turns YAML into these objects; the approval
engine (``connector.approvals``) consumes them. Pure Python: no I/O, no Flask, no SQL.
Field names here are always *canonical* names (the keys of the mapping's ``fields``
map), never CRM API names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any, ClassVar, Literal, Protocol

from connector.approvals.timing import StepTiming

# "step": a step opened (the request is waiting for someone new); see actions.render_outcome_actions
ActionEvent = Literal["submit", "step", "approve", "reject", "recall", "expire"]
ACTION_EVENTS: tuple[ActionEvent, ...] = ("submit", "step", "approve", "reject", "recall", "expire")
StepMode = Literal["one", "all", "any", "quorum"]
RejectBehaviour = Literal["reject", "back"]
MatchMode = Literal["first", "all"]
RejectComment = Literal["required", "optional"]
# A person on several steps of one request: asked once (later steps they hold are approved
# automatically) or on each step. See docs/mappings.md#same-approver.
SameApprover = Literal["ask_once", "ask_each_step"]
FieldType = Literal["string", "number", "money", "date", "datetime", "boolean", "user", "list"]


@dataclass(frozen=True)
class EvalContext:
    """Everything a criterion may look at. Values are raw CRM values keyed by canonical name."""

    values: Mapping[str, Any]
    previous: Mapping[str, Any] | None  # last-seen values; None when the record was never seen
    changed_fields: frozenset[str]  # canonical names the CRM reported as changed
    today: date
    now: datetime


@dataclass(frozen=True)
class ConditionTrace:
    """One leaf condition as evaluated, for `crm-approvals explain`."""

    path: str  # where in the rule, e.g. "rules[0].when.all[1]"
    field: str | None
    operator: str
    expected: Any
    actual: Any
    result: bool


class Criterion(Protocol):
    """A compiled condition tree: a plain callable, never eval'd text."""

    def __call__(self, ctx: EvalContext) -> bool: ...

    def explain(self, ctx: EvalContext) -> list[ConditionTrace]: ...


# A rendered action value: called with template variables (today, now, record, approver,
# comment, request, ...) and returns the value to write. Literal values are wrapped too.
ValueRenderer = Callable[[Mapping[str, Any]], Any]


@dataclass(frozen=True)
class FieldSpec:
    name: str  # canonical
    api_name: str  # CRM API name, may be a dotted related path such as Account.Credit_Score__c
    type: FieldType = "string"

    @property
    def is_related(self) -> bool:
        return "." in self.api_name

    @property
    def is_virtual(self) -> bool:
        """A value the service computes, never read from the CRM (`company.approval`)."""
        return self.api_name.startswith(VIRTUAL_PREFIX)


VIRTUAL_PREFIX = "@"  # api_name of a computed field: "@company.approval"


# --- approver sources -------------------------------------------------------


@dataclass(frozen=True)
class UserApprovers:
    users: tuple[str, ...]


@dataclass(frozen=True)
class RoleApprovers:
    role: str  # a key of MappingSpec.roles (roles and groups share one namespace)


@dataclass(frozen=True)
class FieldApprovers:
    field: str  # canonical field holding a user id (or a list / ';'-separated ids), e.g. owner_manager


@dataclass(frozen=True)
class ValueMapApprovers:
    """Approvers chosen by a record value, e.g. product line -> approvers.

    A multi-value field (list, or ';'-separated text as Salesforce multi-selects are)
    contributes the approvers of every value it holds.
    """

    field: str
    mapping: Mapping[str, tuple[ApproverSource, ...]]
    default: tuple[ApproverSource, ...] = ()


@dataclass(frozen=True)
class ManagerApprovers:
    """``{manager_of: owner, levels: 2}``: the first ``levels`` active managers above the user
    in canonical field ``of``, up the directory's manager chain (inactive ones passed over)."""

    of: str  # canonical field holding a user id
    levels: int = 1


@dataclass(frozen=True)
class QueueApprovers:
    """``{queue: Finance}``: the active members of a CRM queue/group/team/department, as
    the directory last read them from the CRM."""

    queue: str  # the CRM's name or id of the queue


ApproverSource = (
    UserApprovers | RoleApprovers | FieldApprovers | ValueMapApprovers | ManagerApprovers | QueueApprovers
)


@dataclass(frozen=True)
class StepSpec:
    name: str
    mode: StepMode
    approvers: tuple[ApproverSource, ...]
    quorum_count: int | None = None  # mode == "quorum": N of M
    quorum_percent: Decimal | None = None  # mode == "quorum": share of M, e.g. Decimal("60")
    when: Criterion | None = None  # entry criteria: the step is skipped when false
    on_reject: RejectBehaviour = "reject"
    label: str | None = None  # shown to people ("Finance"); the name when unset
    # Smart re-approval (connector.approvals.reapproval): None = the rule's setting.
    smart_reapproval: bool | None = None
    # Canonical fields the approval depends on: those its `when` and approvers read plus the
    # step's own `inputs:`. A change of any of them means the step must be approved again.
    inputs: frozenset[str] = frozenset()
    timing: StepTiming | None = None  # reminders, escalation, time-out (connector.approvals.timers)
    # issue 12: a step the service runs itself (an external check, a duplicate check); None = people vote
    service: ServiceStep | None = None

    @property
    def title(self) -> str:
        return self.label or self.name

    @property
    def is_automatic(self) -> bool:
        return self.service is not None


@dataclass(frozen=True)
class ActionSpec:
    set: Mapping[str, ValueRenderer]  # canonical field -> value renderer


LockMode = Literal["revert", "flag"]


@dataclass(frozen=True)
class LockSpec:
    """`lock:` of a rule: fields nobody but an admin may edit while a request is pending."""

    fields: frozenset[str]  # canonical
    mode: LockMode


@dataclass(frozen=True)
class CrmVoteSpec:
    """`crm_vote:` of a rule: the current approver votes by setting a field in the CRM."""

    decision: str  # canonical field the approver sets, e.g. approval_decision
    comment: str | None  # canonical field read as the vote's comment
    approve: tuple[str, ...] = ("Approve",)  # CRM values meaning approve (compared case-insensitively)
    reject: tuple[str, ...] = ("Reject",)

    def decision_for(self, raw: Any) -> Literal["approve", "reject"] | None:
        text = str(raw).strip().casefold()
        if text in {v.casefold() for v in self.approve}:
            return "approve"
        if text in {v.casefold() for v in self.reject}:
            return "reject"
        return None

    @property
    def fields(self) -> frozenset[str]:
        return frozenset(f for f in (self.decision, self.comment) if f is not None)


@dataclass(frozen=True)
class DocumentSpec:
    """A document a rule produces from an admin template (connector/documents/): rendered
    again on each of `on` (transition kinds of the request), stored, attached to the record."""

    name: str  # unique in the rule; also the file name's stem
    template: str  # file name in DOCUMENTS_TEMPLATES_DIR
    on: frozenset[str]  # transition kinds (connector.approvals.lifecycle.TransitionKind)
    title: str | None = None

    @property
    def label(self) -> str:
        return self.title or self.name


@dataclass(frozen=True)
class RuleSpec:
    name: str
    when: Criterion
    steps: tuple[StepSpec, ...]
    actions: Mapping[ActionEvent, ActionSpec] = field(default_factory=dict)
    expires_after: timedelta | None = None
    # Canonical fields whose change while pending restarts the request; empty = never restart.
    restart_on_change: frozenset[str] = frozenset()
    # Whether a rejection must say why. Mapping files default to "required" (the loader sets it);
    # rules built in code default to no requirement.
    reject_comment: RejectComment = "optional"
    bulk_approve: bool = False  # approvers may approve several requests of this rule at once
    # Whether the submitter may vote on their own request (an approver of a step); default no.
    allow_self_approval: bool = False
    crm_vote: CrmVoteSpec | None = None  # voting from inside the CRM (connector.approvals.crm_vote)
    lock: LockSpec | None = None  # record locking while pending (connector.approvals.locking)
    # Keep approvals of unchanged steps on restart / resubmission (connector.approvals.reapproval).
    smart_reapproval: bool = False
    same_approver: SameApprover = "ask_each_step"
    # issue 12: approvals of related records that must be in force before this one starts
    requires: tuple[Requirement, ...] = ()
    documents: tuple[DocumentSpec, ...] = ()  # approval sheets and generated documents


@dataclass(frozen=True)
class MappingSpec:
    source_path: str
    content_hash: str  # sha256 hex of the file's bytes, recorded in the audit log
    connection: str
    object_type: str  # CRM object as the CRM names it, e.g. Opportunity, deals, Deals, deal
    fields: Mapping[str, FieldSpec]
    roles: Mapping[str, tuple[str, ...]]  # role/group name -> user ids
    rules: tuple[RuleSpec, ...]
    match: MatchMode = "first"
    # issue 12: related records by lookup field (`related:`), e.g. company -> company_id
    related: Mapping[str, RelatedSpec] = field(default_factory=dict)

    def api_fields(self) -> list[str]:
        """CRM API names to fetch when reading a record for this mapping."""
        return [f.api_name for f in self.fields.values() if not f.is_virtual]

    def to_canonical(self, api_values: Mapping[str, Any]) -> dict[str, Any]:
        """CRM values keyed by API name (dotted for related fields) -> canonical names."""
        return {name: api_values.get(f.api_name) for name, f in self.fields.items()}

    def to_api(self, canonical_values: Mapping[str, Any]) -> dict[str, Any]:
        """Canonical field values -> CRM API names, for write-back."""
        return {self.fields[name].api_name: value for name, value in canonical_values.items()}

    def canonical_names(self, api_names: frozenset[str] | set[str]) -> frozenset[str]:
        lowered = {n.lower() for n in api_names}
        return frozenset(n for n, f in self.fields.items() if f.api_name.lower() in lowered)


# --- issue 12: cross-record dependencies and service steps ------------------------------------

# The approval state of a related record, as `<related>.approval` criteria see it.
ApprovalState = Literal["none", "waiting", "pending", "approved", "rejected", "expired", "recalled"]
APPROVAL_STATES: tuple[str, ...] = (
    "none",
    "waiting",
    "pending",
    "approved",
    "rejected",
    "expired",
    "recalled",
)


@dataclass(frozen=True)
class RelatedSpec:
    """`related: {company: {field: company_id, object: company}}`: the record the lookup field names."""

    name: str
    field: str  # canonical lookup field of this object holding the related record's id
    object_type: str  # the related record's object on the same connection


@dataclass(frozen=True)
class Requirement:
    """`requires: [{related: company, rule: company-approval}]` on a rule."""

    related: str  # a key of MappingSpec.related
    rule: str  # the rule (of the related object's mapping files) that must have approved it


RouteAction = Literal["continue", "back", "reject"]


@dataclass(frozen=True)
class Route:
    """Where a service step's answer sends the request."""

    action: RouteAction
    to: str | None = None  # action == "back": the step to re-open
    message: ValueRenderer | None = None  # told to the submitter (back) or the rejection reason


@dataclass(frozen=True)
class RouteRule:
    when: Criterion  # over the answer's fields (`response:`) plus `status`
    route: Route


@dataclass(frozen=True)
class HttpCheck:
    """`kind: check`: ask an external service; its answer picks a route."""

    url: str  # ${NAME} is the environment variable NAME
    method: str
    headers: Mapping[str, str]  # header -> value; ${NAME} is the environment variable NAME
    body: ValueRenderer | None  # JSON text template over the record's fields
    timeout: timedelta  # one call
    retries: int  # further attempts after a 429/5xx/time-out, with back-off
    answer: Literal["sync", "callback"]  # callback: the service posts its answer later
    wait: timedelta  # callback: how long to wait for it before on_failure
    callback_secret_env: str | None  # callback: variable holding the HMAC secret
    response: Mapping[str, FieldSpec]  # answer field -> JSON path (api_name) + type
    routes: tuple[RouteRule, ...]
    on_failure: Route  # a failing, silent or unclassified service

    kind: ClassVar[str] = "check"


@dataclass(frozen=True)
class DuplicateCheck:
    """`kind: duplicate`: no other record of the object may hold the same value."""

    field: str  # canonical field whose value must be unique
    message: ValueRenderer | None  # rejection reason; variables: value, other (id), other_name
    on_failure: Route  # the CRM cannot be asked

    kind: ClassVar[str] = "duplicate"


ServiceStep = HttpCheck | DuplicateCheck
