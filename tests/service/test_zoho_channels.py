"""Zoho notification channels renewed before they lapse: the sweep job, its state in the
database, and `crm-approvals sync zoho-channels`. Zoho's notification API is mocked with
`responses` in its documented format (notifications/update-info and enable: request body
{"watch": [{channel_id, events, channel_expiry, token, notify_url}]}, answer {"watch": [{"code":
"SUCCESS", "details": {"events": [{"channel_expiry", "resource_uri", "resource_id",
"resource_name", "channel_id"}]}, "message", "status"}]})."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import responses
from click.testing import CliRunner
from requests import PreparedRequest
from sqlalchemy import select

from connector.cli import main
from connector.config import ConfigError
from connector.runtime import Runtime
from connector.service.zoho_channels import CHANNEL_LIFETIME, ZohoChannels
from connector.storage.migrate import upgrade
from connector.storage.sync_state import ZohoChannel
from connector.wiring import build_runtime
from connector.worker import Tasks, make_huey
from tests.contract.harness_zoho import ADAPTER_ENV, API, CHANNEL_ID, NOTIFY_TOKEN, json_reply, mock_token

ROOT = Path(__file__).resolve().parents[2]
WATCH_URL = f"{API}/actions/watch"
PUBLIC = "https://approvals.example.com"
ENV = {**ADAPTER_ENV, "ZOHO_NOTIFY_TOKEN": NOTIFY_TOKEN, "ZOHO_NOTIFY_CHANNEL_ID": CHANNEL_ID}
IST = timezone(timedelta(hours=5, minutes=30))  # Zoho answers in the org's time zone
START = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


def watch_success(request: PreparedRequest, message: str) -> tuple[int, dict[str, str], str]:
    """Zoho's documented answer, echoing the expiry asked for in the org's time zone."""
    [item] = json.loads(request.body or b"{}")["watch"]
    expiry = datetime.fromisoformat(item["channel_expiry"]).astimezone(IST).isoformat()
    event = {
        "channel_expiry": expiry,
        "resource_uri": f"{API}/Deals",
        "resource_id": "554023000000000131",
        "resource_name": "Deals",
        "channel_id": item["channel_id"],
    }
    body = {
        "watch": [
            {"code": "SUCCESS", "details": {"events": [event]}, "message": message, "status": "success"}
        ]
    }
    return json_reply(200, body)


def renewed(request: PreparedRequest) -> tuple[int, dict[str, str], str]:
    return watch_success(request, "Successfully updated the subscribe details")


def enabled(request: PreparedRequest) -> tuple[int, dict[str, str], str]:
    return watch_success(request, "Successfully subscribed for actions-watch of the given module")


def refused(_request: PreparedRequest) -> tuple[int, dict[str, str], str]:
    item = {
        "code": "INVALID_DATA",
        "details": {"api_name": "channel_id"},
        "message": "invalid data",
        "status": "error",
    }
    return json_reply(400, {"watch": [item]})


@pytest.fixture
def zoho() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        mock_token(rsps)
        yield rsps


def watch_calls(rsps: responses.RequestsMock) -> list[tuple[str, dict[str, Any]]]:
    return [
        (call.request.method or "", json.loads(call.request.body or b"{}"))
        for call in rsps.calls
        if call.request.url == WATCH_URL
    ]


@pytest.fixture
def make_runtime(settings_factory: Any, runtime_factory: Any) -> Callable[..., Runtime]:
    def make(**env: str) -> Runtime:
        settings = settings_factory(
            env={**ENV, "ZOHO_NOTIFY_EVENTS": "Deals.all", **env}, public_base_url=PUBLIC
        )
        return runtime_factory(settings)  # type: ignore[no-any-return]

    return make


def row(runtime: Runtime) -> ZohoChannel:
    with runtime.sessions() as session:
        found = session.scalars(select(ZohoChannel)).one()
        session.expunge(found)
        return found


def test_first_sweep_renews_the_channel_in_zohos_format_and_keeps_the_confirmed_expiry(
    make_runtime: Callable[..., Runtime], zoho: responses.RequestsMock
) -> None:
    zoho.add_callback(responses.PATCH, WATCH_URL, callback=renewed)
    clock = Clock()
    channels = ZohoChannels(make_runtime(), clock=clock)

    [line] = channels.renew_due()

    [(method, body)] = watch_calls(zoho)
    assert method == "PATCH"
    assert body == {
        "watch": [
            {
                "channel_id": CHANNEL_ID,
                "events": ["Deals.all"],
                "channel_expiry": (START + CHANNEL_LIFETIME).isoformat(),
                "token": NOTIFY_TOKEN,
                "notify_url": f"{PUBLIC}/webhooks/zoho/notify?connection=zoho",
            }
        ]
    }
    assert zoho.calls[-1].request.headers["Authorization"] == "Zoho-oauthtoken 1000.access.1"
    state = row(channels.runtime)
    assert state.channel_expiry == START + CHANNEL_LIFETIME  # what Zoho confirmed, read from +05:30
    assert state.renewed_at == START and state.last_error is None
    assert line == f"zoho channel {CHANNEL_ID} [Deals.all]: expires 2026-11-30 08:50 UTC (in 6 day(s))"

    clock.now += timedelta(days=5)
    assert channels.renew_due() == []  # two days left: nothing to do, no API call
    assert len(watch_calls(zoho)) == 1


def test_a_channel_is_renewed_again_within_a_day_of_its_expiry(
    make_runtime: Callable[..., Runtime], zoho: responses.RequestsMock
) -> None:
    zoho.add_callback(responses.PATCH, WATCH_URL, callback=renewed)
    clock = Clock()
    channels = ZohoChannels(make_runtime(), clock=clock)
    channels.renew_due()
    clock.now = START + CHANNEL_LIFETIME - timedelta(hours=23)
    assert len(channels.renew_due()) == 1
    assert [m for m, _ in watch_calls(zoho)] == ["PATCH", "PATCH"]
    assert row(channels.runtime).channel_expiry == clock.now + CHANNEL_LIFETIME


def test_a_lapsed_channel_is_enabled_again_with_post(
    make_runtime: Callable[..., Runtime], zoho: responses.RequestsMock
) -> None:
    zoho.add_callback(responses.PATCH, WATCH_URL, callback=renewed)
    zoho.add_callback(responses.POST, WATCH_URL, callback=enabled)
    clock = Clock()
    channels = ZohoChannels(make_runtime(), clock=clock)
    channels.renew_due()
    clock.now = START + timedelta(days=9)  # the worker was down past the expiry
    channels.renew_due()
    (_, _), (method, body) = watch_calls(zoho)
    assert method == "POST"
    assert body["watch"][0]["return_affected_field_values"] is True
    assert body["watch"][0]["channel_expiry"] == (clock.now + CHANNEL_LIFETIME).isoformat()
    assert row(channels.runtime).channel_expiry == clock.now + CHANNEL_LIFETIME


def test_a_refusal_is_kept_logged_with_the_fix_and_retried_after_a_pause(
    make_runtime: Callable[..., Runtime], zoho: responses.RequestsMock, caplog: pytest.LogCaptureFixture
) -> None:
    answer = refused
    zoho.add_callback(responses.PATCH, WATCH_URL, callback=lambda request: answer(request))
    clock = Clock()
    channels = ZohoChannels(make_runtime(), clock=clock)
    with caplog.at_level(logging.WARNING, logger="connector.service.zoho_channels"):
        [line] = channels.renew_due()
    assert "failed: HTTP 400: INVALID_DATA: invalid data (channel_id)" in line
    assert "crm-approvals sync zoho-channels --enable" in caplog.text
    state = row(channels.runtime)
    assert (
        state.last_error == "HTTP 400: INVALID_DATA: invalid data (channel_id)"
        and state.channel_expiry is None
    )
    clock.now += timedelta(minutes=10)
    assert channels.renew_due() == []
    clock.now += timedelta(minutes=6)
    answer = renewed  # Zoho takes the next attempt
    channels.renew_due()
    assert len(watch_calls(zoho)) == 2 and row(channels.runtime).last_error is None


def test_changed_events_are_sent_to_zoho_at_once(
    make_runtime: Callable[..., Runtime], zoho: responses.RequestsMock, settings_factory: Any
) -> None:
    zoho.add_callback(responses.PATCH, WATCH_URL, callback=renewed)
    clock = Clock()
    runtime = make_runtime()
    ZohoChannels(runtime, clock=clock).renew_due()
    changed = Runtime.from_settings(
        settings_factory(env={**ENV, "ZOHO_NOTIFY_EVENTS": "Deals.all,Accounts.edit"}, public_base_url=PUBLIC)
    )
    clock.now += timedelta(hours=1)
    ZohoChannels(changed, clock=clock).renew_due()
    changed.close()
    assert [body["watch"][0]["events"] for _, body in watch_calls(zoho)] == [
        ["Deals.all"],
        ["Deals.all", "Accounts.edit"],
    ]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ZOHO_NOTIFY_CHANNEL_ID": "channel-1"}, "ZOHO_NOTIFY_CHANNEL_ID='channel-1' must be a number"),
        (
            {"ZOHO_NOTIFY_EVENTS": ""},
            "ZOHO_NOTIFY_EVENTS is not set: list the events the channel subscribes to",
        ),
        ({"ZOHO_NOTIFY_EVENTS": "Deals.update"}, "ZOHO_NOTIFY_EVENTS has Deals.update"),
        ({"ZOHO_NOTIFY_TOKEN": ""}, "ZOHO_NOTIFY_CHANNEL_ID needs ZOHO_NOTIFY_TOKEN"),
        ({"ZOHO_NOTIFY_TOKEN": "x" * 51}, "ZOHO_NOTIFY_TOKEN: Zoho takes at most 50 characters"),
    ],
)
def test_configuration_errors_name_the_variable_and_the_sweep_logs_them_without_calling_zoho(
    make_runtime: Callable[..., Runtime],
    zoho: responses.RequestsMock,
    caplog: pytest.LogCaptureFixture,
    env: dict[str, str],
    message: str,
) -> None:
    channels = ZohoChannels(make_runtime(**env), clock=Clock())
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        channels.states()
    with caplog.at_level(logging.ERROR, logger="connector.service.zoho_channels"):
        assert channels.renew_due() == []
    assert message in caplog.text and watch_calls(zoho) == []


def test_missing_credentials_are_logged_by_the_sweep_without_a_traceback(
    make_runtime: Callable[..., Runtime], zoho: responses.RequestsMock, caplog: pytest.LogCaptureFixture
) -> None:
    channels = ZohoChannels(make_runtime(ZOHO_CLIENT_ID=""), clock=Clock())
    with caplog.at_level(logging.ERROR, logger="connector.service.zoho_channels"):
        assert channels.renew_due() == []
    assert (
        "Zoho notification channels are not renewed" in caplog.text and "needs ZOHO_CLIENT_ID" in caplog.text
    )
    assert caplog.records[-1].exc_info is None and watch_calls(zoho) == []


def test_the_worker_sweep_renews_the_channels(
    settings_factory: Any, zoho: responses.RequestsMock, tmp_path: Path
) -> None:
    zoho.add_callback(responses.PATCH, WATCH_URL, callback=renewed)
    settings = settings_factory(
        env={**ENV, "ZOHO_NOTIFY_EVENTS": "Deals.all"},
        public_base_url=PUBLIC,
        mappings_dir=str(ROOT / "mappings"),
    )
    upgrade(settings.database_url)
    runtime = build_runtime(settings)
    try:
        summary = Tasks(runtime, make_huey("memory://")).run_sweep()
    finally:
        runtime.close()
    [line] = summary["zoho_channels"]
    assert line.startswith(f"zoho channel {CHANNEL_ID} [Deals.all]: expires ")
    assert [m for m, _ in watch_calls(zoho)] == ["PATCH"]


# --- the command ------------------------------------------------------------------------


@pytest.fixture
def env_file(tmp_path: Path) -> Path:
    env = tmp_path / ".env"
    lines = {**ENV, "ZOHO_NOTIFY_EVENTS": "Deals.all", "PUBLIC_BASE_URL": PUBLIC}
    env.write_text(
        f"DATABASE_URL=sqlite:///{tmp_path}/app.db\nQUEUE_URL=memory://\n"
        + "".join(f"{k}={v}\n" for k, v in lines.items())
    )
    upgrade(f"sqlite:///{tmp_path}/app.db")
    return env


def invoke(env_file: Path, *args: str) -> Any:
    return CliRunner().invoke(main, ["--env-file", str(env_file), "sync", "zoho-channels", *args])


def test_command_shows_status_and_renews_or_enables_on_request(
    env_file: Path, zoho: responses.RequestsMock
) -> None:
    zoho.add_callback(responses.PATCH, WATCH_URL, callback=renewed)
    zoho.add_callback(responses.POST, WATCH_URL, callback=enabled)

    status = invoke(env_file)
    assert status.exit_code == 0, status.output
    assert (
        f"zoho channel {CHANNEL_ID} [Deals.all]: expiry unknown (not renewed by us yet); due for renewal"
        in (status.output)
    )
    assert watch_calls(zoho) == []

    renewed_now = invoke(env_file, "--renew")
    assert renewed_now.exit_code == 0, renewed_now.output
    assert "(in 6 day(s))" in renewed_now.output and "due for renewal" not in renewed_now.output
    enabled_now = invoke(env_file, "--enable")
    assert enabled_now.exit_code == 0, enabled_now.output
    assert [m for m, _ in watch_calls(zoho)] == ["PATCH", "POST"]
    assert "expires " in invoke(env_file).output  # the state is kept in the database


def test_command_exits_1_when_zoho_refuses(env_file: Path, zoho: responses.RequestsMock) -> None:
    zoho.add_callback(responses.PATCH, WATCH_URL, callback=refused)
    result = invoke(env_file, "--renew")
    assert result.exit_code == 1
    assert "failed: HTTP 400: INVALID_DATA: invalid data (channel_id)" in result.output


def test_command_without_a_configured_channel_says_what_to_set(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text(f"DATABASE_URL=sqlite:///{tmp_path}/app.db\nCRM_CONNECTIONS=sandbox\n")
    upgrade(f"sqlite:///{tmp_path}/app.db")
    result = CliRunner().invoke(main, ["--env-file", str(env), "sync", "zoho-channels"])
    assert result.exit_code == 1
    assert "set ZOHO_NOTIFY_CHANNEL_ID and ZOHO_NOTIFY_EVENTS" in result.output
