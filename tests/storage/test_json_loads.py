"""db.json_loads, the JSON columns' decoder on both backends: the same values and the same
errors as json.loads, for what the database hands back and for anything else."""

from __future__ import annotations

import json

import pytest

from connector.storage.db import json_loads

VALUES = [
    '{"amount": 50000, "owner": "u-mgr", "nested": {"list": [1, 2.5, null, true]}}',
    '["u-mgr-7"]',
    "{}",
    '"Müller \\u2603"',
    "12",
    "null",
    '  {"spaced": [1, 2]}  \n',  # hand-written JSON: whitespace around the value
    '{"a":1}',
]


@pytest.mark.parametrize("text", VALUES)
def test_json_loads_decodes_as_json_loads_does(text: str) -> None:
    assert json_loads(text) == json.loads(text)
    assert json_loads(text.encode()) == json.loads(text.encode())  # psycopg hands over bytes


@pytest.mark.parametrize("text", ['{"a": 1} {"b": 2}', '{"a": ', "", "nan?", '{"a": 1}x'])
def test_json_loads_refuses_what_json_loads_refuses(text: str) -> None:
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(text)
    with pytest.raises(json.JSONDecodeError) as got:
        json_loads(text)
    assert str(got.value) == str(expected.value)


def test_json_loads_reads_bytes_in_other_encodings_as_json_loads_does() -> None:
    data = '{"name": "Müller"}'.encode("utf-16")
    assert json_loads(data) == json.loads(data) == {"name": "Müller"}
