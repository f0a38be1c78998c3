"""Pydantic models of the mapping-file YAML, and translation of their errors.

These models only check the *shape* of a file (known keys, value types, enums). Checks
that need the whole file — a rule naming an undeclared field, a step naming a missing
role — live in :mod:`connector.rules.loader` (a step mode's own settings, such as the
quorum, are checked by its policy in :mod:`connector.approvals.modes`), and the
`when:` criteria are validated by :mod:`connector.rules.criteria`, because their keys
are the admin's own field names and a fixed model could only say "invalid".

Every model forbids unknown keys: a misspelt key (``restart_on_chnage``) must be an
error, never silently ignored.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from connector.approvals.spec import (
    FieldType,
    LockMode,
    MatchMode,
    RejectBehaviour,
    RejectComment,
    SameApprover,
    StepMode,
)
from connector.rules.errors import ErrorCollector, KeyPath, did_you_mean, one_of

Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
APPROVER_KINDS: tuple[str, ...] = ("user", "role", "group", "field", "from_field", "manager_of", "queue")


def fail(message: str, hint: str | None = None) -> PydanticCustomError:
    """A validation error whose text is ours (passed via ctx so braces are not formatted)."""
    return PydanticCustomError("mapping", "{message}", {"message": message, "hint": hint})


def _user_ids(value: Any) -> tuple[str, ...]:
    """One id or a list of ids; numeric ids (HubSpot, Bitrix24) are kept as text."""
    items = value if isinstance(value, list) else [value]
    ids: list[str] = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, str | int) or not str(item).strip():
            raise fail(f"expected user ids (text), got {item!r}", "write ids as text, e.g. 005XX0000012345")
        ids.append(str(item).strip())
    if not ids:
        raise fail("expected at least one user id")
    return tuple(ids)


def _as_text_list(value: Any) -> Any:
    # `approve: Approve` reads as well as `approve: [Approve, Approved]`.
    return [value] if isinstance(value, str) else value


def _as_list(value: Any) -> Any:
    # `Hardware: {user: a}` is as readable as `Hardware: [{user: a}]`; accept both.
    return [value] if isinstance(value, dict) else value


UserIds = Annotated[tuple[str, ...], BeforeValidator(_user_ids)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FieldModel(_Model):
    """`amount: {api: Amount, type: money}` or the shorthand `status: Approval_Status__c`."""

    api: Name
    type: FieldType = "string"

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"api": value} if isinstance(value, str) else value


class ApproverModel(_Model):
    """Exactly one of user / role / group / field / from_field (+ map, default)."""

    user: UserIds | None = None
    role: Name | None = None
    group: Name | None = None
    field: Name | None = None
    from_field: Name | None = None
    map: dict[str, ApproverList] | None = None
    default: ApproverList | None = None
    manager_of: Name | None = None  # a user field (owner), or `approver` in escalation targets
    levels: int | None = None  # with manager_of: how many active managers up the chain
    queue: Name | None = None  # a CRM queue / group / team / department, by name or id

    @model_validator(mode="after")
    def _one_kind(self) -> ApproverModel:
        kinds = [kind for kind in APPROVER_KINDS if getattr(self, kind) is not None]
        if len(kinds) != 1:
            got = f"got {one_of(kinds)}" if kinds else "got none of them"
            raise fail(f"an approver needs exactly one of {one_of(APPROVER_KINDS)}; {got}", _APPROVER_HINT)
        if self.from_field is None and (self.map is not None or self.default is not None):
            raise fail("`map` and `default` only go with `from_field`")
        if self.from_field is not None and not self.map:
            raise fail("`from_field` needs a `map` of value -> approvers", _FROM_FIELD_HINT)
        if self.levels is not None and self.manager_of is None:
            raise fail("`levels` only goes with `manager_of`", _MANAGER_HINT)
        if self.levels is not None and not 1 <= self.levels <= 10:
            raise fail(f"`levels` must be 1 to 10, got {self.levels}", _MANAGER_HINT)
        return self


_APPROVER_HINT = "e.g. `- {user: 005XX0000012345}`, `- {group: finance}` or `- {field: owner_manager}`"
_MANAGER_HINT = "e.g. `- {manager_of: owner, levels: 2}` (the owner's manager and theirs)"
_FROM_FIELD_HINT = "e.g. `{from_field: product_lines, map: {Hardware: [{user: 005XX}]}}`"
ApproverList = Annotated[list[ApproverModel], BeforeValidator(_as_list), Field(min_length=1)]


class EscalateToModel(_Model):
    """Whom a step escalates to: exactly one of manager_of / role / group."""

    manager_of: Literal["approver", "owner"] | None = None
    role: Name | None = None
    group: Name | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        # `escalate_to: approver_manager` reads as well as `{manager_of: approver}`
        if isinstance(value, str) and value.strip() in _MANAGER_SHORTHANDS:
            return {"manager_of": _MANAGER_SHORTHANDS[value.strip()]}
        if isinstance(value, str):
            raise fail(f"unknown escalation target {value!r}", _ESCALATE_TO_HINT)
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> EscalateToModel:
        kinds = [k for k in ("manager_of", "role", "group") if getattr(self, k) is not None]
        if len(kinds) != 1:
            got = f"got {one_of(kinds)}" if kinds else "got none of them"
            raise fail(
                f"`escalate_to` needs exactly one of `manager_of`, `role` or `group`; {got}",
                _ESCALATE_TO_HINT,
            )
        return self


_MANAGER_SHORTHANDS = {"approver_manager": "approver", "owner_manager": "owner"}
_ESCALATE_TO_HINT = (
    "e.g. `escalate_to: {manager_of: approver}`, `{manager_of: owner}`, `{role: general_manager}` "
    "or `{group: finance}`"
)


class TimeoutModel(_Model):
    """`timeout: {after: 5d, action: approve | reject | skip | escalate, reason: ...}`."""

    after: Any = None  # a timer duration, checked by the loader (with its line)
    action: Literal["approve", "reject", "skip", "escalate"]
    reason: str | None = None
    to: EscalateToModel | None = None  # action escalate; default: the step's escalate_to
    mode: Literal["add", "replace"] = "add"


StepKind = Literal["approval", "check", "duplicate"]


class RouteModel(_Model):
    """`continue`, `{back: step, message: ...}` or `{reject: "reason"}` (a bare word is the action)."""

    continue_: bool | None = Field(default=None, alias="continue")
    back: Name | None = None
    reject: str | None = None
    message: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value.strip() == "continue":
                return {"continue": True}
            if value.strip() == "reject":
                return {"reject": ""}
            raise fail(f"unknown route {value!r}", _ROUTE_HINT)
        return value

    @model_validator(mode="after")
    def _one_action(self) -> RouteModel:
        chosen = [v for v in (self.continue_, self.back, self.reject) if v is not None]
        if len(chosen) != 1:
            raise fail("a route needs exactly one of `continue`, `back`, `reject`", _ROUTE_HINT)
        return self


_ROUTE_HINT = (
    'e.g. `then: continue`, `then: {back: documents, message: "Send the registry extract"}` '
    'or `then: {reject: "{{ answer.reason }}"}`'
)


class RouteRuleModel(_Model):
    when: Any = None  # compiled against the answer's fields; absent = always
    then: RouteModel


class CheckModel(_Model):
    """`check:` of a step with `kind: check` (docs/mappings.md#service-steps)."""

    url: Name
    method: Literal["GET", "POST", "PUT", "PATCH"] = "POST"
    headers: dict[str, str] = Field(default_factory=dict)  # header -> value; ${NAME}: an environment variable
    body: str | None = None  # a template rendering JSON text
    timeout: str = "10s"
    retries: int = Field(default=3, ge=0, le=10)
    answer: Literal["sync", "callback"] = "sync"
    wait: str = "2d"
    callback_secret_env: Name | None = None
    response: dict[str, FieldModel] = Field(default_factory=dict)
    routes: list[RouteRuleModel] = Field(min_length=1)
    on_failure: RouteModel


class DuplicateModel(_Model):
    """`duplicate:` of a step with `kind: duplicate`."""

    field: Name
    message: str | None = None
    on_failure: RouteModel = Field(default_factory=lambda: RouteModel.model_validate("reject"))


class StepModel(_Model):
    name: Name
    label: str | None = None  # what people read: "Finance" for the step `finance`
    description: str | None = None
    kind: StepKind = "approval"  # check / duplicate: the service runs the step itself
    mode: StepMode | None = None  # every value has a policy in connector.approvals.modes.STEP_MODES
    approvers: list[ApproverModel] | None = None
    check: CheckModel | None = None
    duplicate: DuplicateModel | None = None
    quorum: Any = None  # int or "60%"; checked by the mode's policy, with the step's approvers
    when: Any = None  # compiled by connector.rules.criteria
    on_reject: RejectBehaviour = "reject"
    smart_reapproval: bool | None = None  # None: the rule's setting
    inputs: list[Name] = Field(default_factory=list)  # more fields the approval depends on
    # timing (connector.approvals.timing); durations are checked by the loader, with their line
    remind_every: Any = None
    remind_max: int | None = None
    escalate_after: Any = None
    escalate_to: EscalateToModel | None = None
    escalate_mode: Literal["add", "replace"] = "add"
    timeout: TimeoutModel | None = None


class CrmVoteModel(_Model):
    """`crm_vote: {decision: approval_decision, comment: approval_comment}`."""

    decision: Name
    comment: Name | None = None
    approve: Annotated[list[Name], BeforeValidator(_as_text_list), Field(min_length=1)] = ["Approve"]
    reject: Annotated[list[Name], BeforeValidator(_as_text_list), Field(min_length=1)] = ["Reject"]


class LockModel(_Model):
    """`lock: {fields: [amount, close_date], mode: revert}`."""

    fields: Annotated[list[Name], BeforeValidator(_as_text_list), Field(min_length=1)]
    mode: LockMode


class ActionModel(_Model):
    set_: dict[str, Any] = Field(alias="set", min_length=1)


class OnModel(_Model):
    submit: ActionModel | None = None
    step: ActionModel | None = None
    approve: ActionModel | None = None
    reject: ActionModel | None = None
    recall: ActionModel | None = None
    expire: ActionModel | None = None


DOCUMENT_EVENTS: dict[str, tuple[str, ...]] = {
    # what `on:` of a document may say -> the request's transitions that (re)render it
    "every_change": (
        "submitted",
        "step_approved",
        "step_rejected",
        "sent_back",
        "approved",
        "rejected",
        "recalled",
        "expired",
        "restarted",
        "reassigned",
    ),
    "submit": ("submitted", "restarted"),
    "step": ("step_approved",),
    "approve": ("approved",),
    "reject": ("rejected",),
    "recall": ("recalled",),
    "expire": ("expired",),
}
DocumentEvent = Literal["every_change", "submit", "step", "approve", "reject", "recall", "expire"]
TemplateName = Annotated[
    str, StringConstraints(strip_whitespace=True, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,100}\.html$")
]


class DocumentModel(_Model):
    """`- {name: approval-sheet, template: approval_sheet.html, on: every_change}`."""

    name: Annotated[
        str, StringConstraints(strip_whitespace=True, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
    ]
    template: TemplateName
    on: list[DocumentEvent] = Field(
        default_factory=lambda: list[DocumentEvent](["every_change"]), min_length=1
    )
    title: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_event(cls, value: Any) -> Any:
        if isinstance(value, dict) and isinstance(value.get("on"), str):
            return {**value, "on": [value["on"]]}  # `on: approve` as well as `on: [approve]`
        return value


class RuleModel(_Model):
    name: Name
    description: str | None = None
    when: Any = None  # compiled by connector.rules.criteria; absent = every record
    steps: list[StepModel] = Field(min_length=1)
    restart_on_change: list[Name] = Field(default_factory=list)
    expires_after: str | None = None
    reject_comment: RejectComment = "required"
    bulk_approve: bool = False
    allow_self_approval: bool = False
    crm_vote: CrmVoteModel | None = None
    lock: LockModel | None = None
    smart_reapproval: bool = False
    same_approver: SameApprover = "ask_each_step"
    on: OnModel = Field(default_factory=OnModel)
    requires: list[RequirementModel] = Field(default_factory=list)
    documents: list[DocumentModel] = Field(default_factory=list)


class RequirementModel(_Model):
    """`requires: [{related: company, rule: company-approval}]`."""

    related: Name
    rule: Name


class RelatedModel(_Model):
    """`related: {company: {field: company_id, object: company}}`."""

    field: Name
    object_type: Name = Field(alias="object")


class MappingFileModel(_Model):
    connection: Name
    object_type: Name = Field(alias="object")
    description: str | None = None
    match: MatchMode = "first"
    fields: dict[str, FieldModel] = Field(min_length=1)
    roles: dict[str, UserIds] = Field(default_factory=dict)
    groups: dict[str, UserIds] = Field(default_factory=dict)
    rules: list[RuleModel] = Field(min_length=1)
    related: dict[str, RelatedModel] = Field(default_factory=dict)


class ConnectionMapModel(_Model):
    """One connection's side of a file shared by several CRMs (`connections:`): the object
    as that CRM names it, its field map, and ids of shared roles/groups on that CRM."""

    object_type: Name = Field(alias="object")
    fields: dict[str, FieldModel] = Field(min_length=1)
    roles: dict[str, UserIds] = Field(default_factory=dict)
    groups: dict[str, UserIds] = Field(default_factory=dict)


class SharedMappingFileModel(_Model):
    """One business object on several connections: a field map per connection, and one set
    of roles, groups and rules for all of them (docs/mappings.md#one-rule-set-for-several-crms)."""

    connections: dict[str, ConnectionMapModel] = Field(min_length=1)
    description: str | None = None
    match: MatchMode = "first"
    roles: dict[str, UserIds] = Field(default_factory=dict)
    groups: dict[str, UserIds] = Field(default_factory=dict)
    rules: list[RuleModel] = Field(min_length=1)


ApproverModel.model_rebuild()
RuleModel.model_rebuild()


# --- error translation -------------------------------------------------------------------


def validate_document(data: Any, errors: ErrorCollector) -> MappingFileModel | None:
    """Validate the YAML data; on failure add readable errors and return None."""
    return _validate(MappingFileModel, data, errors)


SINGLE_CONNECTION_KEYS = ("connection", "object", "fields")


def is_shared_document(data: Any) -> bool:
    """A file with `connections:` maps one business object on several connections."""
    return isinstance(data, dict) and "connections" in data


def validate_shared_document(data: Any, errors: ErrorCollector) -> SharedMappingFileModel | None:
    """Validate a `connections:` file; on failure add readable errors and return None."""
    mixed = [key for key in SINGLE_CONNECTION_KEYS if key in data]
    for key in mixed:
        errors.add(
            (key,),
            f"`{key}` is not used in a file with `connections:`",
            "move it under each connection: `connections: {salesforce: {object: ..., fields: ...}}`, "
            "or drop `connections:` for a file of one connection",
        )
    model = _validate(SharedMappingFileModel, {k: v for k, v in data.items() if k not in mixed}, errors)
    return None if mixed else model


def _validate(root: type[_M], data: Any, errors: ErrorCollector) -> _M | None:
    token = _ROOT.set(root)  # which model the error hints walk
    try:
        return root.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            loc = tuple(part for part in error["loc"] if part != "[key]")
            message, hint = _explain(error, loc)
            errors.add(loc, message, hint)
        return None
    finally:
        _ROOT.reset(token)


def _explain(error: Any, loc: KeyPath) -> tuple[str, str | None]:
    kind, value, ctx = error["type"], error.get("input"), error.get("ctx") or {}
    if kind == "mapping":
        return ctx["message"], ctx.get("hint")
    if kind == "extra_forbidden":
        return _unknown_key(loc)
    if kind == "missing":
        return f"missing required key `{loc[-1]}`", None
    if kind == "literal_error":
        allowed = _literal_values(loc)
        hint = did_you_mean(value, allowed) if isinstance(value, str) else None
        return f"{value!r} is not allowed; expected {one_of(allowed)}", hint
    return _TYPE_MESSAGES.get(kind, _generic)(error, value)


def _unknown_key(loc: KeyPath) -> tuple[str, str | None]:
    key = str(loc[-1])
    allowed = _model_keys(loc[:-1])
    # a key valid elsewhere is better told where it goes than matched to a look-alike here
    hint = _KEY_ELSEWHERE.get(key) or did_you_mean(key, allowed)
    if hint is None and allowed:
        hint = f"expected {one_of(allowed)}"
    return f"unknown key `{key}`", hint


def _generic(error: Any, value: Any) -> tuple[str, str | None]:
    return f"{error['msg']} (got {_short(value)})", None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _expected(what: str, hint: str | None = None) -> Any:
    def message(error: Any, value: Any) -> tuple[str, str | None]:
        extra = "put it in quotes" if what == "text" and isinstance(value, int | float | bool) else hint
        return f"expected {what}, got {_short(value)}", extra

    return message


def _too_short(error: Any, value: Any) -> tuple[str, str | None]:
    return "needs at least one entry", None


def _pattern(error: Any, value: Any) -> tuple[str, str | None]:
    if str((error.get("ctx") or {}).get("pattern", "")).endswith("\\.html$"):
        return (
            f"expected a template file name ending in .html, got {_short(value)}",
            "a file in the documents templates folder (DOCUMENTS_TEMPLATES_DIR), e.g. approval_sheet.html; "
            "no folders",
        )
    return f"expected a name of letters, digits, _ and -, got {_short(value)}", "e.g. approval-sheet"


_TYPE_MESSAGES: dict[str, Any] = {
    "string_pattern_mismatch": _pattern,
    "string_type": _expected("text"),
    "string_too_short": _expected("non-empty text"),
    "dict_type": _expected("a mapping (`key: value` lines)"),
    "model_type": _expected("a mapping (`key: value` lines)"),
    "model_attributes_type": _expected("a mapping (`key: value` lines)"),
    "list_type": _expected("a list (`- item` lines or [a, b])"),
    "tuple_type": _expected("a list (`- item` lines or [a, b])"),
    "too_short": _too_short,
    "bool_type": _expected("true or false"),
    "bool_parsing": _expected("true or false"),
    "int_type": _expected("a whole number"),
    "int_parsing": _expected("a whole number"),
}

# Keys that are valid somewhere else: a better hint than "expected ...".
_KEY_ELSEWHERE: dict[str, str] = {
    "quorum": "`quorum` belongs to a step (with `mode: quorum`)",
    "mode": "`mode` belongs to a step",
    "approvers": "`approvers` belongs to a step",
    "steps": "`steps` belongs to a rule",
    "on_reject": "`on_reject` belongs to a step",
    "expires_after": "`expires_after` belongs to a rule",
    "restart_on_change": "`restart_on_change` belongs to a rule",
    "reject_comment": "`reject_comment` belongs to a rule",
    "bulk_approve": "`bulk_approve` belongs to a rule",
    "allow_self_approval": "`allow_self_approval` belongs to a rule",
    "crm_vote": "`crm_vote` belongs to a rule",
    "lock": "`lock` belongs to a rule",
    "inputs": "`inputs` belongs to a step",
    "decision": "`decision` goes under a rule's `crm_vote:`",
    "same_approver": "`same_approver` belongs to a rule",
    "levels": "`levels` goes with `manager_of` in an approver: `{manager_of: owner, levels: 2}`",
    "remind_every": "`remind_every` belongs to a step",
    "remind_max": "`remind_max` belongs to a step",
    "escalate_after": "`escalate_after` belongs to a step",
    "escalate_to": "`escalate_to` belongs to a step",
    "escalate_mode": "`escalate_mode` belongs to a step",
    "timeout": "`timeout` belongs to a step",
    "set": "`set` goes under an event: `on: {approve: {set: {...}}}`",
    "submit": "events go under `on:` in a rule",
    "approve": "events go under `on:` in a rule",
    "reject": "events go under `on:` in a rule",
    "expire": "events go under `on:` in a rule",
    "recall": "events go under `on:` in a rule",
    "requires": "`requires` belongs to a rule",
    "related": "`related` goes at the top of the file, beside `fields:`",
    "check": "`check` belongs to a step with `kind: check`",
    "duplicate": "`duplicate` belongs to a step with `kind: duplicate`",
    "routes": "`routes` goes under a step's `check:`",
}


# --- walking the models along an error location -------------------------------------------


def _annotation_at(loc: KeyPath) -> Any:
    """The type annotation describing the value at ``loc`` (None if it cannot be followed)."""
    annotation: Any = _ROOT.get()
    for part in loc:
        annotation = _unwrap(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            annotation = _model_field(annotation, str(part))
        elif get_origin(annotation) in (list, tuple):
            annotation = get_args(annotation)[0]
        elif get_origin(annotation) is dict:
            annotation = get_args(annotation)[1]
        else:
            return None
        if annotation is None:
            return None
    return _unwrap(annotation)


def _model_field(model: type[BaseModel], key: str) -> Any:
    for name, info in model.model_fields.items():
        if (info.alias or name) == key:
            return info.annotation
    return None


def _unwrap(annotation: Any) -> Any:
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin is Union or type(annotation).__name__ == "UnionType":
            members = [arg for arg in get_args(annotation) if arg is not type(None)]
            if len(members) != 1:
                return annotation
            annotation = members[0]
        else:
            return annotation


def _model_keys(loc: KeyPath) -> list[str]:
    model = _annotation_at(loc)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return [info.alias or name for name, info in model.model_fields.items()]
    return []


def _literal_values(loc: KeyPath) -> list[str]:
    annotation = _annotation_at(loc)
    if get_origin(annotation) is Literal:
        return [str(arg) for arg in get_args(annotation)]
    return []


_M = TypeVar("_M", bound=BaseModel)
_ROOT: ContextVar[type[BaseModel]] = ContextVar("mapping_root", default=MappingFileModel)
