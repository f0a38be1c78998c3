"""The approvals REST API (/api/v1): list and read approval requests, vote, recall.

Every call carries `Authorization: Bearer <token>` (connector.storage.tokens); the token's user id
is the approver identity used in mapping files. Who may see what:

* admins see every request;
* everyone else sees the requests they submitted or are an assigned approver of (any
  step, any round); anything else answers 404, as if it did not exist.

A vote or recall goes through the ApprovalService: read, decided and rendered with no
transaction open, then saved in one (optimistic locking, outbox, audit); the write-back
flush is nudged after commit. Each route's input and output are pydantic models named in
`@operation` (webhooks/openapi.py), which checks them and generates /api/v1/openapi.json
from them. Docs: docs/api.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from flask import Blueprint, Response, current_app, g, jsonify, request
from flask.typing import ResponseReturnValue
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from connector.approvals.modes import Decision
from connector.errors import CrmApprovalsError
from connector.service.approval_service import ApprovalService, RequestNotFoundError
from connector.service.request_query import RequestFilters, Viewer, find_request
from connector.service.request_summaries import request_list
from connector.service.request_views import RequestDetail, RequestList
from connector.storage.approval_store import StoredRequest
from connector.storage.db import unpinged_checkout
from connector.storage.tokens import TokenInfo, find_token
from connector.worker import Tasks
from webhooks.errors import WebhookError, refusal, unauthorized
from webhooks.intake import intake
from webhooks.openapi import openapi_document, operation, requires_token

log = logging.getLogger("webhooks.api")
blueprint = Blueprint("api", __name__, url_prefix="/api/v1")

TOKEN_HINT = (
    "create one with `crm-approvals token create --user USER_ID` and send it as "
    "`Authorization: Bearer <token>`"
)
RELOAD_HINT = "reload the request (GET /api/v1/requests/<id>) and act on what it shows now"
MAX_COMMENT_CHARS = 4000

# The API's own hints per error code (statuses: webhooks/errors.py ERROR_STATUS).
ERROR_HINTS: dict[str, str] = {
    "not_an_approver": "only an approver of the open step (current_step.approvers) or an admin may vote",
    "recall_not_allowed": "only the submitter or an admin token may recall a request",
    "self_approval_not_allowed": "another approver of the step decides; to let submitters approve their own "
    "requests, set allow_self_approval: true on the rule (docs/mappings.md)",
    "duplicate_vote": "you already voted on this step; " + RELOAD_HINT,
    "request_closed": "the request is decided or withdrawn; " + RELOAD_HINT,
    "step_closed": RELOAD_HINT,
    "stale_step": RELOAD_HINT,
    "stale_request": "someone acted on the request at the same moment; " + RELOAD_HINT,
    "rule_gone": "restore the rule in the mapping files (crm-approvals validate), then try again",
    "rule_mismatch": "the mapping changed under this request; restore the step or recall the request",
    "chain_error": "fix the approvers of that step in the mapping file, then vote again",
    "action_render_error": "an admin must fix the action template in the mapping file; then vote again",
    "invalid_decision": "POST to .../approve or .../reject",
    "comment_required": 'say why in {"comment": "..."}: the rule sets `reject_comment: required`',
}


# --- authentication -------------------------------------------------------------------


@blueprint.before_request
def authenticate() -> None:
    view = current_app.view_functions.get(request.endpoint or "")
    if requires_token(view):
        g.api_token = _authenticated_token(reads_in_call=getattr(view, _READS_IN_CALL, False))


def _authenticated_token(reads_in_call: bool = False) -> TokenInfo:
    header = request.headers.get("Authorization", "")
    if not header:
        raise unauthorized("missing_token", "this API needs an API token", TOKEN_HINT)
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        raise unauthorized(
            "invalid_authorization", "the Authorization header must be `Bearer <token>`", TOKEN_HINT
        )
    try:
        token = _find_token(presented.strip(), reads_in_call)
    except BaseException:
        _end_call_session()
        raise
    if not reads_in_call:  # the view reads and writes in sessions of its own
        _end_call_session(commit=True)
    if token is None:
        raise unauthorized("invalid_token", "the API token is not valid", TOKEN_HINT)
    if token.revoked:
        raise unauthorized("revoked_token", f"API token {token.id} was revoked", TOKEN_HINT)
    return token


def caller() -> TokenInfo:
    return g.api_token


# --- one connection per call ------------------------------------------------------------
#
# The token is checked on the connection (and, on SQLite, in the transaction) that the call's
# own reads then use: one pool checkout per call instead of one for the token and one for the
# view. On PostgreSQL a reading call's connection is in autocommit: its statements run as
# they do in a READ COMMITTED transaction (each sees what was committed when it starts) with
# no BEGIN and ROLLBACK around them, and psycopg keeps its prepared statements (a ROLLBACK
# drops them all). A revoked token stops working at the next call: nothing is cached.
_READS_IN_CALL = "crm_approvals_reads_in_call"


def reads_in_call(view: Callable[..., ResponseReturnValue]) -> Callable[..., ResponseReturnValue]:
    """Mark a read-only view that reads through `call_session()` (put it above `@operation`)."""
    setattr(view, _READS_IN_CALL, True)
    return view


def _find_token(presented: str, read_only: bool) -> TokenInfo | None:
    """The token, read as the first statement on the call's connection, which is not pinged
    when checked out (connector/storage/db.py `unpinged_checkout`): this read is the ping. If
    the connection turns out dead, the pool has dropped it (and all pooled before it), and the
    read is done again on a new one, as a failed ping would have it."""
    with unpinged_checkout():
        session = _open_call_session(read_only)
    try:
        return find_token(session, presented)
    except DBAPIError as error:
        if not error.connection_invalidated:
            raise
        _end_call_session()
    log.info("API connection was dead; the token check goes on on a new one")
    return find_token(_open_call_session(read_only), presented)


def call_session() -> Session:
    """The session the call's token was checked in (only for views marked `reads_in_call`)."""
    session: Session = g.api_session
    return session


def _open_call_session(read_only: bool) -> Session:
    runtime = intake().runtime
    conn = runtime.engine.connect()
    if read_only and conn.dialect.name == "postgresql":
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
    g.api_session = session = runtime.sessions(bind=conn)
    return session


def _end_call_session(commit: bool = False) -> None:
    """Give the call's connection back to the pool, committing first if asked (what the
    token check wrote: its last use, at most once a minute); otherwise rolled back."""
    session: Session | None = g.pop("api_session", None)
    if session is None:
        return
    conn = session.get_bind()
    try:
        if commit and session.in_transaction():
            session.commit()
    finally:
        session.close()
        if isinstance(conn, Connection):
            conn.close()


@blueprint.after_request
def _commit_call_session(response: Response) -> Response:
    """A read that answered (not with a 500) keeps what its token check wrote."""
    if response.status_code < 500:
        try:
            _end_call_session(commit=True)
        except SQLAlchemyError as error:  # the answer stands; only the token's last use is lost
            log.warning("could not record the API token's last use: %s", error)
    return response


@blueprint.teardown_request
def _close_call_session(_error: BaseException | None) -> None:
    _end_call_session()  # a call that failed: rolled back


# --- what goes in and out -------------------------------------------------------------


class Me(BaseModel):
    user_id: str = Field(description="The CRM user id the token acts as.")
    is_admin: bool
    token_id: int
    label: str


class RequestListQuery(RequestFilters):
    pending_for: str | None = Field(
        None,
        min_length=1,
        description="`me`, or a user id (admins only): requests whose open step waits for their vote. "
        "Assumed `me` when no other filter is given and `all` is not true.",
    )
    all: bool = Field(
        False,
        description="true: every request you may see (admins: every request), not only yours to vote on.",
    )


COMMENT = Field(
    None, max_length=MAX_COMMENT_CHARS, description=f"A string of up to {MAX_COMMENT_CHARS} characters."
)


class RecallBody(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"comment": "wrong amount"}]})

    comment: StrictStr | None = COMMENT


class VoteBody(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"comment": "fine by me", "step_index": 0}]}
    )

    comment: StrictStr | None = COMMENT
    step_index: StrictInt | None = Field(
        None,
        ge=0,
        description="current_step.index of the request you read (a whole number >= 0); "
        "leave it out for the step open when the server reads the request.",
    )


class VotePath(BaseModel):
    request_id: str
    decision: Decision = Field(description="approve or reject: POST to .../approve or .../reject.")


CHANGE_ERRORS = {
    404: "request_not_found: no such request, or one you may not see (for every action alike)",
    409: "request_closed, stale_request, concurrent_change, rule_gone, rule_mismatch",
    503: "action_render_error, approvals_unavailable",
}


# --- endpoints ------------------------------------------------------------------------


@blueprint.get("/openapi.json")
@operation(auth=False)
def openapi_json() -> ResponseReturnValue:
    """This document: the API in OpenAPI 3.1, generated from the routes (no token needed)."""
    return jsonify(openapi_document(current_app))


@blueprint.get("/me")
@operation(response=Me)
def whoami() -> Me:
    """Who the token acts as."""
    token = caller()
    return Me(user_id=token.user_id, is_admin=token.is_admin, token_id=token.id, label=token.label)


@blueprint.get("/requests")
@reads_in_call
@operation(
    query=RequestListQuery,
    response=RequestList,
    errors={403: "admin_only: pending_for names someone else and the token is not an admin's"},
)
def list_requests(query: RequestListQuery) -> ResponseReturnValue:
    """Requests you may see, newest submitted first, a page at a time.

    With no filter at all, what waits for your vote (pending_for=me). Every filter narrows the
    list. Pass next_cursor as cursor to read the next page. docs/api.md#get-apiv1requests
    """
    token = caller()
    filtered = query.model_fields_set - {"limit", "cursor", "all"}
    pending_for = query.pending_for or (None if filtered or query.all else "me")
    if pending_for is not None:
        query = query.model_copy(update={"pending_for": _pending_user(token, pending_for)})
    page = request_list(call_session(), query, Viewer(token.user_id, token.is_admin))
    return jsonify(page)  # a RequestList as JSON, built without a model per row (request_summaries)


@blueprint.get("/requests/<request_id>")
@reads_in_call
@operation(response=RequestDetail, errors={404: "request_not_found: no such request, or one you may not see"})
def get_request(request_id: str) -> RequestDetail:
    """A request with its full history: steps, votes, transitions, the mapping file."""
    token = caller()
    stored = find_request(call_session(), request_id, Viewer(token.user_id, token.is_admin))
    if stored is None:
        raise _not_found(request_id)
    return RequestDetail.of(stored)


@blueprint.post("/requests/<request_id>/recall")
@operation(
    body=RecallBody,
    response=RequestDetail,
    errors={403: "recall_not_allowed: only the submitter or an admin may recall", **CHANGE_ERRORS},
)
def recall_request(request_id: str, body: RecallBody) -> RequestDetail:
    """Withdraw a submitted or pending request (the submitter, or an admin)."""
    token, service = caller(), _approvals()

    def recall(sessions: sessionmaker[Session]) -> StoredRequest:
        return service.recall(
            sessions, request_id, user=token.user_id, comment=body.comment, is_admin=token.is_admin
        )

    return _change(request_id, recall)


@blueprint.post("/requests/<request_id>/<decision>")
@operation(
    path=VotePath,
    body=VoteBody,
    response=RequestDetail,
    errors={
        403: "not_an_approver: neither an approver of the open step nor an admin; "
        "self_approval_not_allowed: the caller submitted the request and its rule does not allow that",
        409: "duplicate_vote, step_closed, stale_step, " + CHANGE_ERRORS[409],
        422: "chain_error: the next step's approvers can't be resolved",
        404: CHANGE_ERRORS[404],
        503: CHANGE_ERRORS[503],
    },
)
def vote_on_request(request_id: str, decision: Decision, body: VoteBody) -> RequestDetail:
    """Approve or reject the open step (an approver of it who has not voted yet, or an admin)."""
    token, service = caller(), _approvals()

    def vote(sessions: sessionmaker[Session]) -> StoredRequest:
        return service.vote(
            sessions,
            request_id,
            user=token.user_id,
            decision=decision,
            step_index=body.step_index,  # None: the current step
            comment=body.comment,
            is_admin=token.is_admin,
        )

    return _change(request_id, vote)


# --- doing a change -------------------------------------------------------------------


def _change(request_id: str, change: Callable[[sessionmaker[Session]], StoredRequest]) -> RequestDetail:
    """The change saves in one transaction; the write-back nudge only after it committed."""
    state = intake()
    try:
        stored = change(state.runtime.sessions)
    except RequestNotFoundError:
        raise _not_found(request_id) from None
    except IntegrityError:
        # The unique vote / active-request keys caught a concurrent change the version check missed.
        raise WebhookError(
            409, "concurrent_change", "someone acted on this request at the same moment", RELOAD_HINT
        ) from None
    nudge_write_back(state.tasks)
    return RequestDetail.of(stored)


def nudge_write_back(tasks: Tasks | None) -> None:
    """Best effort: the periodic sweep flushes the outbox anyway."""
    if tasks is None:
        return
    try:
        tasks.flush_outbox()
    except Exception as exc:
        log.warning("could not enqueue the write-back flush (the periodic sweep will send it): %s", exc)


def _approvals() -> ApprovalService:
    service = intake().runtime.approvals
    if service is None:
        raise WebhookError(
            503,
            "approvals_unavailable",
            "this server was started without the approval engine",
            "start it with `crm-approvals serve`, which loads the mapping files in MAPPINGS_DIR",
        )
    return service


def _not_found(request_id: str) -> WebhookError:
    return WebhookError(
        404,
        "request_not_found",
        f"no approval request {request_id!r} that you may see",
        "list yours with GET /api/v1/requests?pending_for=me",
    )


# --- reading arguments ----------------------------------------------------------------


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


# --- errors ---------------------------------------------------------------------------


@blueprint.errorhandler(CrmApprovalsError)
def on_api_error(error: CrmApprovalsError) -> ResponseReturnValue:
    answer = refusal(error, ERROR_HINTS.get(error.code or ""))
    _log_rejection(answer.status, answer.code, answer.message)
    headers = {"WWW-Authenticate": 'Bearer realm="crm-approvals"'} if answer.status == 401 else {}
    return jsonify(answer.to_json()), answer.status, headers


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
