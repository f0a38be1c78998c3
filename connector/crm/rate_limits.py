"""Shared CRM rate limits: one token bucket per connection and limit, shared by every worker
and web process (in Redis when QUEUE_URL is Redis, in the database otherwise).

Each CRM kind's documented limits are its defaults (LIMITS below); a connection overrides
them with `NAME_RATE_LIMITS`, e.g. `HUBSPOT_RATE_LIMITS=190/10s,650000/day`. Before each
call the adapter takes a token from every bucket of its connection; a worker that would
exceed one waits until the bucket has refilled (up to MAX_WAIT_SECONDS, beyond that the
call fails as retriable with the wait as its retry-after, and the inbox or outbox tries
again later). Salesforce reports the org's daily usage on every response
(`Sforce-Limit-Info: api-usage=used/limit`): that report resets the shared daily bucket, so
every process sees what the org has left, including calls other clients made. `/metrics`
shows each bucket's remaining tokens (crm_approvals_rate_budget_remaining).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from connector.config import ConfigError, ConnectionConfig
from connector.crm.errors import RateLimitedError
from connector.storage.db import insert_ignoring_conflicts, transaction
from connector.storage.models import RateBucket

log = logging.getLogger(__name__)

MAX_WAIT_SECONDS = 30.0  # longer waits give the worker back: the call is retried later
DAY = 86400.0


@dataclass(frozen=True)
class Limit:
    """`capacity` calls per `seconds`, as a bucket that refills continuously (a leaky bucket:
    Bitrix24's 50 at 2/s is Limit("leaky", 50, 25))."""

    name: str
    capacity: float
    seconds: float

    @property
    def rate(self) -> float:  # tokens per second
        return self.capacity / self.seconds


# The documented limits, per CRM kind; the safe end where they depend on the edition.
LIMITS: Mapping[str, tuple[Limit, ...]] = {
    # HubSpot private apps, Professional/Enterprise: 190 requests per 10 s; the daily limit of
    # Professional (650,000). Free/Starter portals: set HUBSPOT_RATE_LIMITS=100/10s,250000/day.
    "hubspot": (Limit("10s", 190, 10), Limit("day", 650_000, DAY)),
    # Salesforce: no burst limit; the org's daily allowance comes from Sforce-Limit-Info.
    "salesforce": (),
    # Zoho CRM: API credits per rolling 24 h; 5,000 is the smallest edition's allowance
    # (each read or write call we make costs one credit; more for large editions: override).
    "zoho": (Limit("day", 5_000, DAY),),
    # Bitrix24: a leaky bucket of 50 requests draining at 2 per second.
    "bitrix24": (Limit("leaky", 50, 25),),
}

_UNIT = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "hour": 3600.0, "day": DAY, "d": DAY}
_SPEC = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(\d*)\s*([a-z]+)\s*$")


def parse_limits(text: str, where: str) -> tuple[Limit, ...]:
    """`190/10s,650000/day` -> limits; raises ConfigError saying what is wrong and how to write it."""
    limits = []
    for part in (p for p in text.split(",") if p.strip()):
        match = _SPEC.match(part.lower())
        if not match or match.group(3) not in _UNIT or float(match.group(1)) <= 0:
            raise ConfigError(
                f"{where}: {part.strip()!r} is not CALLS/PERIOD; write e.g. 190/10s, 100/min or "
                "650000/day (periods: s, min, h, day), several separated by commas"
            )
        count, period = float(match.group(1)), float(match.group(2) or 1) * _UNIT[match.group(3)]
        limits.append(Limit(f"{match.group(2)}{match.group(3)}", count, period))
    return tuple(limits)


def limits_for(connection: ConnectionConfig) -> tuple[Limit, ...]:
    configured = connection.get("RATE_LIMITS")
    if configured is not None:
        return parse_limits(configured, f"{connection.env_prefix}RATE_LIMITS")
    return LIMITS.get(connection.kind, ())


# --- where buckets live -------------------------------------------------------------------


class BucketStore(Protocol):
    def take(self, key: str, limit: Limit, cost: float) -> tuple[float, float]:
        """Take `cost` tokens if there are enough: (seconds to wait, 0 if taken; tokens left)."""

    def reset(self, key: str, limit: Limit, tokens: float) -> None:
        """Set the bucket's level (a CRM's own report of what is left)."""

    def level(self, key: str, limit: Limit) -> float | None:
        """Tokens left now; None for a bucket never used."""

    def levels(self) -> dict[str, float]:
        """Every bucket ever used: key -> tokens left now (for /metrics)."""


def _refill(tokens: float, updated: float, now: float, limit: Limit) -> float:
    return min(limit.capacity, tokens + max(0.0, now - updated) * limit.rate)


# One round trip: refill by the time elapsed (Redis's own clock, the same for every host),
# then take or say how long to wait. KEYS[1] bucket; ARGV capacity, rate, cost.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local capacity, rate, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'updated')
local tokens = tonumber(state[1]) or capacity
local updated = tonumber(state[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - updated) * rate)
local wait = 0
if tokens >= cost then tokens = tokens - cost else wait = (cost - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'updated', tostring(now),
           'capacity', ARGV[1], 'rate', ARGV[2])
redis.call('EXPIRE', KEYS[1], math.ceil(capacity / rate) + 60)
return {tostring(wait), tostring(tokens)}
"""


class RedisBuckets:
    def __init__(self, url: str, prefix: str = "crm-approvals:rate:") -> None:
        import redis

        self.client = redis.Redis.from_url(url)
        self.prefix = prefix
        self._take = self.client.register_script(_TAKE)

    def take(self, key: str, limit: Limit, cost: float) -> tuple[float, float]:
        wait, tokens = self._take(keys=[self.prefix + key], args=[limit.capacity, limit.rate, cost])
        return float(wait), float(tokens)

    def reset(self, key: str, limit: Limit, tokens: float) -> None:
        seconds, micros = self.client.time()
        state = {
            "tokens": tokens,
            "updated": seconds + micros / 1e6,
            "capacity": limit.capacity,
            "rate": limit.rate,
        }
        self.client.hset(self.prefix + key, mapping=state)  # type: ignore[arg-type]
        self.client.expire(self.prefix + key, int(limit.seconds) + 60)

    def level(self, key: str, limit: Limit) -> float | None:
        tokens, updated = self.client.hmget(self.prefix + key, ["tokens", "updated"])
        if tokens is None or updated is None:
            return None
        seconds, micros = self.client.time()
        return _refill(float(tokens), float(updated), seconds + micros / 1e6, limit)

    def levels(self) -> dict[str, float]:
        seconds, micros = self.client.time()
        now = seconds + micros / 1e6
        out = {}
        for raw in self.client.scan_iter(match=self.prefix + "*"):
            state = self.client.hmget(raw, ["tokens", "updated", "capacity", "rate"])
            values = [float(v) for v in state if v is not None]
            if len(values) != 4:
                continue
            tokens, updated, capacity, rate = values
            key = raw.decode()[len(self.prefix) :]
            out[key] = _refill(tokens, updated, now, Limit(key, capacity, capacity / rate))
        return out


class DatabaseBuckets:
    """Buckets as rows, changed under a row lock (FOR UPDATE on PostgreSQL; SQLite's writer
    lock). Hosts' clocks are assumed in step (NTP), as the leases of the outbox assume."""

    def __init__(self, sessions: sessionmaker[Session], clock: Callable[[], float] = time.time) -> None:
        self.sessions = sessions
        self.clock = clock

    def take(self, key: str, limit: Limit, cost: float) -> tuple[float, float]:
        with transaction(self.sessions) as session:
            row = self._row(session, key, limit)
            now = self.clock()
            tokens = _refill(row.tokens, row.updated_at, now, limit)
            wait = 0.0
            if tokens >= cost:
                tokens -= cost
            else:
                wait = (cost - tokens) / limit.rate
            row.tokens, row.updated_at, row.capacity, row.rate = tokens, now, limit.capacity, limit.rate
            return wait, tokens

    def reset(self, key: str, limit: Limit, tokens: float) -> None:
        with transaction(self.sessions) as session:
            row = self._row(session, key, limit)
            row.tokens, row.updated_at, row.capacity, row.rate = (
                tokens,
                self.clock(),
                limit.capacity,
                limit.rate,
            )

    def level(self, key: str, limit: Limit) -> float | None:
        with self.sessions() as session:
            row = session.get(RateBucket, key)
            return None if row is None else _refill(row.tokens, row.updated_at, self.clock(), limit)

    def levels(self) -> dict[str, float]:
        with self.sessions() as session:
            rows = session.scalars(select(RateBucket)).all()
        now = self.clock()
        return {
            r.name: _refill(r.tokens, r.updated_at, now, Limit(r.name, r.capacity, r.capacity / r.rate))
            for r in rows
        }

    def _row(self, session: Session, key: str, limit: Limit) -> RateBucket:
        row = session.scalars(select(RateBucket).where(RateBucket.name == key).with_for_update()).first()
        if row is None:
            insert_ignoring_conflicts(
                session, RateBucket.__table__,
                [{"name": key, "tokens": limit.capacity, "updated_at": self.clock(),
                  "capacity": limit.capacity, "rate": limit.rate}], key="name",
            )  # fmt: skip
            row = session.scalars(select(RateBucket).where(RateBucket.name == key).with_for_update()).one()
        return row


def bucket_store(queue_url: str, sessions: sessionmaker[Session]) -> BucketStore:
    """Redis when the queue is Redis (every worker reaches it), else the database."""
    if queue_url.startswith(("redis://", "rediss://", "unix://")):
        return RedisBuckets(queue_url)
    return DatabaseBuckets(sessions)


# --- what an adapter uses ---------------------------------------------------------------------


class RateLimiter:
    """The buckets of one connection. `acquire` before every CRM call."""

    def __init__(
        self,
        store: BucketStore,
        connection: str,
        limits: Sequence[Limit],
        sleep: Callable[[float], None] = time.sleep,
        max_wait: float = MAX_WAIT_SECONDS,
    ) -> None:
        self.store = store
        self.connection = connection
        self.limits = {limit.name: limit for limit in limits}
        self.sleep = sleep
        self.max_wait = max_wait
        self._lock = threading.Lock()

    def key(self, limit: Limit) -> str:
        return f"{self.connection}:{limit.name}"

    def acquire(self, cost: float = 1.0) -> None:
        """Take a token from every bucket, waiting while one is empty."""
        for limit in list(self.limits.values()):
            waited = 0.0
            while True:
                wait, _left = self.store.take(self.key(limit), limit, cost)
                if wait <= 0:
                    break
                if waited + wait > self.max_wait:
                    raise RateLimitedError(
                        f"connection {self.connection!r}: its shared {limit.name} budget of "
                        f"{limit.capacity:g} calls is spent; next token in {wait:.0f} s",
                        retry_after=wait,
                        code="RATE_BUDGET_SPENT",
                    )
                self.sleep(wait)
                waited += wait

    def observe_daily_usage(self, used: int, limit: int) -> None:
        """A CRM's own report (Salesforce's Sforce-Limit-Info): the daily bucket holds what
        it says is left."""
        daily = Limit("day", limit, DAY)
        with self._lock:
            self.limits["day"] = daily
        self.store.reset(self.key(daily), daily, max(0, limit - used))

    def remaining(self) -> dict[str, float]:
        """Tokens left per limit name (full for a bucket never used)."""
        out = {}
        for limit in list(self.limits.values()):
            level = self.store.level(self.key(limit), limit)
            out[limit.name] = limit.capacity if level is None else level
        return out


def attach(adapter: Any, queue_url: str, sessions: sessionmaker[Session]) -> None:
    """Give a freshly built adapter its connection's shared limiter (none without limits)."""
    limits = limits_for(adapter.connection)
    if not limits and adapter.connection.kind != "salesforce":
        return
    adapter.rate_limiter = RateLimiter(bucket_store(queue_url, sessions), adapter.connection.name, limits)


class BudgetCollector:
    """/metrics: crm_approvals_rate_budget_remaining{connection, limit}, read from the shared
    store at scrape time, so every process reports the same figures."""

    def __init__(self, store: Callable[[], BucketStore | None]) -> None:
        self.store = store

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        gauge = GaugeMetricFamily(
            "crm_approvals_rate_budget_remaining",
            "CRM calls left in a connection's shared rate-limit bucket (refilled to now).",
            labels=["connection", "limit"],
        )
        store = self.store()
        if store is not None:
            try:
                levels = store.levels()
            except Exception as exc:  # a scrape must not fail because the store is away
                log.warning("could not read the rate-limit buckets: %s", exc)
                levels = {}
            for key, tokens in sorted(levels.items()):
                connection, _, limit = key.rpartition(":")
                gauge.add_metric([connection, limit], tokens)
        yield gauge
