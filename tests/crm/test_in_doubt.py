"""Time-outs on the shared HTTP path (connector/crm/http.py, used by the sandbox, HubSpot, Zoho
and Bitrix24 adapters): a write that went out and got no answer is in doubt and not sent
again; a read is retried; a connection that never opened is safe to retry for both."""

from __future__ import annotations

import json

import pytest
import requests
import responses
from urllib3.exceptions import MaxRetryError, NewConnectionError

from connector.config import Settings, parse_connections
from connector.crm.base import RecordUpdate
from connector.crm.errors import InDoubtError, RetriableError
from connector.crm.retry import RetryPolicy
from connector.crm.sandbox import SandboxAdapter
from tests.contract.harness_sandbox import ENV, READ_URL, UPDATE_URL


def adapter(sleeps: list[float]) -> SandboxAdapter:
    connections = parse_connections(ENV)
    built = SandboxAdapter.from_config(connections["sandbox"], Settings(connections=connections))
    built.retry = RetryPolicy(attempts=3, sleep=sleeps.append)
    return built


def refused() -> requests.ConnectionError:
    reason = NewConnectionError(None, "Failed to establish a new connection: [Errno 111] Connection refused")  # type: ignore[arg-type]
    return requests.ConnectionError(MaxRetryError(None, "/api/v1/objects/deal/batch-update", reason))  # type: ignore[arg-type]


UPDATED = (200, {}, json.dumps({"results": [{"id": "D-1", "ok": True}]}))


@pytest.mark.parametrize(
    "failure",
    [
        requests.ReadTimeout("read timed out"),
        requests.ConnectionError("('Connection aborted.', ConnectionResetError(104, 'reset by peer'))"),
    ],
)
def test_a_write_without_an_answer_is_in_doubt_and_sent_once(failure: Exception) -> None:
    sleeps: list[float] = []
    with responses.RequestsMock() as rsps:
        rsps.add(responses.POST, UPDATE_URL, body=failure)
        with pytest.raises(InDoubtError):
            adapter(sleeps).update_records("deal", [RecordUpdate("D-1", {"stage": "won"})])
        assert len(rsps.calls) == 1 and sleeps == []


def test_a_write_whose_connection_was_refused_is_retried() -> None:
    sleeps: list[float] = []
    with responses.RequestsMock() as rsps:
        rsps.add(responses.POST, UPDATE_URL, body=refused())
        rsps.add_callback(responses.POST, UPDATE_URL, callback=lambda _request: UPDATED)
        (result,) = adapter(sleeps).update_records("deal", [RecordUpdate("D-1", {"stage": "won"})])
        assert result.ok and len(rsps.calls) == 2 and len(sleeps) == 1


def test_a_read_that_times_out_is_retried_then_gives_up_retriable() -> None:
    sleeps: list[float] = []
    with responses.RequestsMock() as rsps:
        rsps.add(responses.POST, READ_URL, body=requests.ReadTimeout("read timed out"))
        rsps.add(responses.POST, READ_URL, json={"records": [{"id": "D-1", "fields": {"stage": "won"}}]})
        assert adapter(sleeps).get_records("deal", ["D-1"], ["stage"]) == {"D-1": {"stage": "won"}}
        assert len(sleeps) == 1
    with responses.RequestsMock() as rsps:
        rsps.add(responses.POST, READ_URL, body=requests.ReadTimeout("read timed out"))
        with pytest.raises(RetriableError):
            adapter(sleeps).get_records("deal", ["D-1"], ["stage"])
        assert len(rsps.calls) == 3  # every attempt the policy allows
