"""Admins issue and revoke API tokens from the web app (the same tokens as
`crm-approvals token create`; docs/api.md). A new token is shown once, never again."""

from __future__ import annotations

import logging

from flask import flash, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue

from connector.storage.db import transaction
from connector.storage.tokens import create_token, list_tokens, revoke_token
from connector.web.blueprint import admin_required, blueprint, runtime, user
from connector.web.i18n import gettext

log = logging.getLogger("web.tokens")
MAX_LABEL_CHARS = 200


@blueprint.get("/admin/tokens")
@admin_required
def tokens() -> ResponseReturnValue:
    return _page()


def _page(new_token: str | None = None, error: str | None = None, status: int = 200) -> ResponseReturnValue:
    with runtime().sessions() as session:
        found = list_tokens(session)
    return render_template("tokens.html", tokens=found, new_token=new_token, error=error), status


@blueprint.post("/admin/tokens")
@admin_required
def create() -> ResponseReturnValue:
    user_id = request.form.get("user_id", "").strip()
    label = request.form.get("label", "").strip()
    if not user_id or len(user_id) > 200 or len(label) > MAX_LABEL_CHARS:
        return _page(
            error=gettext("Give the user id the token acts as (as in the mapping files)."), status=400
        )
    with transaction(runtime().sessions) as session:
        info, token = create_token(session, user_id, label, is_admin=request.form.get("is_admin") == "on")
    log.info("admin %s created API token %s for %s", user().user_id, info.id, info.user_id)
    return _page(new_token=token)


@blueprint.post("/admin/tokens/<int:token_id>/revoke")
@admin_required
def revoke(token_id: int) -> ResponseReturnValue:
    with transaction(runtime().sessions) as session:
        info = revoke_token(session, token_id)
    if info is None:
        flash(gettext("There is no such token."), "error")
    else:
        log.info("admin %s revoked API token %s", user().user_id, token_id)
        flash(gettext("Token %(id)s is revoked.", id=token_id), "ok")
    return redirect(url_for("web.tokens"), 303)
