"""One-click decisions from e-mail or chat (links.decision_links). Opening a link shows a
confirmation page, prefilled; only pressing its button decides (a GET never does: mail
scanners follow links). The link stands for its approver: no sign-in is needed, and it works
once, within DECISION_LINK_HOURS."""

from __future__ import annotations

import logging

from flask import render_template, request
from flask.typing import ResponseReturnValue
from sqlalchemy.exc import IntegrityError

from connector.approvals.errors import ApprovalError, NotAnApproverError
from connector.approvals.lifecycle import current_step_state
from connector.service.approval_service import RequestNotFoundError
from connector.storage import approval_store as store
from connector.web import i18n, links, present
from connector.web.blueprint import after_change, approvals, blueprint, runtime, settings
from connector.web.i18n import gettext
from connector.web.pages import MAX_COMMENT_CHARS, mappings

log = logging.getLogger("web.decide")


def _problem(error: links.LinkError) -> ResponseReturnValue:
    messages = {
        "expired": gettext("This link has expired. Open the request in the app to decide."),
        "used": gettext("This link has already been used."),
        "invalid": gettext("This link is not valid. Copy the whole link from the message."),
    }
    return render_template(
        "error.html", title=gettext("This link does not work"), message=messages[error.problem]
    ), 400


@blueprint.get("/decide")
def confirm() -> ResponseReturnValue:
    token = request.args.get("token", "")
    try:
        claim = links.read_decision(settings(), token)
        with runtime().sessions() as session:
            if links.is_used(session, claim.nonce):
                raise links.LinkError("used")
            stored = store.load(session, claim.request_id)
            if stored is None:
                raise links.LinkError("invalid")
            view = present.detail(session, stored, mappings(), claim.approver_id, False)
    except links.LinkError as error:
        return _problem(error)
    return render_template("decide.html", view=view, claim=claim, token=token, comment="", error=None)


@blueprint.post("/decide")
def decide_by_link() -> ResponseReturnValue:
    token = request.form.get("token", "")
    comment = (request.form.get("comment") or "").strip()[:MAX_COMMENT_CHARS] or None
    try:
        claim = links.read_decision(settings(), token)
    except links.LinkError as error:
        return _problem(error)
    service = approvals()
    try:
        with runtime().sessions() as session:
            if links.is_used(session, claim.nonce):  # said before the vote, which would refuse differently
                raise links.LinkError("used")
            stored = store.load(session, claim.request_id)
        if stored is None:
            raise links.LinkError("invalid")
        open_step = current_step_state(stored.request)
        step = claim.step_index if claim.step_index is not None else (open_step.index if open_step else -1)
        service.vote(
            runtime().sessions,
            claim.request_id,
            user=claim.approver_id,
            decision=claim.decision,
            step_index=step,
            comment=comment,
            # the link is spent in the vote's own transaction: a refused vote leaves it usable
            also=lambda session: links.use(session, claim.nonce, links.DECISION, claim.approver_id),
        )
    except links.LinkError as error:
        return _problem(error)
    except RequestNotFoundError:  # the engine hides the request from whoever may not see it
        return _refused(claim, token, comment, NotAnApproverError("this link's approver may not vote here"))
    except (ApprovalError, IntegrityError) as error:
        return _refused(claim, token, comment, error)
    after_change()
    log.info("user %s decided %s on request %s by link", claim.approver_id, claim.decision, claim.request_id)
    return render_template("decided.html", decision=claim.decision, request_id=claim.request_id)


def _refused(
    claim: links.DecisionClaim, token: str, comment: str | None, error: Exception
) -> ResponseReturnValue:
    """The confirmation page again, saying why the vote was refused (409)."""

    message = (
        i18n.explain_error(error)
        if isinstance(error, ApprovalError)
        else gettext("Someone acted on this request at the same moment; the page now shows where it stands.")
    )
    with runtime().sessions() as session:
        stored = store.load(session, claim.request_id)
        if stored is None:
            return _problem(links.LinkError("invalid"))
        view = present.detail(session, stored, mappings(), claim.approver_id, False)
    return render_template(
        "decide.html", view=view, claim=claim, token=token, comment=comment or "", error=message
    ), 409
