"""Keep Zoho notification channels alive (docs/crms/zoho.md#notification-channels).

Zoho ends a channel at its `channel_expiry`, at most one week after it was set, and never
renews it by itself. The worker's sweep calls `renew_due_channels` every minute: a channel
that expires within RENEW_MARGIN (or that we have no record of, or whose configured events or
URL changed) is renewed with `PATCH /actions/watch` for another CHANNEL_LIFETIME; one that
has already lapsed is enabled again with `POST`. The expiry Zoho confirmed and the outcome of
each attempt are kept in the `zoho_channels` table; after a failure the sweep waits
RETRY_AFTER_FAILURE before trying again (each call costs API credits).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from connector.clock import utcnow
from connector.config import ConfigError
from connector.crm.errors import CRMError
from connector.crm.zoho import NotificationChannel, ZohoAdapter, notification_channel
from connector.runtime import Runtime
from connector.storage.db import transaction
from connector.storage.sync_state import ZohoChannel

log = logging.getLogger(__name__)

# Zoho: "a maximum of one week ... If it is not specified or set for more than a week, the
# default expiry time is for one hour", so ask for a little less than a week.
CHANNEL_LIFETIME = timedelta(days=7) - timedelta(minutes=10)
RENEW_MARGIN = timedelta(days=1)
RETRY_AFTER_FAILURE = timedelta(minutes=15)


@dataclass(frozen=True)
class ChannelState:
    channel: NotificationChannel
    channel_expiry: datetime | None  # as Zoho last confirmed it; None = never renewed by us
    renewed_at: datetime | None
    last_attempt_at: datetime | None
    last_error: str | None
    due: bool  # the next sweep renews it

    def describe(self, now: datetime) -> str:
        c = self.channel
        if self.channel_expiry is None:
            expiry = "expiry unknown (not renewed by us yet)"
        elif self.channel_expiry <= now:
            expiry = f"LAPSED at {self.channel_expiry:%Y-%m-%d %H:%M} UTC"
        else:
            left = self.channel_expiry - now
            expiry = f"expires {self.channel_expiry:%Y-%m-%d %H:%M} UTC (in {_span(left)})"
        line = f"{c.connection} channel {c.channel_id} [{', '.join(c.events)}]: {expiry}"
        if self.last_error:
            line += f"; last attempt {self.last_attempt_at:%Y-%m-%d %H:%M} UTC failed: {self.last_error}"
        return line + ("; due for renewal" if self.due else "")


class ZohoChannels:
    def __init__(self, runtime: Runtime, clock: Callable[[], datetime] = utcnow) -> None:
        self.runtime = runtime
        self.clock = clock

    def configured(self, connection: str | None = None) -> list[NotificationChannel]:
        settings = self.runtime.settings
        candidates = settings.connections_of_kind("zoho")
        if connection is not None:
            candidates = [c for c in candidates if c.name == connection]
            if not candidates:
                known = ", ".join(c.name for c in settings.connections_of_kind("zoho")) or "none"
                raise ConfigError(f"no Zoho connection named {connection!r} (configured Zoho: {known})")
        found = [notification_channel(c, settings.public_base_url) for c in candidates]
        return [channel for channel in found if channel is not None]

    def states(self, connection: str | None = None) -> list[ChannelState]:
        now = self.clock()
        channels = self.configured(connection)
        with self.runtime.sessions() as session:
            rows = {c: session.get(ZohoChannel, (c.connection, c.channel_id)) for c in channels}
        return [self._state(channel, row, now) for channel, row in rows.items()]

    def renew_due(self) -> list[str]:
        """The sweep job: renew what is due; one line per channel renewed or failed."""
        try:
            due = [state.channel for state in self.states() if state.due]
            return [self.renew(channel).describe(self.clock()) for channel in due]
        except ConfigError as exc:  # logged every sweep until fixed, without a traceback
            log.error("Zoho notification channels are not renewed: %s", exc)
            return []

    def renew(self, channel: NotificationChannel, *, enable: bool = False) -> ChannelState:
        """Renew one channel now (`enable`: POST it anew, e.g. for the first time); records the outcome."""
        now = self.clock()
        with self.runtime.sessions() as session:
            row = session.get(ZohoChannel, (channel.connection, channel.channel_id))
            lapsed = row is not None and row.channel_expiry is not None and row.channel_expiry <= now
        adapter = self.runtime.adapter(channel.connection)
        if not isinstance(adapter, ZohoAdapter):
            raise ConfigError(f"connection {channel.connection!r} is not a Zoho connection")
        wanted = now + CHANNEL_LIFETIME
        error: str | None = None
        confirmed: datetime | None = None
        try:
            confirmed = adapter.watch(channel, wanted, enable=enable or lapsed) or wanted
        except CRMError as exc:
            error = str(exc)
            log.warning(
                "Zoho channel %s of %s could not be %s: %s (if Zoho no longer has it, enable it again: "
                "crm-approvals sync zoho-channels --enable)",
                channel.channel_id,
                channel.connection,
                "enabled" if enable or lapsed else "renewed",
                error,
            )
        else:
            log.info(
                "Zoho channel %s of %s renewed until %s", channel.channel_id, channel.connection, confirmed
            )
        with transaction(self.runtime.sessions) as session:
            row = session.get(ZohoChannel, (channel.connection, channel.channel_id))
            if row is None:
                row = ZohoChannel(connection=channel.connection, channel_id=channel.channel_id)
                session.add(row)
            row.events, row.notify_url, row.last_attempt_at, row.last_error = (
                list(channel.events),
                channel.notify_url,
                now,
                error,
            )
            if error is None:
                row.channel_expiry, row.renewed_at = confirmed, now
            session.flush()
            return self._state(channel, row, now)

    def _state(self, channel: NotificationChannel, row: ZohoChannel | None, now: datetime) -> ChannelState:
        if row is None:
            return ChannelState(channel, None, None, None, None, due=True)
        return ChannelState(
            channel,
            row.channel_expiry,
            row.renewed_at,
            row.last_attempt_at,
            row.last_error,
            due=_due(channel, row, now),
        )


def _due(channel: NotificationChannel, row: ZohoChannel, now: datetime) -> bool:
    if row.last_error and row.last_attempt_at and now - row.last_attempt_at < RETRY_AFTER_FAILURE:
        return False
    if list(channel.events) != list(row.events) or channel.notify_url != row.notify_url:
        return True  # the configuration changed: tell Zoho now
    return row.channel_expiry is None or row.channel_expiry - now <= RENEW_MARGIN


def renew_due_channels(runtime: Runtime) -> list[str]:
    """The worker's sweep job (registered in connector/service/pipeline.py build_runtime)."""
    return ZohoChannels(runtime).renew_due()


def _span(delta: timedelta) -> str:
    if delta >= timedelta(days=1):
        return f"{delta.days} day(s)"
    hours, rest = divmod(int(delta.total_seconds()), 3600)
    return f"{hours} h {rest // 60} min"
