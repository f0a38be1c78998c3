"""The approvals REST API (/api/v1): list and read approval requests, vote, recall.

Every call carries `Authorization: Bearer <token>` (connector.storage.tokens); the token's user id
is the approver identity used in mapping files. Who may see what:

* admins see every request;
* everyone else sees the requests they submitted or are an assigned approver of (any
  step, any round); anything else answers 404, as if it did not exist.

A vote or recall runs in one transaction through the ApprovalService (optimistic
locking, outbox, audit); the write-back flush is nudged after commit. Docs: docs/api.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from flask import Blueprint, g, jsonify, request
from flask.typing import ResponseReturnValue
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from connector.approvals.errors import (
    ActionRenderError,
    ApprovalError,
    ChainError,
    ConflictError,
    InvalidDecisionError,
    PermissionDeniedError,
    RuleMismatchError,
)
from connector.approvals.lifecycle import (
    DECISIONS,
    ApprovalRequest,
    StepState,
    current_step_state,
    may_see,
    step_votes,
)
from connector.service.approval_service import ApprovalService, to_wire
from connector.service.pipeline import Pipeline
from connector.storage import approval_store as store
from connector.storage.approval_store import RecordKey, StoredRequest
from connector.storage.db import transaction
from connector.storage.models import ApprovalRequestRow
from connector.storage.tokens import TokenInfo, find_token
from connector.worker import Tasks
from webhooks.errors import WebhookError, bad_request, unauthorized
from webhooks.intake import intake, json_body, require_content_type

log = logging.getLogger("webhooks.api")
blueprint = Blueprint("api", __name__, url_prefix="/api/v1")

TOKEN_HINT = (
    "create one with `crm-approvals token create --user USER_ID` and send it as "
    "`Authorization: Bearer <token>`"
)
RELOAD_HINT = "reload the request (GET /api/v1/requests/<id>) and act on what it shows now"
MAX_COMMENT_CHARS = 4000
DEFAULT_LIMIT, MAX_LIMIT = 100, 500

# Status per engine error class, most specific first (errors may also carry `status`).
ERROR_STATUS: tuple[tuple[type[ApprovalError], int], ...] = (
    (InvalidDecisionError, 400),
    (PermissionDeniedError, 403),
    (ConflictError, 409),
    (RuleMismatchError, 409),
    (ChainError, 422),
    (ActionRenderError, 422),  # a mapping template failed: the mapping must be fixed
)
ERROR_HINTS: dict[str, str] = {
    "not_an_approver": "only an approver of the open step (current_step.approvers) or an admin may vote",
    "recall_not_allowed": "only the submitter or an admin token may recall a request",
    "duplicate_vote": "you already voted on this step; " + RELOAD_HINT,
    "request_closed": "the request is decided or withdrawn; " + RELOAD_HINT,
    "step_closed": RELOAD_HINT,
    "stale_step": RELOAD_HINT,
    "stale_request": "someone acted on the request at the same moment; " + RELOAD_HINT,
    "rule_gone": "restore the rule in the mapping files (crm-approvals validate), then try again",
    "rule_mismatch": "the mapping changed under this request; restore the step or recall the request",
    "chain_error": "fix the approvers of that step in the mapping file, then vote again",
    "action_render_error": "fix the action template in the mapping file, then vote again",
    "invalid_decision": "POST to .../approve or .../reject",
    "comment_required": 'say why in {"comment": "..."}: the rule sets `reject_comment: required`',
}


# --- authentication -------------------------------------------------------------------


@blueprint.before_request
def authenticate() -> None:
    g.api_token = _authenticated_token()


def _authenticated_token() -> TokenInfo:
    header = request.headers.get("Authorization", "")
    if not header:
        raise unauthorized("missing_token", "this API needs an API token", TOKEN_HINT)
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        raise unauthorized(
            "invalid_authorization", "the Authorization header must be `Bearer <token>`", TOKEN_HINT
        )
    with transaction(intake().runtime.sessions) as session:
        token = find_token(session, presented.strip())
    if token is None:
        raise unauthorized("invalid_token", "the API token is not valid", TOKEN_HINT)
    if token.revoked:
        raise unauthorized("revoked_token", f"API token {token.id} was revoked", TOKEN_HINT)
    return token


def caller() -> TokenInfo:
    return g.api_token  # type: ignore[no-any-return]


# --- endpoints ------------------------------------------------------------------------


@blueprint.get("/me")
def whoami() -> ResponseReturnValue:
    token = caller()
    return jsonify(user_id=token.user_id, is_admin=token.is_admin, token_id=token.id, label=token.label)


@blueprint.get("/requests")
def list_requests() -> ResponseReturnValue:
    token = caller()
    record_arg, pending_arg = request.args.get("record"), request.args.get("pending_for")
    limit = _limit_arg()
    with intake().runtime.sessions() as session:
        if record_arg is not None:
            ids = _record_request_ids(session, _parse_record(record_arg))
            if pending_arg is not None:
                pending = set(store.ids_pending_for(session, _pending_user(token, pending_arg)))
                ids = [i for i in ids if i in pending]
        else:
            ids = store.ids_pending_for(session, _pending_user(token, pending_arg or "me"))
        found = [s for s in (store.load(session, i) for i in ids) if s is not None and visible(s, token)]
    found.sort(key=lambda s: s.request.updated_at, reverse=True)  # newest information first
    shown = found[:limit]
    return jsonify(requests=[request_summary(s) for s in shown], count=len(shown), total=len(found))


@blueprint.get("/requests/<request_id>")
def get_request(request_id: str) -> ResponseReturnValue:
    with intake().runtime.sessions() as session:
        stored = store.load(session, request_id)
    if stored is None or not visible(stored, caller()):
        raise _not_found(request_id)
    return jsonify(request_detail(stored))


@blueprint.post("/requests/<request_id>/recall")
def recall_request(request_id: str) -> ResponseReturnValue:
    body = _action_body({"comment"})
    token, service = caller(), _approvals()

    def recall(session: Session) -> StoredRequest:
        _load(session, request_id)
        return service.recall(
            session, request_id, user=token.user_id, comment=body.get("comment"), is_admin=token.is_admin
        )

    return _change(recall)


@blueprint.post("/requests/<request_id>/<decision>")
def vote_on_request(request_id: str, decision: str) -> ResponseReturnValue:
    if decision not in DECISIONS:
        raise bad_request(
            "invalid_decision",
            f"{decision!r} is not a decision; expected one of {', '.join(DECISIONS)}",
            "POST to .../approve, .../reject or .../recall",
        )
    body = _action_body({"comment", "step_index"})
    token, service = caller(), _approvals()

    def vote(session: Session) -> StoredRequest:
        seen = _load(session, request_id).request.current_step
        step_index = body.get("step_index", seen)
        return service.vote(
            session,
            request_id,
            user=token.user_id,
            decision=decision,
            step_index=-1 if step_index is None else step_index,  # closed: the engine says so
            comment=body.get("comment"),
            is_admin=token.is_admin,
        )

    return _change(vote)


# --- doing a change -------------------------------------------------------------------


def _change(change: Callable[[Session], StoredRequest]) -> ResponseReturnValue:
    """One transaction for the whole change; the write-back nudge only after it committed."""
    state = intake()
    try:
        with transaction(state.runtime.sessions) as session:
            stored = change(session)
    except IntegrityError:
        # The unique vote / active-request keys caught a concurrent change the version check missed.
        raise WebhookError(
            409, "concurrent_change", "someone acted on this request at the same moment", RELOAD_HINT
        ) from None
    nudge_write_back(state.tasks)
    return jsonify(request_detail(stored))


def nudge_write_back(tasks: Tasks | None) -> None:
    """Best effort: the periodic sweep flushes the outbox anyway."""
    if tasks is None:
        return
    try:
        tasks.flush_outbox()
    except Exception as exc:
        log.warning("could not enqueue the write-back flush (the periodic sweep will send it): %s", exc)


def _approvals() -> ApprovalService:
    processor = intake().runtime.processor
    if not isinstance(processor, Pipeline):
        raise WebhookError(
            503,
            "approvals_unavailable",
            "this server was started without the approval engine",
            "start it with `crm-approvals serve`, which loads the mapping files in MAPPINGS_DIR",
        )
    return processor.approvals


def _load(session: Session, request_id: str) -> StoredRequest:
    stored = store.load(session, request_id)
    if stored is None:
        raise _not_found(request_id)
    return stored


def _not_found(request_id: str) -> WebhookError:
    return WebhookError(
        404,
        "request_not_found",
        f"no approval request {request_id!r} that you may see",
        "list yours with GET /api/v1/requests?pending_for=me",
    )


# --- reading arguments ----------------------------------------------------------------


def _action_body(allowed: set[str]) -> dict[str, Any]:
    """The optional JSON object of a POST; an empty body means no options."""
    if not request.get_data(cache=True):
        return {}
    require_content_type("application/json")
    body = json_body()
    example = (
        '{"comment": "fine by me", "step_index": 0}' if "step_index" in allowed else '{"comment": "..."}'
    )
    if not isinstance(body, dict):
        raise bad_request(
            "invalid_body", f"the body must be a JSON object, got {type(body).__name__}", example
        )
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise bad_request(
            "unknown_field", f"unknown field(s): {', '.join(unknown)}", f"allowed: {sorted(allowed)}"
        )
    _check_comment(body.get("comment"))
    if "step_index" in body:
        _check_step_index(body["step_index"])
    return body


def _check_comment(comment: Any) -> None:
    if comment is not None and not isinstance(comment, str):
        raise bad_request("invalid_comment", "`comment` must be a string", '{"comment": "fine by me"}')
    if comment is not None and len(comment) > MAX_COMMENT_CHARS:
        raise bad_request("invalid_comment", f"`comment` is longer than {MAX_COMMENT_CHARS} characters")


def _check_step_index(step_index: Any) -> None:
    if isinstance(step_index, bool) or not isinstance(step_index, int) or step_index < 0:
        raise bad_request(
            "invalid_step_index",
            f"`step_index` must be a whole number >= 0, got {step_index!r}",
            "send current_step.index from the request you read, or leave it out",
        )


def _limit_arg() -> int:
    raw = request.args.get("limit")
    if raw is None:
        return DEFAULT_LIMIT
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise bad_request("invalid_limit", f"limit must be 1..{MAX_LIMIT}, got {raw!r}")
    return int(raw)


def _pending_user(token: TokenInfo, value: str) -> str:
    if value in ("me", token.user_id):
        return token.user_id
    if not token.is_admin:
        raise WebhookError(
            403,
            "admin_only",
            f"only an admin token may list what {value!r} has to approve",
            "use pending_for=me, or a token created with `crm-approvals token create --admin`",
        )
    return value


def _parse_record(value: str) -> RecordKey:
    parts = value.split(":", 2)  # the record id itself may contain ':'
    if len(parts) != 3 or not all(p.strip() for p in parts):
        raise bad_request(
            "invalid_record",
            f"record must be CONNECTION:OBJECT:ID, got {value!r}",
            "e.g. record=sandbox:deal:D-1001",
        )
    return RecordKey(*(p.strip() for p in parts))


def _record_request_ids(session: Session, record: RecordKey) -> list[str]:
    return list(
        session.scalars(
            select(ApprovalRequestRow.id)
            .where(ApprovalRequestRow.connection == record.connection)
            .where(func.lower(ApprovalRequestRow.object_type) == record.object_type.lower())
            .where(ApprovalRequestRow.record_id == record.record_id)
        )
    )


def visible(stored: StoredRequest, token: TokenInfo) -> bool:
    return may_see(stored.request, token.user_id, token.is_admin)


# --- JSON -----------------------------------------------------------------------------


def request_summary(stored: StoredRequest) -> dict[str, Any]:
    req = stored.request
    current = current_step_state(req)
    return {
        "id": req.id,
        "record": {
            "connection": stored.record.connection,
            "object": stored.record.object_type,
            "id": stored.record.record_id,
            "ref": stored.record.ref,
        },
        "rule": req.rule_name,
        "status": req.status,
        "submitter": req.submitter,
        "submitted_at": _time(req.submitted_at),
        "updated_at": _time(req.updated_at),
        "current_step": step_json(req, current)
        if current is not None and current.status == "pending"
        else None,
        "values": to_wire(req.record),
        "version": req.version,
    }


def request_detail(stored: StoredRequest) -> dict[str, Any]:
    req = stored.request
    return {
        **request_summary(stored),
        "previous_values": to_wire(req.record_previous) if req.record_previous is not None else None,
        "changed_fields": list(req.changed_fields),
        "approved_at": _time(req.approved_at),
        "expires_at": _time(req.expires_at),
        "closed_at": _time(req.closed_at),
        "expired_at": _time(req.expired_at),
        "superseded_by": stored.superseded_by,
        "mapping": {"path": stored.mapping_path, "hash": stored.mapping_hash},
        "steps": [step_json(req, step) for step in req.steps],
        "votes": [_vote_json(v) for v in req.votes],
        "transitions": [
            {
                "seq": t.seq,
                "kind": t.kind,
                "from_status": t.from_status,
                "to_status": t.to_status,
                "step_index": t.step_index,
                "actor": t.actor,
                "acting_admin": t.acting_admin,
                "comment": t.comment,
                "at": _time(t.at),
            }
            for t in req.transitions
        ],
    }


def step_json(req: ApprovalRequest, step: StepState) -> dict[str, Any]:
    return {
        "index": step.index,
        "round": step.round,
        "name": step.name,
        "mode": step.mode,
        "approvers": list(step.approvers),
        "required": step.required,
        "status": step.status,
        "entered_at": _time(step.entered_at),
        "left_at": _time(step.left_at),
        "votes": [_vote_json(v) for v in step_votes(req, step)],
    }


def _vote_json(vote: Any) -> dict[str, Any]:
    return {
        "step_index": vote.step_index,
        "round": vote.round,
        "approver": vote.approver,
        "decision": vote.decision,
        "comment": vote.comment,
        "acting_admin": vote.acting_admin,
        "at": _time(vote.at),
    }


def _time(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


# --- errors ---------------------------------------------------------------------------


@blueprint.errorhandler(WebhookError)
def on_api_error(error: WebhookError) -> ResponseReturnValue:
    _log_rejection(error.status, error.code, error.message)
    headers = {"WWW-Authenticate": 'Bearer realm="crm-approvals"'} if error.status == 401 else {}
    return jsonify(error.to_json()), error.status, headers


@blueprint.errorhandler(ApprovalError)
def on_approval_error(error: ApprovalError) -> ResponseReturnValue:
    status = approval_error_status(error)
    return on_api_error(WebhookError(status, error.code, str(error), ERROR_HINTS.get(error.code)))


def approval_error_status(error: ApprovalError) -> int:
    explicit = getattr(error, "status", None)
    if isinstance(explicit, int):
        return explicit
    return next((status for cls, status in ERROR_STATUS if isinstance(error, cls)), 409)


def _log_rejection(status: int, code: str, message: str) -> None:
    # Never the Authorization header or the body.
    token = g.get("api_token")
    log.warning(
        "api request rejected: %s %s (token %s): %s %s: %s",
        request.method,
        request.path,
        token.id if token is not None else "-",
        status,
        code,
        message,
    )
