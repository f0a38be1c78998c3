"""Shared CRM rate limits: one bucket per connection and limit, shared by every process
(Redis or the database), waited on before a call, reset by Salesforce's own usage report,
and shown on /metrics."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import responses
from flask.testing import FlaskClient

from connector.config import ConfigError, ConnectionConfig, Settings
from connector.crm.errors import RateLimitedError
from connector.crm.rate_limits import (
    LIMITS,
    BucketStore,
    DatabaseBuckets,
    Limit,
    RateLimiter,
    RedisBuckets,
    limits_for,
    parse_limits,
)
from connector.crm.retry import RetryPolicy
from connector.crm.sandbox import SandboxAdapter
from connector.runtime import Runtime
from connector.storage.migrate import upgrade


class FakeTime:
    """A clock and a sleep that advances it, so waits are exact and instant."""

    def __init__(self) -> None:
        self.now = 1_000_000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture(params=["redis", "sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, runtime: Runtime) -> Iterator[BucketStore]:
    if request.param == "redis":
        yield RedisBuckets(request.getfixturevalue("redis_url"))
    elif request.param == "sqlite":
        yield DatabaseBuckets(runtime.sessions)
    else:
        pg_url = request.getfixturevalue("pg_url")
        upgrade(pg_url)
        pg = Runtime.from_settings(Settings(database_url=pg_url))
        yield DatabaseBuckets(pg.sessions)
        pg.close()


class WouldWait(Exception):
    pass


def test_two_processes_share_one_bucket_and_the_one_that_would_exceed_waits(store: BucketStore) -> None:
    burst = Limit("50s", 5, 50)  # 5 calls, refilling one every 10 s
    waits: list[float] = []

    def wait(seconds: float) -> None:  # record the wait the limiter asks for, instead of sleeping
        waits.append(seconds)
        raise WouldWait

    first = RateLimiter(store, "hubspot", [burst], sleep=wait)
    second = RateLimiter(store, "hubspot", [burst], sleep=wait)  # another worker's
    for limiter in (first, second, first, second, first):
        limiter.acquire()
    assert waits == []  # five calls fit the bucket
    with pytest.raises(WouldWait):
        second.acquire()  # the sixth, from the other worker: the bucket is shared, so it waits
    assert 0 < waits[0] <= 10
    assert first.remaining()["50s"] < 1


def test_a_call_waits_for_the_shared_budget_before_it_goes_out(runtime: Runtime) -> None:
    fake = FakeTime()
    adapter = SandboxAdapter(
        ConnectionConfig(name="sandbox", kind="sandbox"), base_url="http://sandbox.test", api_token="t",
        retry=RetryPolicy(attempts=1, sleep=fake.sleep),
    )  # fmt: skip
    store = DatabaseBuckets(runtime.sessions, clock=fake.clock)
    adapter.rate_limiter = RateLimiter(store, "sandbox", [Limit("leaky", 2, 1)], sleep=fake.sleep)  # 2/s
    seen_at: list[float] = []

    def answer(request: Any) -> tuple[int, dict[str, str], str]:
        seen_at.append(fake.now)
        return (
            200,
            {},
            json.dumps({"records": [{"id": i, "fields": {}} for i in json.loads(request.body)["ids"]]}),
        )

    with responses.RequestsMock() as rsps:
        rsps.add_callback(
            responses.POST, "http://sandbox.test/api/v1/objects/deal/batch-read", callback=answer
        )
        for i in range(3):
            adapter.get_records("deal", [f"D-{i}"], ["amount"])
    assert fake.sleeps == [pytest.approx(0.5)]  # the third call waited for one token at 2/s
    assert seen_at[2] - seen_at[0] == pytest.approx(0.5)


def test_salesforce_usage_report_sets_the_daily_budget_for_every_process(runtime: Runtime) -> None:
    fake = FakeTime()
    store = DatabaseBuckets(runtime.sessions, clock=fake.clock)
    reporting = RateLimiter(store, "sf", [], sleep=fake.sleep)
    reporting.observe_daily_usage(used=4998, limit=5000)  # Sforce-Limit-Info: api-usage=4998/5000
    other = RateLimiter(store, "sf", [], sleep=fake.sleep)
    other.observe_daily_usage(used=4998, limit=5000)
    reporting.acquire()
    other.acquire()  # the two calls the org had left, taken by two processes
    reporting.acquire()  # the third waits for the rolling day to give one back: 86400/5000 s
    assert fake.sleeps == [pytest.approx(86400 / 5000)]
    # A small org (1,000 a day): the wait is longer than a worker should block, so the call
    # is handed back as retriable with the wait as its retry-after.
    reporting.observe_daily_usage(used=1000, limit=1000)
    with pytest.raises(RateLimitedError) as spent:
        reporting.acquire()
    assert spent.value.retry_after == pytest.approx(86.4)
    assert "budget" in str(spent.value)


def test_documented_defaults_and_overrides() -> None:
    assert limits_for(ConnectionConfig(name="hs", kind="hubspot")) == LIMITS["hubspot"]
    assert Limit("leaky", 50, 25) in LIMITS["bitrix24"] and Limit("leaky", 50, 25).rate == 2
    custom = ConnectionConfig(name="hs", kind="hubspot", settings={"RATE_LIMITS": "100/10s, 250000/day"})
    assert [(limit.capacity, limit.seconds) for limit in limits_for(custom)] == [(100, 10), (250000, 86400)]
    with pytest.raises(ConfigError, match="HS_RATE_LIMITS: '100 per 10s' is not CALLS/PERIOD"):
        parse_limits("100 per 10s", "HS_RATE_LIMITS")


def test_metrics_show_the_remaining_budget(client: FlaskClient, runtime: Runtime) -> None:
    limiter = RateLimiter(DatabaseBuckets(runtime.sessions), "zoho", [Limit("day", 50, 86400)])
    for _ in range(3):
        limiter.acquire()
    text = client.get("/metrics").get_data(as_text=True)
    [line] = [x for x in text.splitlines() if x.startswith("crm_approvals_rate_budget_remaining{")]
    assert 'connection="zoho"' in line and 'limit="day"' in line
    assert 47 <= float(line.rsplit(" ", 1)[1]) < 47.1  # 50 - 3, refilled by the moments since


def test_a_malformed_limit_stops_start_up_naming_the_variable(settings_factory: Any) -> None:
    from connector.config import parse_connections

    env = {"CRM_CONNECTIONS": "hs=hubspot", "HS_ACCESS_TOKEN": "t", "HS_RATE_LIMITS": "lots"}
    with pytest.raises(ConfigError, match="HS_RATE_LIMITS: 'lots' is not CALLS/PERIOD"):
        Runtime.from_settings(settings_factory(connections=parse_connections(env)))
