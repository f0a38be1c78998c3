"""The web app's blueprint and what every page shares: the signed-in user, the runtime, the
approval service, CSRF, languages and error pages.

Mounted by webhooks/app.py like the CRM intakes; `/` redirects to `/app/`. Sessions are signed
cookies (SECRET_KEY); every POST needs the CSRF token (Flask-WTF), which no other blueprint of
the app uses (webhooks and the API authenticate each call instead).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

from flask import Blueprint, Flask, g, redirect, render_template, request, session, url_for
from flask.blueprints import BlueprintSetupState
from flask.typing import ResponseReturnValue
from flask_babel import Babel
from flask_wtf.csrf import CSRFError, CSRFProtect
from werkzeug.exceptions import HTTPException, NotFound

from connector.approvals.errors import ApprovalError
from connector.config import ConfigError, Settings
from connector.errors import CrmApprovalsError
from connector.runtime import Runtime
from connector.service.approval_service import ApprovalService
from connector.web import i18n, people
from connector.worker import Tasks
from webhooks.api import nudge_write_back
from webhooks.intake import intake

log = logging.getLogger("web")
HERE = Path(__file__).resolve().parent
SESSION_HOURS = 12

blueprint = Blueprint(
    "web",
    __name__,
    url_prefix="/app",
    template_folder="templates",
    static_folder="static",
    static_url_path="/static",
)
csrf = CSRFProtect()
F = TypeVar("F", bound=Callable[..., ResponseReturnValue])


@dataclass(frozen=True)
class WebUser:
    user_id: str
    is_admin: bool


class WebError(CrmApprovalsError):
    """A page that says what went wrong and what to do, with an HTTP status (the web layer)."""

    def __init__(self, status: int, title: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.title = title
        self.message = message


# --- setup --------------------------------------------------------------------------------


@blueprint.record_once
def setup(state: BlueprintSetupState) -> None:
    app = cast(Flask, state.app)
    settings = app.extensions["crm_approvals"].runtime.settings
    app.secret_key = settings.secret_key or None
    app.permanent_session_lifetime = timedelta(hours=SESSION_HOURS)
    app.config.update(
        SESSION_COOKIE_NAME="crm_approvals_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.public_base_url.startswith("https://"),
        WTF_CSRF_CHECK_DEFAULT=False,  # only this blueprint's forms; see protect() below
        WTF_CSRF_TIME_LIMIT=None,  # valid as long as the session
    )
    csrf.init_app(app)
    i18n.compile_catalogues(HERE / "translations")
    Babel(
        app,
        locale_selector=i18n.select_locale,
        default_translation_directories=str(HERE / "translations"),
    )
    i18n.register_filters(app)
    app.add_url_rule("/", "app_root", lambda: redirect(url_for("web.home")))
    _configure_sso(app, settings)


def _configure_sso(app: Flask, settings: Settings) -> None:
    from connector.web import auth

    auth.configure_sso(app, settings)


@blueprint.before_request
def load_user() -> ResponseReturnValue | None:
    if not settings().secret_key:
        raise WebError(
            503,
            "The web app is not set up",
            "SECRET_KEY is not set. Run `crm-approvals init` on a new machine, or set SECRET_KEY "
            "in the environment or .env to a long random value, then restart.",
        )
    if request.method == "POST":
        csrf.protect()
    user_id = session.get("uid")
    g.user = WebUser(user_id, user_id in settings().admin_users) if isinstance(user_id, str) else None
    people.prime(runtime())  # names and the user's locale for the whole request
    return None


@blueprint.app_context_processor
def template_globals() -> dict[str, Any]:
    return {
        "current_user": g.get("user"),
        "sso_enabled": sso_configured(settings()),
        "names": names,
        "forms_ok": bool(settings().secret_key),  # without it there is no session, so no CSRF token
    }


# --- what pages use ---------------------------------------------------------------------


def runtime() -> Runtime:
    return intake().runtime


def settings() -> Settings:
    return runtime().settings


def tasks() -> Tasks | None:
    return intake().tasks


def approvals() -> ApprovalService:
    service = runtime().approvals
    if service is None:
        raise WebError(
            503,
            "Approvals are not available",
            "This server was started without the approval engine; start it with `crm-approvals serve`.",
        )
    return service


def after_change() -> None:
    """A decision was committed: let the worker write it back (best effort, the sweep does too)."""
    nudge_write_back(tasks())


def name_of(connection: str | None, user_id: str | None) -> str:
    return people.display_name(runtime(), connection, user_id) if user_id else ""


def names(user_ids: list[str], connection: str | None) -> str:
    return ", ".join(name_of(connection, u) for u in user_ids)


def user() -> WebUser:
    found: WebUser | None = g.get("user")
    if found is None:  # login_required runs first; this is a bug, not a visitor
        raise RuntimeError("no signed-in user")
    return found


def sso_configured(settings_: Settings) -> bool:
    return bool(settings_.oidc_issuer and settings_.oidc_client_id and settings_.oidc_client_secret)


def login_required(view: F) -> F:
    @wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> ResponseReturnValue:
        if g.get("user") is None:
            return redirect(url_for("web.sign_in", next=request.full_path.rstrip("?")))
        return view(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def admin_required(view: F) -> F:
    @wraps(view)
    @login_required
    def wrapper(*args: Any, **kwargs: Any) -> ResponseReturnValue:
        if not user().is_admin:
            raise NotFound()  # as if it did not exist
        return view(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def safe_next(target: str | None) -> str:
    """Only a path of this app: never send someone to another site after signing in."""
    if target:
        parts = urlsplit(target)
        if not parts.scheme and not parts.netloc and parts.path.startswith("/app/") and "\\" not in target:
            return target
    return url_for("web.home")


def is_htmx() -> bool:
    return request.headers.get("HX-Request") == "true"


def sign_in_as(user_id: str, method: str) -> None:
    session.clear()  # a new session id: nothing from before signing in carries over
    session.permanent = True
    session["uid"] = user_id
    session["via"] = method


# --- errors -------------------------------------------------------------------------------


@blueprint.route("/<path:_rest>")
def not_found(_rest: str) -> ResponseReturnValue:
    raise NotFound()


@blueprint.errorhandler(WebError)
def on_web_error(error: WebError) -> ResponseReturnValue:
    return render_template("error.html", title=error.title, message=error.message), error.status


@blueprint.errorhandler(ConfigError)
def on_config_error(error: ConfigError) -> ResponseReturnValue:
    return on_web_error(WebError(503, "The web app is not set up", str(error)))


@blueprint.errorhandler(CSRFError)
def on_csrf_error(error: CSRFError) -> ResponseReturnValue:
    log.warning("form refused on %s %s: %s", request.method, request.path, error.description)
    return on_web_error(
        WebError(400, i18n.gettext("This form has expired"), i18n.gettext("Reload the page and try again."))
    )


@blueprint.errorhandler(ApprovalError)
def on_approval_error(error: ApprovalError) -> ResponseReturnValue:
    # Only reached when a view lets one through; decision views turn them into messages.
    log.warning("approval refused on %s: %s", request.path, error)
    return on_web_error(WebError(409, i18n.gettext("That did not work"), i18n.explain_error(error)))


@blueprint.errorhandler(HTTPException)
def on_http_error(error: HTTPException) -> ResponseReturnValue:
    if error.code == 404:
        title, message = (
            i18n.gettext("Not found"),
            i18n.gettext(
                "There is nothing here that you may see. It may have been removed, or you may need "
                "to sign in as someone else."
            ),
        )
    else:
        title, message = error.name, error.description or ""
    return render_template("error.html", title=title, message=message), error.code or 500


@blueprint.errorhandler(Exception)
def on_unexpected(error: Exception) -> ResponseReturnValue:
    log.exception("unhandled error on %s %s", request.method, request.path)
    return (
        render_template(
            "error.html",
            title=i18n.gettext("Something went wrong"),
            message=i18n.gettext("This is a bug on our side; it has been logged. Try again later."),
        ),
        500,
    )
