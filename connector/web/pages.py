"""The pages people use: the approver's inbox, a request (with decisions), my requests, and the
admin's view of all requests. Every decision goes through the ApprovalService, the same code
path as the REST API (webhooks/api.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any

from flask import flash, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.exceptions import NotFound

from connector.approvals.errors import ApprovalError
from connector.approvals.lifecycle import DECISIONS, may_see
from connector.clock import utcnow
from connector.documents.service import documents_of
from connector.rules import MappingSet
from connector.service.request_query import ids_pending_for
from connector.storage import approval_store as store
from connector.storage.approval_store import StoredRequest
from connector.storage.models import ApprovalRequestRow, ApprovalStepRow
from connector.web import i18n, present
from connector.web.blueprint import (
    WebError,
    admin_required,
    after_change,
    approvals,
    blueprint,
    is_htmx,
    login_required,
    runtime,
    user,
)
from connector.web.i18n import gettext

log = logging.getLogger("web.pages")
MAX_COMMENT_CHARS = 4000  # as the REST API
LIST_LIMIT = 200
STATUSES = ("submitted", "waiting", "pending", "approved", "rejected", "recalled", "expired")
OVERDUE_DAYS = (1, 3, 7, 14)


def mappings() -> MappingSet | None:
    return runtime().mappings


def load_visible(session: Session, request_id: str) -> StoredRequest:
    """The request if the signed-in user may see it; 404 otherwise (as if it did not exist)."""
    stored = store.load(session, request_id)
    me = user()
    if stored is None or not may_see(stored.request, me.user_id, me.is_admin):
        raise NotFound()
    return stored


def _summaries(session: Session, ids: list[str]) -> list[present.RequestView]:
    me, sets = user(), mappings()
    found = (store.load(session, i) for i in ids)
    return [present.summarize(s, sets, me.user_id, me.is_admin) for s in found if s is not None]


# --- home and inbox ---------------------------------------------------------------------------


@blueprint.get("/")
@login_required
def home() -> ResponseReturnValue:
    return redirect(url_for("web.inbox"))


@blueprint.get("/inbox")
@login_required
def inbox() -> ResponseReturnValue:
    with runtime().sessions() as session:
        items = _summaries(session, ids_pending_for(session, user().user_id))  # oldest first
    template = "_inbox_items.html" if is_htmx() else "inbox.html"
    return render_template(template, items=items, any_bulk=any(i.bulk_approve for i in items))


@blueprint.post("/inbox/approve")
@login_required
def bulk_approve() -> ResponseReturnValue:
    """Approve the ticked requests, each in its own transaction, where their rule allows it."""
    picked = request.form.getlist("item")
    comment = _comment()
    done, problems = 0, []
    me, service, sets = user(), approvals(), mappings()
    for item in picked:
        request_id, _, step = item.partition(":")
        with runtime().sessions() as session:
            stored = store.load(session, request_id)
        if stored is None or not may_see(stored.request, me.user_id, me.is_admin) or not step.isdigit():
            problems.append(gettext("A request you ticked no longer exists."))
            continue
        view = present.summarize(stored, sets, me.user_id, me.is_admin)
        if not view.bulk_approve:
            problems.append(gettext("%(title)s: its rule asks for one decision at a time.", title=view.title))
            continue
        vote = partial(
            service.vote,
            request_id=request_id,
            user=me.user_id,
            decision="approve",
            step_index=int(step),
            comment=comment,
            is_admin=me.is_admin,
        )
        error = _decide(vote)
        if error is None:
            done += 1
        else:
            problems.append(f"{view.title}: {error}")
    if done:
        after_change()
        flash(i18n.ngettext("%(num)d request approved.", "%(num)d requests approved.", done), "ok")
    for problem in problems:
        flash(problem, "error")
    if not picked:
        flash(gettext("Tick the requests to approve first."), "error")
    return redirect(url_for("web.inbox"), 303)


# --- one request ---------------------------------------------------------------------------------


@blueprint.get("/requests/<request_id>")
@login_required
def request_page(request_id: str) -> ResponseReturnValue:
    return _render_request(request_id)


def _render_request(request_id: str, status: int = 200, **extra: Any) -> ResponseReturnValue:
    me = user()
    with runtime().sessions() as session:
        stored = load_visible(session, request_id)
        view = present.detail(session, stored, mappings(), me.user_id, me.is_admin)
        documents = documents_of(session, request_id)  # approval sheet, generated documents
    template = "_request_main.html" if is_htmx() else "request.html"
    return render_template(template, view=view, documents=documents, **extra), status


@blueprint.post("/requests/<request_id>/<decision>")
@login_required
def decide(request_id: str, decision: str) -> ResponseReturnValue:
    if decision not in DECISIONS:
        raise NotFound()
    me, service = user(), approvals()
    comment = _comment()
    step = request.form.get("step_index", "")
    with runtime().sessions() as session:
        load_visible(session, request_id)
    if not step.isdigit():
        raise WebError(400, gettext("That did not work"), gettext("Reload the page and try again."))
    error = _decide(
        lambda s: service.vote(
            s,
            request_id,
            user=me.user_id,
            decision=decision,
            step_index=int(step),
            comment=comment,
            is_admin=me.is_admin,
        )
    )
    ok = (
        gettext("You approved this request.")
        if decision == "approve"
        else gettext("You rejected this request.")
    )
    return _after(request_id, error, ok, comment=comment if error else None)


@blueprint.post("/requests/<request_id>/recall")
@login_required
def recall(request_id: str) -> ResponseReturnValue:
    me, service = user(), approvals()
    comment = _comment()
    with runtime().sessions() as session:
        load_visible(session, request_id)
    error = _decide(
        lambda s: service.recall(s, request_id, user=me.user_id, comment=comment, is_admin=me.is_admin)
    )
    return _after(request_id, error, gettext("The request was withdrawn."))


@blueprint.post("/requests/<request_id>/reassign")
@admin_required
def reassign(request_id: str) -> ResponseReturnValue:
    me, service = user(), approvals()
    form = request.form
    step = form.get("step_index", "")
    with runtime().sessions() as session:
        load_visible(session, request_id)
    if not step.isdigit():
        raise WebError(400, gettext("That did not work"), gettext("Reload the page and try again."))
    new = form.get("new", "").strip()
    error = _decide(
        lambda s: service.reassign(
            s,
            request_id,
            user=me.user_id,
            step_index=int(step),
            old=form.get("old", ""),
            new=new,
            comment=_comment(),
            is_admin=me.is_admin,
        )
    )
    return _after(request_id, error, gettext("The step now waits for %(name)s.", name=new))


def _comment() -> str | None:
    comment = (request.form.get("comment") or "").strip()
    if len(comment) > MAX_COMMENT_CHARS:
        raise WebError(
            400,
            gettext("That did not work"),
            gettext("A comment may be at most %(num)d characters.", num=MAX_COMMENT_CHARS),
        )
    return comment or None


def _decide(change: Callable[[sessionmaker[Session]], StoredRequest]) -> str | None:
    """Run one change (it saves in its own transaction); a refusal comes back as a message."""
    try:
        change(runtime().sessions)
    except ApprovalError as error:
        log.info("web decision refused: %s", error)
        return i18n.explain_error(error)
    except IntegrityError:
        return gettext(
            "Someone acted on this request at the same moment; the page now shows where it stands."
        )
    return None


def _after(request_id: str, error: str | None, ok: str, **form: Any) -> ResponseReturnValue:
    if error is None:
        after_change()
    if is_htmx():  # swap the page's main part in place, with the message (htmx swaps 2xx only)
        return _render_request(
            request_id, message=error or ok, message_kind="error" if error else "ok", form=form
        )
    flash(error or ok, "error" if error else "ok")
    return redirect(url_for("web.request_page", request_id=request_id), 303)


# --- my requests ---------------------------------------------------------------------------------


@blueprint.get("/mine")
@login_required
def mine() -> ResponseReturnValue:
    with runtime().sessions() as session:
        ids = list(
            session.scalars(
                select(ApprovalRequestRow.id)
                .where(ApprovalRequestRow.submitter == user().user_id)
                .order_by(ApprovalRequestRow.submitted_at.desc())
                .limit(LIST_LIMIT)
            )
        )
        items = _summaries(session, ids)
    return render_template("mine.html", items=items)


# --- admin -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Filters:
    status: str = ""
    rule: str = ""
    connection: str = ""
    overdue: int = 0  # days an open step has waited; 0 = any

    @classmethod
    def from_args(cls) -> Filters:
        args = request.args
        overdue = args.get("overdue", "")
        return cls(
            status=args.get("status", "") if args.get("status", "") in STATUSES else "",
            rule=args.get("rule", "").strip(),
            connection=args.get("connection", "").strip(),
            overdue=int(overdue) if overdue.isdigit() and int(overdue) in OVERDUE_DAYS else 0,
        )


@blueprint.get("/admin")
@admin_required
def admin() -> ResponseReturnValue:
    filters = Filters.from_args()
    query = select(ApprovalRequestRow.id).order_by(ApprovalRequestRow.submitted_at.desc()).limit(LIST_LIMIT)
    if filters.status:
        query = query.where(ApprovalRequestRow.status == filters.status)
    if filters.rule:
        query = query.where(ApprovalRequestRow.rule_name == filters.rule)
    if filters.connection:
        query = query.where(ApprovalRequestRow.connection == filters.connection)
    if filters.overdue:
        query = (
            query.join(ApprovalStepRow, ApprovalStepRow.request_id == ApprovalRequestRow.id)
            .where(ApprovalRequestRow.status == "pending")
            .where(ApprovalStepRow.index == ApprovalRequestRow.current_step)
            .where(ApprovalStepRow.status == "pending")
            .where(ApprovalStepRow.entered_at <= utcnow() - timedelta(days=filters.overdue))
        )
    with runtime().sessions() as session:
        items = _summaries(session, list(session.scalars(query)))
        rules = sorted(set(session.scalars(select(ApprovalRequestRow.rule_name).distinct())))
        connections = sorted(set(session.scalars(select(ApprovalRequestRow.connection).distinct())))
    template = "_admin_results.html" if is_htmx() else "admin.html"
    return render_template(
        template,
        items=items,
        filters=filters,
        statuses=STATUSES,
        rules=rules,
        connections=connections,
        overdue_days=OVERDUE_DAYS,
        limit=LIST_LIMIT,
    )
