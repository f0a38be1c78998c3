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

from connector.approvals.spec import FieldType, MatchMode, RejectBehaviour, RejectComment, StepMode
from connector.rules.errors import ErrorCollector, KeyPath, did_you_mean, one_of

Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
APPROVER_KINDS: tuple[str, ...] = ("user", "role", "group", "field", "from_field")


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
        return self


_APPROVER_HINT = "e.g. `- {user: 005XX0000012345}`, `- {group: finance}` or `- {field: owner_manager}`"
_FROM_FIELD_HINT = "e.g. `{from_field: product_lines, map: {Hardware: [{user: 005XX}]}}`"
ApproverList = Annotated[list[ApproverModel], BeforeValidator(_as_list), Field(min_length=1)]


class StepModel(_Model):
    name: Name
    label: str | None = None  # what people read: "Finance" for the step `finance`
    description: str | None = None
    mode: StepMode  # every value has a policy in connector.approvals.modes.STEP_MODES
    approvers: list[ApproverModel] = Field(min_length=1)
    quorum: Any = None  # int or "60%"; checked by the mode's policy, with the step's approvers
    when: Any = None  # compiled by connector.rules.criteria
    on_reject: RejectBehaviour = "reject"


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
    on: OnModel = Field(default_factory=OnModel)
    documents: list[DocumentModel] = Field(default_factory=list)


class MappingFileModel(_Model):
    connection: Name
    object_type: Name = Field(alias="object")
    description: str | None = None
    match: MatchMode = "first"
    fields: dict[str, FieldModel] = Field(min_length=1)
    roles: dict[str, UserIds] = Field(default_factory=dict)
    groups: dict[str, UserIds] = Field(default_factory=dict)
    rules: list[RuleModel] = Field(min_length=1)


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
    hint = did_you_mean(key, allowed) or _KEY_ELSEWHERE.get(key)
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
    "set": "`set` goes under an event: `on: {approve: {set: {...}}}`",
    "submit": "events go under `on:` in a rule",
    "approve": "events go under `on:` in a rule",
    "reject": "events go under `on:` in a rule",
    "expire": "events go under `on:` in a rule",
    "recall": "events go under `on:` in a rule",
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
