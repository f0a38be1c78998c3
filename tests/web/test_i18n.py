"""Languages: English, Simplified Chinese and Polish, chosen from the browser; dates and money
formatted for the locale; catalogues complete and their placeholders intact."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from babel.messages.extract import extract_from_dir
from babel.messages.pofile import read_po

from connector.config import Settings
from connector.runtime import Runtime
from connector.web import i18n
from tests.web.helpers import signed_in, text, web_world
from tests.webhooks.test_api import World

ROOT = Path(__file__).resolve().parents[2]
TRANSLATIONS = ROOT / "connector/web/translations"
LANGUAGES = ("pl", "zh")
PLACEHOLDER = re.compile(r"%\(\w+\)[sd]")


@pytest.fixture
def world(
    tmp_path: Path, settings_factory: Callable[..., Settings], runtime_factory: Callable[[Settings], Runtime]
) -> World:
    return web_world(tmp_path, settings_factory, runtime_factory)


@pytest.mark.parametrize(
    ("accept", "lang", "words", "amount"),
    [
        ("en-GB,en;q=0.9", "en", ("Inbox", "Requests waiting for your decision"), "150,000"),
        ("zh-CN,zh;q=0.9,en;q=0.5", "zh-Hans", ("收件箱", "等待您审批的申请"), "150,000"),
        ("pl-PL,pl;q=0.9", "pl", ("Skrzynka", "Wnioski czekające na Twoją decyzję"), "150\xa0000"),
        ("fr-FR,fr;q=0.9", "en", ("Inbox",), "150,000"),  # not offered: English
    ],
)
def test_language_follows_the_browser(
    world: World, accept: str, lang: str, words: tuple[str, ...], amount: str
) -> None:
    world.submit()
    page = signed_in(world, "u-mgr").get("/app/inbox", headers={"Accept-Language": accept})
    html = page.get_data(as_text=True)
    assert f'<html lang="{lang}">' in html
    for word in words:
        assert word in html, word
    assert amount in html


def test_request_page_in_polish_formats_dates_and_explains_in_polish(world: World) -> None:
    request_id = world.submit()
    page = signed_in(world, "u-mgr").get(f"/app/requests/{request_id}", headers={"Accept-Language": "pl"})
    shown = text(page)
    # Field labels are the mapping's own names; the words around them are Polish.
    assert "Amount jest większe niż 100 000 (wartość: 150 000)" in shown
    assert "Ścieżka zatwierdzania" in shown and "Oczekuje" in shown
    assert re.search(r"\d{1,2} [a-ząćęłńóśźż]{3,4} \d{4}", shown), shown  # e.g. "30 lis 2026"


def test_money_with_a_currency_is_formatted_per_locale() -> None:
    from flask import Flask
    from flask_babel import Babel

    app = Flask("t")
    chosen = {"locale": "en"}
    Babel(app, locale_selector=lambda: chosen["locale"])
    cases = (
        ("en", "£150,000.00", "150,000.5"),
        ("pl_PL", "150\xa0000,00\xa0GBP", "150\xa0000,5"),
        ("zh_Hans_CN", "£150,000.00", "150,000.5"),
    )
    for locale, with_currency, plain in cases:
        chosen["locale"] = locale
        with app.test_request_context():
            assert i18n.money("150000", "GBP") == with_currency, locale
            assert i18n.money("150000.50") == plain, locale
            assert i18n.money("not money") == "not money"


def test_catalogues_translate_every_text_with_the_same_placeholders() -> None:
    method_map = [("connector/web/**.py", "python"), ("connector/web/templates/**.html", "jinja2")]
    found = {
        msg[2] if isinstance(msg[2], str) else msg[2][0] for msg in extract_from_dir(str(ROOT), method_map)
    }
    assert len(found) > 150
    for language in LANGUAGES:
        with (TRANSLATIONS / language / "LC_MESSAGES/messages.po").open("rb") as source:
            catalog = read_po(source)
        translated = {}
        for message in catalog:
            if not message.id:
                continue
            key = message.id if isinstance(message.id, str) else message.id[0]
            strings = message.string if isinstance(message.string, tuple) else (message.string,)
            assert all(strings), f"{language}: {key!r} is not translated"
            assert not message.fuzzy, f"{language}: {key!r} is fuzzy"
            wanted = set(PLACEHOLDER.findall(key if isinstance(message.id, str) else message.id[1]))
            for string in strings:
                assert set(PLACEHOLDER.findall(str(string))) == wanted, f"{language}: {key!r} -> {string!r}"
            translated[key] = strings
        missing = sorted(found - set(translated))
        assert not missing, f"{language} lacks {missing[:5]}: run `make messages` and translate them"


def test_missing_compiled_catalogues_are_compiled_at_start(tmp_path: Path) -> None:
    target = tmp_path / "pl" / "LC_MESSAGES"
    target.mkdir(parents=True)
    (target / "messages.po").write_bytes((TRANSLATIONS / "pl/LC_MESSAGES/messages.po").read_bytes())
    i18n.compile_catalogues(tmp_path)
    from babel.support import Translations

    assert Translations.load(str(tmp_path), ["pl"]).gettext("Inbox") == "Skrzynka"
