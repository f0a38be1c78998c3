"""Languages and formats of the web app: English, Simplified Chinese and Polish.

The language is the user's own locale when the directory knows it, else the browser's
Accept-Language, else English. Dates, times and money are formatted for that locale (Babel).
Message catalogues: connector/web/translations/<lang>/LC_MESSAGES/messages.po (docs/web.md).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po
from babel.numbers import format_currency, format_decimal
from flask import Flask, g, request
from flask_babel import format_date, format_datetime, format_timedelta, get_locale, gettext, ngettext

from connector.approvals.errors import ApprovalError
from connector.clock import utcnow
from connector.rules.coerce import CoercionError, to_date, to_datetime, to_money, to_number

__all__ = ["gettext", "ngettext"]
log = logging.getLogger("web.i18n")

# Language of the catalogue -> the locale used for formats (zh: Simplified Chinese, China).
LOCALES = {"en": "en", "pl": "pl_PL", "zh": "zh_Hans_CN"}
LANGUAGE_NAMES = {"en": "English", "pl": "Polski", "zh": "简体中文"}


def compile_catalogues(directory: Path) -> None:
    """Compile each messages.po whose .mo is missing or older (`make` does it too; a plain
    `pip install .` does not). Written to a temporary file first: workers may start together."""
    for po in sorted(directory.glob("*/LC_MESSAGES/messages.po")):
        mo = po.with_suffix(".mo")
        if mo.exists() and mo.stat().st_mtime >= po.stat().st_mtime:
            continue
        try:
            with po.open("rb") as source:
                catalog = read_po(source)
            fd, temporary = tempfile.mkstemp(dir=po.parent, suffix=".mo.tmp")
            with os.fdopen(fd, "wb") as target:
                write_mo(target, catalog)
            os.replace(temporary, mo)
        except OSError as exc:
            log.warning("could not compile %s (pages stay in English for it): %s", po, exc)


def select_locale() -> str:
    from connector.web import people
    from connector.web.blueprint import runtime

    user = g.get("user")
    own = people.locale_of(runtime(), user.user_id) if user is not None else None
    if own:
        language = own.replace("-", "_").split("_")[0].lower()
        if language in LOCALES:
            return LOCALES[language]
    best = request.accept_languages.best_match(tuple(LOCALES), default="en")
    return LOCALES[best]


def html_lang() -> str:
    """The page's lang attribute: en, pl, zh-Hans."""
    locale = get_locale()
    if locale is None:
        return "en"
    return f"{locale.language}-{locale.script}" if locale.script else locale.language


def _locale() -> str:
    return str(get_locale() or "en")


# --- values ---------------------------------------------------------------------------------


def when(value: datetime | None) -> str:
    return format_datetime(value, "medium") if value is not None else ""


def day(value: date | datetime | str | None) -> str:
    if isinstance(value, str):
        try:
            parsed = to_date(value)
        except CoercionError:
            return value
        return format_date(parsed, "medium") if parsed is not None else ""
    return format_date(value, "medium") if value is not None else ""


def since(value: datetime | None) -> str:
    """How long ago, in words: "3 days"."""
    if value is None:
        return ""
    return format_timedelta(utcnow() - value, granularity="minute", threshold=1)


def money(value: Any, currency: str | None = None) -> str:
    try:
        amount = to_money(value)
    except CoercionError:
        return str(value)
    if amount is None:
        return ""
    if currency and len(currency) == 3 and currency.isalpha():
        return format_currency(amount, currency.upper(), locale=_locale())
    return format_decimal(amount, locale=_locale())


def show(
    value: Any, field_type: str = "string", currency: str | None = None, connection: str | None = None
) -> str:
    """A record value in words for this locale: never a Python repr."""
    from connector.web.blueprint import name_of

    if value is None or value == "" or value == []:
        return "—"
    try:
        if field_type == "money":
            return money(value, currency)
        if field_type == "number":
            number = to_number(value)
            return format_decimal(number, locale=_locale()) if number is not None else "—"
        if field_type == "date":
            return day(value)
        if field_type == "datetime":
            moment = to_datetime(value)
            return when(moment) if moment is not None else "—"
    except CoercionError:
        return str(value)
    if field_type == "user":
        return name_of(connection, str(value))
    if isinstance(value, bool):
        return gettext("Yes") if value else gettext("No")
    if isinstance(value, Decimal | int | float):
        return format_decimal(value, locale=_locale())
    if isinstance(value, list | tuple):
        return ", ".join(show(v, "string", currency, connection) for v in value)
    return str(value)


def humanize(name: str) -> str:
    """A canonical field name as a label: credit_score -> Credit score."""
    text = name.replace("_", " ").replace(".", " ").strip()
    return text[:1].upper() + text[1:]


def register_filters(app: Flask) -> None:
    app.jinja_env.filters.update(when=when, day=day, since=since, money=money, humanize=humanize)
    app.jinja_env.globals.update(
        html_lang=html_lang,
        show=show,
        status_text=status_text,
        mode_text=mode_text,
        event_text=event_text,
        decision_text=decision_text,
    )


# --- errors in words -------------------------------------------------------------------------


def explain_error(error: ApprovalError) -> str:
    messages = {
        "comment_required": gettext("Say why you reject it: this rule needs a comment with every rejection."),
        "not_an_approver": gettext("You are not an approver of the step that is open now."),
        "duplicate_vote": gettext("You have already voted on this step."),
        "request_closed": gettext("This request is already decided or withdrawn."),
        "step_closed": gettext("This step has already been decided; the page now shows where it stands."),
        "stale_step": gettext(
            "The request has moved on to another step; the page now shows where it stands."
        ),
        "stale_request": gettext(
            "Someone acted on this request at the same moment; the page now shows where it stands."
        ),
        "recall_not_allowed": gettext("Only the submitter or an admin may recall this request."),
        "self_approval_not_allowed": gettext(
            "You submitted this request, and its rule does not let submitters approve their own requests."
        ),
        "reassign_not_allowed": gettext("Only an admin may reassign a step."),
        "invalid_reassign": gettext("Name someone who is not already an approver of this step."),
        "delegation_cycle": gettext(
            "Your deputy has chosen you as their own deputy for some of those days: choose someone else, "
            "or ask them to cancel theirs (%(detail)s).",
            detail=str(error),
        ),
        "invalid_delegation": gettext("That deputy cannot be set: %(reason)s", reason=str(error)),
        "delegation_not_found": gettext("There is no such delegation."),
        "delegation_not_allowed": gettext("You may set only your own deputy."),
        "rule_gone": gettext(
            "The rule of this request is no longer in the mapping files; an admin must restore it."
        ),
        "rule_mismatch": gettext(
            "The mapping file changed under this request; an admin must restore the step or cancel it."
        ),
        "chain_error": gettext("The next step has nobody to approve it; an admin must fix the mapping file."),
        "action_render_error": gettext(
            "Writing the result to the CRM failed in the mapping file; an admin must fix it."
        ),
    }
    return messages.get(error.code, str(error))


# --- why a rule matched, in words ----------------------------------------------------------------


def condition_text(operator: str, field: str | None, expected: Any) -> str:
    """One condition of a rule in words, e.g. "Amount is more than 100,000"."""
    group = {
        "all": gettext("All of these:"),
        "any": gettext("At least one of these:"),
        "not": gettext("Not this:"),
        "always": gettext("Every record (the rule has no conditions)"),
    }
    if field is None:
        return group.get(operator, operator)
    phrases = {
        "eq": gettext("%(field)s is %(value)s"),
        "ne": gettext("%(field)s is not %(value)s"),
        "gt": gettext("%(field)s is more than %(value)s"),
        "gte": gettext("%(field)s is at least %(value)s"),
        "lt": gettext("%(field)s is less than %(value)s"),
        "lte": gettext("%(field)s is at most %(value)s"),
        "between": gettext("%(field)s is between %(value)s"),
        "in": gettext("%(field)s is one of %(value)s"),
        "not_in": gettext("%(field)s is none of %(value)s"),
        "contains": gettext("%(field)s contains %(value)s"),
        "starts_with": gettext("%(field)s starts with %(value)s"),
        "is_blank": gettext("%(field)s is empty"),
        "is_not_blank": gettext("%(field)s is filled in"),
        "changed": gettext("%(field)s changed"),
        "changed_from": gettext("%(field)s changed from %(value)s"),
        "changed_to": gettext("%(field)s changed to %(value)s"),
        "older_than": gettext("%(field)s is older than %(value)s"),
        "newer_than": gettext("%(field)s is newer than %(value)s"),
        "within_last": gettext("%(field)s is within the last %(value)s"),
        "within_next": gettext("%(field)s is within the next %(value)s"),
    }
    phrase = phrases.get(operator, "%(field)s " + operator + " %(value)s")
    return phrase % {"field": humanize(field), "value": plain(expected, operator)}


def plain(value: Any, operator: str = "eq") -> str:
    """An expected or actual value of a condition, in words."""
    if value is None or value == "":
        return gettext("empty")
    if isinstance(value, bool):
        return gettext("yes") if value else gettext("no")
    if isinstance(value, Decimal | int | float):
        return format_decimal(value, locale=_locale())
    if isinstance(value, date):
        return day(value)
    if isinstance(value, Sequence) and not isinstance(value, str):
        items = [plain(v) for v in value]
        if operator == "between" and len(items) == 2:
            return gettext("%(low)s and %(high)s") % {"low": items[0], "high": items[1]}
        return ", ".join(items)
    if hasattr(value, "previous") and hasattr(value, "current"):  # a change (criteria.Change)
        return gettext("%(before)s → %(after)s") % {
            "before": plain(value.previous) if value.previous != "<not seen before>" else gettext("not seen"),
            "after": plain(value.current),
        }
    return str(value)


# --- states and events in words ---------------------------------------------------------------


def status_text(status: str) -> str:
    return {
        "submitted": gettext("Submitted"),
        "pending": gettext("Pending"),
        "waiting": gettext("Waiting for a related approval"),
        "approved": gettext("Approved"),
        "rejected": gettext("Rejected"),
        "recalled": gettext("Withdrawn"),
        "expired": gettext("Expired"),
        "skipped": gettext("Skipped"),
        "cancelled": gettext("Cancelled"),
    }.get(status, status)


def mode_text(mode: str, required: int, assigned: int) -> str:
    if mode == "quorum":
        return gettext("%(required)d of %(assigned)d must approve", required=required, assigned=assigned)
    return {
        "one": gettext("one approver"),
        "all": gettext("everyone must approve"),
        "any": gettext("any one of them decides"),
    }.get(mode, mode)


def event_text(kind: str) -> str:
    return {
        "submitted": gettext("Submitted"),
        "entered": gettext("Step opened"),
        "skipped": gettext("Step skipped: its conditions did not apply"),
        "step_approved": gettext("Step approved"),
        "step_rejected": gettext("Step rejected"),
        "sent_back": gettext("Sent back to the previous step"),
        "approved": gettext("Request approved"),
        "rejected": gettext("Request rejected"),
        "recalled": gettext("Request withdrawn"),
        "expired": gettext("Approval expired"),
        "restarted": gettext("Restarted: the record changed"),
        "reassigned": gettext("Step reassigned"),
        "carried_over": gettext("Step approved earlier and unchanged: approval kept"),
        "crm_vote_refused": gettext("A decision set in the CRM was not taken as a vote"),
        "lock_reverted": gettext("Locked field edited; the edit was undone"),
        "lock_flagged": gettext("Locked field edited while pending"),
        "delegated": gettext("Handed to a deputy"),
        "reminded": gettext("Reminder sent"),
        "escalated": gettext("Escalated"),
        "timed_out": gettext("Step timed out"),
        "waiting": gettext("Waiting for a related approval"),
        "resumed": gettext("Resumed: the related approval was granted"),
    }.get(kind, kind)


def decision_text(decision: str) -> str:
    return gettext("approved") if decision == "approve" else gettext("rejected")
