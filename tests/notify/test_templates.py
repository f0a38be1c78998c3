"""The shipped notification templates: every message renders in every language, the language
falls back from the reader's locale to the defaults, and admins' mistakes name the file."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from connector.notify.queue import EVENTS
from connector.notify.render import TemplateProblem, Templates, locale_candidates

SHIPPED = Path(__file__).resolve().parents[2] / "templates" / "notifications"
CONTEXT = {
    "recipient": {"id": "u1", "name": "Anna", "email": "a@x.example", "locale": "pl"},
    "links": {"approve": "https://x/a", "reject": "https://x/r", "sign_in": "https://x/s"},
    "actor": {"id": "u2", "name": "Boris"},
    "comment": "Looks fine",
    "step_label": "Finance",
    "request": {
        "id": "r1", "url": "https://x/app/requests/r1", "rule": "deal-approval", "status": "pending",
        "title": "Northwind ERP", "amount": 185000, "currency": "EUR", "submitter_name": "Anna",
        "submitted_at": datetime(2026, 11, 30, tzinfo=UTC), "expires_at": datetime(2027, 5, 29, tzinfo=UTC),
        "step_label": "Finance", "step_number": 3, "step_count": 4, "changed_fields": ["amount"],
        "waiting_for": ["Dmitri"],
    },
}  # fmt: skip


@pytest.mark.parametrize("language", ["en", "pl", "zh"])
@pytest.mark.parametrize("template", [*EVENTS, "sign_in"])
def test_every_shipped_message_renders_in_every_language(template: str, language: str) -> None:
    message = Templates(SHIPPED).render(template, language, CONTEXT)
    assert message.subject and "\n" not in message.subject
    assert message.text.strip() and "{{" not in message.text
    assert f'<html lang="{language}">' in message.html
    if template != "sign_in":
        assert (
            "https://x/app/requests/r1" in message.text and 'href="https://x/app/requests/r1"' in message.html
        )


def test_dates_and_money_follow_the_language() -> None:
    templates = Templates(SHIPPED)
    assert "185\xa0000,00\xa0€" in templates.render("step_opened", "pl", CONTEXT).text
    assert "€185,000.00" in templates.render("step_opened", "en", CONTEXT).text
    assert "2027年5月29日" in templates.render("expiring", "zh", CONTEXT).text
    assert "May 29, 2027" in templates.render("expiring", "en", CONTEXT).text


def test_the_language_falls_back_from_the_most_specific_locale() -> None:
    templates = Templates(SHIPPED)
    assert locale_candidates("zh-CN") == ["zh_CN", "zh"]
    assert templates.language_for("zh_CN") == "zh"
    assert templates.language_for("pl_PL") == "pl"
    assert templates.language_for(None, "pl", "en") == "pl"  # the connection's locale
    assert templates.language_for("fr_FR", None, "zh") == "zh"  # the default
    assert templates.language_for("fr_FR", None, "de") == "en"  # nothing matches: English


def test_a_broken_or_missing_template_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "en").mkdir()
    (tmp_path / "en" / "approved.txt").write_text(
        "{% block subject %}Hi {{ nope }}{% endblock %}{% block text %}x{% endblock %}"
    )
    (tmp_path / "en" / "approved.html").write_text("<p>x</p>")
    templates = Templates(tmp_path)
    with pytest.raises(TemplateProblem, match="approved \\(en\\) failed: 'nope' is undefined"):
        templates.render("approved", "en", {})
    with pytest.raises(TemplateProblem, match="en/rejected.txt is missing"):
        templates.render("rejected", "en", {})


def test_templates_cannot_reach_python_internals(tmp_path: Path) -> None:
    (tmp_path / "en").mkdir()
    (tmp_path / "en" / "x.txt").write_text(
        "{% block subject %}{{ ''.__class__.__mro__ }}{% endblock %}{% block text %}x{% endblock %}"
    )
    (tmp_path / "en" / "x.html").write_text("<p>x</p>")
    with pytest.raises(TemplateProblem, match="unsafe|access to attribute"):
        Templates(tmp_path).render("x", "en", {})
