"""Who people are, as the web app sees them: the one place the user directory plugs in.

Every page and link goes through these functions, so wiring in the directory (names,
e-mail addresses, locales read from the CRMs) and e-mail delivery changes this module only.

Until then (documented in docs/web.md):

* a user's name is their user id;
* a user is known when the approval engine knows the id: named in a mapping file's roles or
  groups, an approver or submitter of a request, holder of an API token, or in ADMIN_USERS;
* their address is ``<user id>@users.invalid`` (``.invalid`` can never receive mail, RFC 2606);
* a sign-in link is not mailed: ``send_sign_in_link`` stores it in ``web_sign_in_links``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from connector.runtime import Runtime
from connector.storage.models import ApiToken, ApprovalRequestRow, ApprovalStepRow
from connector.web.models import SignInLinkRow

INTERIM_EMAIL_DOMAIN = "users.invalid"


@dataclass(frozen=True)
class Person:
    user_id: str
    email: str
    locale: str | None = None  # the CRM's locale of the user, e.g. "pl_PL"


def display_name(runtime: Runtime, connection: str | None, user_id: str) -> str:
    """How to name a user on a page."""
    return user_id


def locale_of(runtime: Runtime, user_id: str) -> str | None:
    """The user's own locale, when the CRM says; the browser's language is used otherwise."""
    return None


def email_of(runtime: Runtime, session: Session, user_id: str) -> str | None:
    """Where a known user's sign-in links go."""
    if user_id not in known_user_ids(runtime, session):
        return None
    return f"{user_id}@{INTERIM_EMAIL_DOMAIN}"


def find_by_email(runtime: Runtime, session: Session, email: str) -> Person | None:
    """The known user with this address, or None."""
    local, _, domain = email.strip().rpartition("@")
    if domain.lower() != INTERIM_EMAIL_DOMAIN or local not in known_user_ids(runtime, session):
        return None
    return Person(local, f"{local}@{INTERIM_EMAIL_DOMAIN}", locale_of(runtime, local))


def known_user_ids(runtime: Runtime, session: Session) -> set[str]:
    known = set(runtime.settings.admin_users)
    known.update(session.scalars(select(ApiToken.user_id)))
    known.update(session.scalars(select(ApprovalRequestRow.submitter).distinct()))
    for approvers in session.scalars(select(ApprovalStepRow.approvers)):
        known.update(approvers)
    for spec in runtime.mappings.mappings if runtime.mappings is not None else ():
        for users in spec.roles.values():
            known.update(users)
    return known


def send_sign_in_link(session: Session, email: str, link: str, *, user_id: str, expires_at: datetime) -> None:
    """Deliver a sign-in link, in the caller's transaction. Today: stored in web_sign_in_links
    (no mail is sent); with notifications this queues the e-mail instead."""
    session.add(SignInLinkRow(user_id=user_id, email=email, link=link, expires_at=expires_at))
