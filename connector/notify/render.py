"""Rendering notifications from the admin-editable templates in templates/notifications/.

Each message is two files per language directory:

    <lang>/<template>.txt    blocks `subject` and `text` (plain text: the e-mail's text part
                             and the chat message)
    <lang>/<template>.html   the e-mail's HTML part (autoescaped), usually extending
                             `_layout.html` at the top of templates/notifications/

The language is the recipient's CRM locale, tried from the most specific form down
(`zh_CN` -> `zh`), then the connection's `<NAME>_LOCALE`, then NOTIFY_DEFAULT_LOCALE, then `en`.
Templates run in jinja2's SandboxedEnvironment: admins edit them, so they may not reach
Python internals. Dates and money are formatted for the language with Babel filters
(`date`, `datetime`, `money(currency)`, `number`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from babel import Locale, UnknownLocaleError
from babel.dates import format_date, format_datetime
from babel.lists import format_list
from babel.numbers import format_currency, format_decimal
from jinja2 import (
    FileSystemLoader,
    StrictUndefined,
    TemplateError,
    TemplateNotFound,
    pass_context,
    select_autoescape,
)
from jinja2.runtime import Context
from jinja2.sandbox import SandboxedEnvironment

FALLBACK_LANGUAGE = "en"

# One-click links and the like: (request id, recipient user id, step index) -> {name: URL},
# merged into the `links` variable of "step opened" messages. connector/wiring.py gives the
# runtime the web app's decision links (Runtime.link_providers).
LinkProvider = Callable[[str, str, int | None], Mapping[str, str]]


class TemplateProblem(Exception):
    """A template is missing or failed: a person must fix templates/notifications/."""


@dataclass(frozen=True)
class RenderedMessage:
    subject: str
    text: str
    html: str
    language: str  # the template directory used, e.g. "pl"


class Templates:
    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.env = SandboxedEnvironment(
            loader=FileSystemLoader(str(self.directory)),
            autoescape=select_autoescape(enabled_extensions=("html",), default_for_string=False),
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters.update(LOCALE_FILTERS)

    def languages(self) -> list[str]:
        if not self.directory.is_dir():
            return []
        return sorted(p.name for p in self.directory.iterdir() if p.is_dir() and not p.name.startswith("_"))

    def language_for(self, *locales: str | None) -> str:
        """The first template directory matching one of the locales, most specific form first."""
        available = set(self.languages())
        for locale in locales:
            for candidate in locale_candidates(locale):
                if candidate in available:
                    return candidate
        return FALLBACK_LANGUAGE

    def render(self, template: str, language: str, context: Mapping[str, Any]) -> RenderedMessage:
        """Subject, text and HTML of `template` in `language`; TemplateProblem names the file."""
        variables = {**context, "language": language}
        text_name, html_name = f"{language}/{template}.txt", f"{language}/{template}.html"
        try:
            text_template = self.env.get_template(text_name)
            blocks = text_template.new_context(variables)
            subject = "".join(text_template.blocks["subject"](blocks)).strip()
            text = "".join(text_template.blocks["text"](blocks)).strip() + "\n"
            html = self.env.get_template(html_name).render(variables)
        except TemplateNotFound as exc:
            raise TemplateProblem(
                f"notification template {self.directory / str(exc.name)} is missing; every template needs "
                f"<lang>/{template}.txt (blocks subject and text) and <lang>/{template}.html"
            ) from exc
        except KeyError as exc:
            raise TemplateProblem(
                f"{self.directory / text_name} needs a {{% block {exc.args[0]} %}}...{{% endblock %}}"
            ) from exc
        except TemplateError as exc:
            raise TemplateProblem(f"notification template {template} ({language}) failed: {exc}") from exc
        return RenderedMessage(" ".join(subject.split()), text, html, language)


def locale_candidates(locale: str | None) -> list[str]:
    """`zh-CN` -> [zh_CN, zh]; `pl` -> [pl]; blank -> []."""
    if not locale or not locale.strip():
        return []
    normal = locale.strip().replace("-", "_")
    parts = normal.split("_")
    return list(dict.fromkeys(["_".join(parts[:n]) for n in range(len(parts), 0, -1)]))


def babel_locale(language: str) -> Locale:
    try:
        return Locale.parse(language.replace("-", "_"))
    except (UnknownLocaleError, ValueError):
        return Locale.parse(FALLBACK_LANGUAGE)


def _locale(ctx: Context) -> Locale:
    return babel_locale(str(ctx.get("language") or FALLBACK_LANGUAGE))


@pass_context
def date_filter(ctx: Context, value: Any, style: str = "medium") -> str:
    moment = _as_datetime(value)
    if moment is None:
        return "" if value is None else str(value)
    day = moment.date() if isinstance(moment, datetime) else moment
    return format_date(day, style, locale=_locale(ctx))


@pass_context
def datetime_filter(ctx: Context, value: Any, style: str = "medium") -> str:
    moment = _as_datetime(value)
    if not isinstance(moment, datetime):
        return date_filter(ctx, value, style)
    return format_datetime(moment, style, tzinfo=moment.tzinfo, locale=_locale(ctx))


@pass_context
def money_filter(ctx: Context, value: Any, currency: str | None = None) -> str:
    number = _as_decimal(value)
    if number is None:
        return "" if value is None else str(value)
    if not currency:
        return format_decimal(number, locale=_locale(ctx))
    return format_currency(number, str(currency), locale=_locale(ctx))


@pass_context
def number_filter(ctx: Context, value: Any) -> str:
    number = _as_decimal(value)
    return format_decimal(number, locale=_locale(ctx)) if number is not None else str(value or "")


@pass_context
def names_filter(ctx: Context, values: Sequence[Any] | None) -> str:
    """["Anna", "Boris", "Carla"] -> "Anna, Boris and Carla" in the reader's language."""
    items = [str(v) for v in values or () if v not in (None, "")]
    return format_list(items, locale=_locale(ctx)) if items else ""


# Filters formatting values for the reader's language (Babel/CLDR data); they read the
# `language` variable, so one environment serves every language and thread.
LOCALE_FILTERS: dict[str, Callable[..., str]] = {
    "date": date_filter,
    "datetime": datetime_filter,
    "money": money_filter,
    "number": number_filter,
    "names": names_filter,
}


def _as_datetime(value: Any) -> date | None:
    if isinstance(value, date):
        return value
    if isinstance(value, str) and value:
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    return None


def _as_decimal(value: Any) -> Decimal | None:
    if value is None or isinstance(value, bool) or value == "":
        return None
    try:
        return Decimal(str(value))
    except InvalidOperation:
        return None
