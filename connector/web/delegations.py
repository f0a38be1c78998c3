"""Out of office: the signed-in user sets a deputy for a date range (optionally for one rule),
sees their delegations and those where they are the deputy, and cancels them. The logic is
connector/service/delegation.py, shared with the API and the CLI (docs/web.md#out-of-office)."""

from __future__ import annotations

import logging
from datetime import date, timedelta

from flask import flash, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue

from connector.approvals.errors import ApprovalError
from connector.directory import Directory
from connector.service.delegation import DelegationService
from connector.web import i18n, people
from connector.web.blueprint import blueprint, login_required, runtime, user
from connector.web.i18n import gettext

log = logging.getLogger("web.delegations")


def _service() -> DelegationService:
    return DelegationService.from_runtime(runtime())


def _connection() -> str:
    """The user's connection: the one configured, else the first whose directory knows them."""
    connections = list(runtime().settings.connections)
    me = user().user_id
    for name in connections:
        if people.person(runtime(), name, me) is not None:
            return name
    return connections[0]


def _page(
    error: str | None = None, form: dict[str, str] | None = None, status: int = 200
) -> ResponseReturnValue:
    me = user()
    service = _service()
    connection = _connection()
    today = service.clock().date()
    candidates = [
        p
        for p in Directory.from_runtime(runtime()).people(connection, include_inactive=False)
        if p.id != me.user_id
    ]
    mappings = runtime().mappings
    specs = mappings.mappings if mappings is not None else ()
    rules = sorted({r.name for spec in specs if spec.connection == connection for r in spec.rules})
    return (
        render_template(
            "out_of_office.html",
            delegations=service.find(user=me.user_id, include_past=True)[:50],
            today=today,
            candidates=candidates,
            rules=rules,
            connection=connection,
            error=error,
            form=form or {"starts_on": today.isoformat(), "ends_on": (today + timedelta(days=7)).isoformat()},
        ),
        status,
    )


@blueprint.get("/out-of-office")
@login_required
def out_of_office() -> ResponseReturnValue:
    return _page()


@blueprint.post("/out-of-office")
@login_required
def set_deputy() -> ResponseReturnValue:
    form = {
        key: (request.form.get(key) or "").strip()
        for key in ("deputy", "starts_on", "ends_on", "rule", "note")
    }
    try:
        starts_on, ends_on = date.fromisoformat(form["starts_on"]), date.fromisoformat(form["ends_on"])
    except ValueError:
        return _page(gettext("Give both dates as YYYY-MM-DD."), form, 400)
    if not form["deputy"] or len(form["deputy"]) > 200 or len(form["rule"]) > 200 or len(form["note"]) > 2000:
        return _page(gettext("Choose who acts for you."), form, 400)
    me = user()
    try:
        view = _service().set(
            connection=_connection(),
            user=me.user_id,
            deputy=form["deputy"],
            starts_on=starts_on,
            ends_on=ends_on,
            rule=form["rule"] or None,
            note=form["note"] or None,
            actor=me.user_id,
        )
    except ApprovalError as error:
        log.info("web delegation refused: %s", error)
        return _page(i18n.explain_error(error), form, 400)
    deputy = people.display_name(runtime(), view.connection, view.deputy)
    flash(
        gettext(
            "%(name)s acts for you from %(start)s to %(end)s.",
            name=deputy,
            start=i18n.day(view.starts_on),
            end=i18n.day(view.ends_on),
        ),
        "ok",
    )
    return redirect(url_for("web.out_of_office"), 303)


@blueprint.post("/out-of-office/<int:delegation_id>/cancel")
@login_required
def cancel_deputy(delegation_id: int) -> ResponseReturnValue:
    me = user()
    try:
        _service().cancel(delegation_id, actor=me.user_id, is_admin=me.is_admin)
    except ApprovalError as error:
        flash(i18n.explain_error(error), "error")
    else:
        flash(gettext("The delegation is cancelled; new steps come to you again."), "ok")
    return redirect(url_for("web.out_of_office"), 303)
