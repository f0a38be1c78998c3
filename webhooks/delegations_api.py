"""/api/v1/delegations (deputies while away) and /api/v1/requests/<id>/reassign (admins).

    GET  /api/v1/delegations                  yours (away or deputy); admins: everyone's with all=true
    POST /api/v1/delegations                  set a deputy for a date range, optionally per rule
    POST /api/v1/delegations/<id>/cancel      end it now
    POST /api/v1/requests/<id>/reassign       an admin moves an open step from one approver to another

The logic is connector/service/delegation.py, shared with `crm-approvals delegation` and the
web app. Docs: docs/api.md#delegation.
"""

from __future__ import annotations

from datetime import date, datetime

from flask import Blueprint
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from sqlalchemy.orm import Session, sessionmaker

from connector.service.delegation import DelegationService, DelegationView
from connector.service.request_views import RequestDetail
from connector.storage.approval_store import StoredRequest
from webhooks.api import COMMENT, ERROR_HINTS, _approvals, _change, authenticate, caller, on_api_error
from webhooks.errors import WebhookError, bad_request
from webhooks.intake import intake
from webhooks.openapi import operation

blueprint = Blueprint("delegations_api", __name__, url_prefix="/api/v1")
blueprint.register_error_handler(WebhookError, on_api_error)
blueprint.before_request(authenticate)

MAX_ID = 2**31 - 1  # ids are 32-bit integers: a larger number is no delegation (404)
USER_ID = Field(min_length=1, max_length=200)

ERROR_HINTS.update(
    {
        "delegation_cycle": "cancel the delegation that points back, or choose another deputy",
        "invalid_delegation": "check the user ids, the dates (YYYY-MM-DD, ends_on >= starts_on) and the rule",
        "delegation_not_allowed": "set your own deputy, or use an admin token",
        "delegation_not_found": "list yours with GET /api/v1/delegations",
        "reassign_not_allowed": "only an admin token may reassign a step",
        "invalid_reassign": "name someone who is not already an approver of the step",
    }
)


class DelegationOut(BaseModel):
    id: int
    connection: str
    user: str = Field(description="The person away.")
    deputy: str = Field(description="Who acts for them.")
    starts_on: date
    ends_on: date = Field(description="Last day of the absence (inclusive).")
    rule: str | None = Field(description="Only this rule's steps; null: every rule.")
    note: str | None
    created_by: str
    created_at: datetime
    cancelled_at: datetime | None
    in_force: bool = Field(description="Whether the deputy acts today.")

    @classmethod
    def of(cls, view: DelegationView, today: date) -> DelegationOut:
        return cls(
            **{k: getattr(view, k) for k in DelegationView.__dataclass_fields__},
            in_force=view.in_force(today),
        )


class DelegationList(BaseModel):
    delegations: list[DelegationOut]


class DelegationQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user: str | None = Field(
        None, min_length=1, max_length=200, description="Admins: someone else's (away or deputy)."
    )
    all: bool = Field(False, description="Admins: everyone's.")
    include_past: bool = Field(False, description="Also cancelled and finished delegations.")


class DelegationBody(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"deputy": "u-mgr-boris", "starts_on": "2026-12-21", "ends_on": "2027-01-03"}]
        },
    )

    deputy: StrictStr = USER_ID
    starts_on: date
    ends_on: date
    user: StrictStr | None = Field(
        None, min_length=1, max_length=200, description="Admins: whose deputy; default you."
    )
    rule: StrictStr | None = Field(
        None, min_length=1, max_length=200, description="Only this rule; default every rule."
    )
    note: StrictStr | None = Field(None, max_length=2000)
    connection: StrictStr | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="The CRM connection; needed when several are configured.",
    )


class DelegationPath(BaseModel):
    delegation_id: StrictInt = Field(ge=1, le=MAX_ID)


class ReassignBody(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"step_index": 0, "from_user": "u-mgr-boris", "to_user": "u-gm-carla"}]
        },
    )

    step_index: StrictInt = Field(ge=0, le=MAX_ID, description="current_step.index of the request.")
    from_user: StrictStr = Field(
        min_length=1, max_length=200, description="An approver of the step who has not voted."
    )
    to_user: StrictStr = Field(min_length=1, max_length=200, description="Who approves in their place.")
    comment: StrictStr | None = COMMENT


def _service() -> DelegationService:
    _approvals()  # 503 without the approval engine
    return DelegationService.from_runtime(intake().runtime)


def _connection(given: str | None) -> str:
    configured = list(intake().runtime.settings.connections)
    if given is None:
        if len(configured) == 1:
            return configured[0]
        raise bad_request(
            "connection_required",
            "several CRM connections are configured; say which one",
            f'add "connection": one of {", ".join(configured) or "none"}',
        )
    if given not in configured:
        raise bad_request(
            "unknown_connection", f"no connection {given!r}", f"one of {', '.join(configured) or 'none'}"
        )
    return given


@blueprint.get("/delegations")
@operation(
    query=DelegationQuery, response=DelegationList, errors={403: "admin_only: someone else's delegations"}
)
def list_delegations(query: DelegationQuery) -> DelegationList:
    """Delegations where you are away or the deputy; admins may ask for anyone's (`user`) or all."""
    token, service = caller(), _service()
    if (query.all or (query.user not in (None, token.user_id))) and not token.is_admin:
        raise WebhookError(403, "admin_only", "only an admin token may list other people's delegations")
    user = None if query.all else (query.user or token.user_id)
    views = service.find(user=user, include_past=query.include_past)
    today = service.clock().date()
    return DelegationList(delegations=[DelegationOut.of(v, today) for v in views])


@blueprint.post("/delegations")
@operation(
    body=DelegationBody,
    response=DelegationOut,
    errors={
        400: "invalid_delegation: dates, unknown user or rule, own deputy; delegation_cycle: the deputy "
        "hands steps back (A -> B -> A); connection_required, unknown_connection",
        403: "delegation_not_allowed: setting someone else's deputy without an admin token",
    },
)
def set_delegation(body: DelegationBody) -> DelegationOut:
    """Set a deputy while you (or, for admins, `user`) are away: new and open steps go to them."""
    token, service = caller(), _service()
    view = service.set(
        connection=_connection(body.connection),
        user=body.user or token.user_id,
        deputy=body.deputy,
        starts_on=body.starts_on,
        ends_on=body.ends_on,
        rule=body.rule,
        note=body.note,
        actor=token.user_id,
        is_admin=token.is_admin,
    )
    return DelegationOut.of(view, service.clock().date())


@blueprint.post("/delegations/<int:delegation_id>/cancel")
@operation(path=DelegationPath, response=DelegationOut, errors={404: "delegation_not_found"})
def cancel_delegation(delegation_id: int) -> DelegationOut:
    """End a delegation now (yours, one you set, or any for admins)."""
    token, service = caller(), _service()
    view = service.cancel(delegation_id, actor=token.user_id, is_admin=token.is_admin)
    return DelegationOut.of(view, service.clock().date())


@blueprint.post("/requests/<request_id>/reassign")
@operation(
    body=ReassignBody,
    response=RequestDetail,
    errors={
        400: "invalid_reassign: the new approver is already on the step",
        403: "reassign_not_allowed: not an admin token; not_an_approver: from_user is not on the step",
        404: "request_not_found",
        409: "duplicate_vote (from_user already voted), step_closed, stale_step, request_closed",
    },
)
def reassign_step(request_id: str, body: ReassignBody) -> RequestDetail:
    """An admin gives an approver's place on the open step to someone else (history says so)."""
    token, service = caller(), _approvals()

    def reassign(sessions: sessionmaker[Session]) -> StoredRequest:
        return service.reassign(
            sessions,
            request_id,
            user=token.user_id,
            step_index=body.step_index,
            old=body.from_user,
            new=body.to_user,
            comment=body.comment,
            is_admin=token.is_admin,
        )

    return _change(request_id, reassign)
