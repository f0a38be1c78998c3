"""Signing in: a magic link by e-mail (signed, short-lived, single use) for users the directory
knows, and OpenID Connect single sign-on when OIDC_ISSUER / OIDC_CLIENT_ID / OIDC_CLIENT_SECRET
are set. Both end in the same signed session cookie (blueprint.sign_in_as)."""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from authlib.common.errors import AuthlibBaseError
from authlib.integrations.flask_client import OAuth
from flask import Flask, current_app, redirect, render_template, request, session, url_for
from flask.typing import ResponseReturnValue
from joserfc.errors import JoseError
from requests import RequestException
from sqlalchemy.exc import IntegrityError

from connector.config import Settings
from connector.notify.queue import queue_message
from connector.storage.db import transaction
from connector.web import links, people
from connector.web.blueprint import (
    WebError,
    after_change,
    blueprint,
    runtime,
    safe_next,
    settings,
    sign_in_as,
    sso_configured,
)
from connector.web.i18n import gettext

log = logging.getLogger("web.auth")
MAX_EMAIL_CHARS = 320
SSO_NAME = "oidc"


# --- magic link -----------------------------------------------------------------------------


@blueprint.get("/sign-in")
def sign_in() -> ResponseReturnValue:
    return render_template("sign_in.html", next=safe_next(request.args.get("next")), email="", error=None)


@blueprint.post("/sign-in")
def send_link() -> ResponseReturnValue:
    email = request.form.get("email", "").strip()
    target = safe_next(request.form.get("next"))
    if not email or "@" not in email or len(email) > MAX_EMAIL_CHARS:
        error = gettext("Enter the e-mail address you use at work, e.g. name@example.com.")
        return render_template("sign_in.html", next=target, email=email, error=error), 400
    rt = runtime()
    person = people.find_by_email(rt, email)
    if person is not None:
        link = links.sign_in_link(settings(), person.id)
        if target != url_for("web.home"):
            link += "&" + _encode_next(target)
        with transaction(rt.sessions) as db:  # the worker renders and sends it (never this request)
            queue_message(
                db,
                connection=person.connection,
                user_id=person.id,
                template="sign_in",
                context={"links": {"sign_in": link}, "expires_minutes": settings().sign_in_link_minutes},
                dedupe_key=f"sign_in:{hashlib.sha256(link.encode()).hexdigest()}",
            )
        after_change()
        log.info("sign-in link queued for user %s", person.id)
    else:
        log.info("sign-in link asked for an unknown or inactive address")
    # The same answer either way: the page must not tell who has an account.
    return render_template("sign_in_sent.html", email=email, minutes=settings().sign_in_link_minutes)


def _encode_next(target: str) -> str:
    from urllib.parse import urlencode

    return urlencode({"next": target})


@blueprint.get("/sign-in/link")
def open_link() -> ResponseReturnValue:
    """Shows a button; only the POST signs in (mail scanners open links, they don't press buttons)."""
    token = request.args.get("token", "")
    rt = runtime()
    try:
        claim = links.read_sign_in(settings(), token)
        with rt.sessions() as db:
            if links.is_used(db, claim.nonce):
                raise links.LinkError("used")
    except links.LinkError as error:
        return _link_problem(error), 400
    return render_template(
        "sign_in_link.html",
        token=token,
        next=safe_next(request.args.get("next")),
        name=people.display_name(rt, None, claim.user_id),
    )


@blueprint.post("/sign-in/link")
def use_link() -> ResponseReturnValue:
    rt = runtime()
    try:
        claim = links.read_sign_in(settings(), request.form.get("token", ""))
        with transaction(rt.sessions) as db:
            links.use(db, claim.nonce, links.SIGN_IN, claim.user_id)
    except links.LinkError as error:
        return _link_problem(error), 400
    except IntegrityError:  # the same link used twice at the same moment
        return _link_problem(links.LinkError("used")), 400
    sign_in_as(claim.user_id, "link")
    log.info("user %s signed in with a link", claim.user_id)
    return redirect(safe_next(request.form.get("next")), 303)


def _link_problem(error: links.LinkError) -> str:
    messages = {
        "expired": gettext("This sign-in link has expired. Ask for a new one below."),
        "used": gettext("This sign-in link has already been used. Ask for a new one below."),
        "invalid": gettext(
            "This sign-in link is not valid. Copy the whole link from the e-mail, or ask for a new one below."
        ),
    }
    return render_template("sign_in.html", next=url_for("web.home"), email="", error=messages[error.problem])


@blueprint.post("/sign-out")
def sign_out() -> ResponseReturnValue:
    session.clear()
    return redirect(url_for("web.sign_in"), 303)


# --- OpenID Connect -----------------------------------------------------------------------------


def configure_sso(app: Flask, settings_: Settings) -> None:
    if not sso_configured(settings_):
        return
    oauth = OAuth(app)
    oauth.register(
        SSO_NAME,
        client_id=settings_.oidc_client_id,
        client_secret=settings_.oidc_client_secret,
        server_metadata_url=f"{settings_.oidc_issuer}/.well-known/openid-configuration",
        client_kwargs={"scope": "openid email profile"},
    )
    app.extensions["crm_approvals_sso"] = oauth


def _client() -> Any:
    oauth = current_app.extensions.get("crm_approvals_sso")
    if oauth is None:
        raise WebError(
            404, gettext("Single sign-on is not set up"), gettext("Sign in with a link by e-mail instead.")
        )
    return oauth.create_client(SSO_NAME)


@blueprint.get("/sign-in/sso")
def sso_start() -> ResponseReturnValue:
    session["sso_next"] = safe_next(request.args.get("next"))
    callback = f"{settings().public_base_url}{url_for('web.sso_callback')}"
    return _client().authorize_redirect(callback)


@blueprint.get("/sign-in/sso/callback")
def sso_callback() -> ResponseReturnValue:
    client = _client()
    if "error" in request.args:
        return _sso_refused(request.args.get("error_description") or request.args["error"])
    try:
        token = client.authorize_access_token()
        claims = token.get("userinfo") or client.userinfo(token=token)
    except (AuthlibBaseError, JoseError, RequestException, ValueError) as error:
        # A forged or replayed answer (state, nonce, signature), or the provider unreachable.
        log.warning("single sign-on failed: %s: %s", type(error).__name__, error)
        return _sso_refused(str(getattr(error, "description", "") or error))
    email = claims.get("email")
    if not isinstance(email, str) or claims.get("email_verified") is False:
        return _sso_refused(gettext("The sign-on service did not give a verified e-mail address."))
    person = people.find_by_email(runtime(), email)
    if person is None:
        return _sso_refused(gettext("%(email)s is not a user of this approval service.", email=email))
    target = safe_next(session.pop("sso_next", None))
    sign_in_as(person.id, "sso")
    log.info("user %s signed in with single sign-on", person.id)
    return redirect(target, 303)


def _sso_refused(reason: str) -> ResponseReturnValue:
    message = gettext("Single sign-on did not work: %(reason)s", reason=reason)
    return render_template("sign_in.html", next=url_for("web.home"), email="", error=message), 401
