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
from typing import Any, Literal, Protocol

# "step": a step opened (the request is waiting for someone new); see actions.render_outcome_actions
ActionEvent = Literal["submit", "step", "approve", "reject", "recall", "expire"]
ACTION_EVENTS: tuple[ActionEvent, ...] = ("submit", "step", "approve", "reject", "recall", "expire")
StepMode = Literal["one", "all", "any", "quorum"]
RejectBehaviour = Literal["reject", "back"]
MatchMode = Literal["first", "all"]
RejectComment = Literal["required", "optional"]
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


ApproverSource = UserApprovers | RoleApprovers | FieldApprovers | ValueMapApprovers


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

    @property
    def title(self) -> str:
        return self.label or self.name


@dataclass(frozen=True)
class ActionSpec:
    set: Mapping[str, ValueRenderer]  # canonical field -> value renderer


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

    def api_fields(self) -> list[str]:
        """CRM API names to fetch when reading a record for this mapping."""
        return [f.api_name for f in self.fields.values()]

    def to_canonical(self, api_values: Mapping[str, Any]) -> dict[str, Any]:
        """CRM values keyed by API name (dotted for related fields) -> canonical names."""
        return {name: api_values.get(f.api_name) for name, f in self.fields.items()}

    def to_api(self, canonical_values: Mapping[str, Any]) -> dict[str, Any]:
        """Canonical field values -> CRM API names, for write-back."""
        return {self.fields[name].api_name: value for name, value in canonical_values.items()}

    def canonical_names(self, api_names: frozenset[str] | set[str]) -> frozenset[str]:
        lowered = {n.lower() for n in api_names}
        return frozenset(n for n, f in self.fields.items() if f.api_name.lower() in lowered)
