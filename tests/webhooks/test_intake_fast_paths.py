"""The intake's fast paths answer as the full checks do: `check_storable`'s one scan over an
event's texts, and `require_content_type`'s exact match before parsing the header."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import pytest
from flask import Flask

from connector.events import RecordChangeEvent
from webhooks.errors import WebhookError
from webhooks.intake import STORED_TEXT, check_storable, require_content_type

EVENT = RecordChangeEvent(
    source="sandbox",
    connection="sandbox",
    object_type="deal",
    record_id="D-1",
    event_id="msg_1",
    occurred_at=datetime(2026, 12, 1, tzinfo=UTC),
    dedupe_key="sandbox:std:msg_1",
    changed_fields=("amount",),
    values={"amount": 1},
    origin="user",
    values_signed=True,
    modified_by="u-1",
)


def refusal(event: RecordChangeEvent) -> tuple[str, str] | None:
    try:
        check_storable(event)
    except WebhookError as error:
        return error.code or "", error.message
    return None


@pytest.mark.parametrize("name", list(STORED_TEXT))
@pytest.mark.parametrize("bad", ["\x00", "\ud800", "\udfff"])
def test_a_nul_or_surrogate_in_any_stored_text_is_refused_naming_it(name: str, bad: str) -> None:
    value = getattr(EVENT, name) + bad + "x"
    refused = refusal(dataclasses.replace(EVENT, **{name: value}))
    says = f"the {STORED_TEXT[name]} holds a NUL character or a lone surrogate"
    assert refused == ("invalid_characters", says)


def test_the_first_problem_in_field_order_is_the_one_named() -> None:
    assert refusal(EVENT) is None
    # a NUL in the record id (checked before the origin) wins over a too-long origin ...
    both = dataclasses.replace(EVENT, record_id="D\x00", origin="u" * 300)
    assert refusal(both) == ("invalid_characters", "the record id holds a NUL character or a lone surrogate")
    # ... and a too-long record id over a NUL in the origin
    both = dataclasses.replace(EVENT, record_id="x" * 129, origin="u\x00")
    code, message = refusal(both) or ("", "")
    assert code == "value_too_long" and message.startswith("the record id is 129 characters")
    # texts that are fine alone, with None among them, stay fine (the joined scan adds nothing)
    assert refusal(dataclasses.replace(EVENT, origin=None, modified_by="\ud7ff\ue000")) is None
    assert refusal(dataclasses.replace(EVENT, values={"a": "b\x00"}))[0] == "invalid_value"  # type: ignore[index]


@pytest.mark.parametrize(
    ("content_type", "accepted"),
    [
        ("application/json", True),
        ("application/json; charset=utf-8", True),
        ("Application/JSON", True),
        (" application/json", True),
        ("application/jsonx", False),
        ("text/plain", False),
        ("", False),
        (None, False),
    ],
)
def test_content_types_are_judged_as_before(content_type: str | None, accepted: bool) -> None:
    app = Flask("t")
    headers = {} if content_type is None else {"Content-Type": content_type}
    with app.test_request_context("/webhooks/standard", method="POST", headers=headers):
        if accepted:
            require_content_type("application/json")
        else:
            with pytest.raises(WebhookError) as refused:
                require_content_type("application/json")
            assert refused.value.status == 415
