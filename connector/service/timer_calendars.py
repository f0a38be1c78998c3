"""Each connection's working calendar for step timing: business time when the connection sets
working hours, a time zone and a holiday calendar, else calendar time.

    <NAME>_WORKING_HOURS=09:00-17:00
    <NAME>_TIME_ZONE=Europe/Warsaw            (IANA name)
    <NAME>_HOLIDAYS=PL                        (country, or country-subdivision: US-CA, DE-BY)
    <NAME>_WORKING_DAYS=mon-fri               (optional; default mon-fri; or mon,tue,wed,thu)

Holidays come from the `holidays` library (docs/decisions.md). Setting some of the first three
but not all is a ConfigError naming the missing variables: half a business calendar is a mistake.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import time
from functools import cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import holidays

from connector.approvals.business_time import WEEKDAYS, BusinessTime, CalendarTime, WorkingCalendar
from connector.config import ConfigError, ConnectionConfig, Settings

KEYS = ("WORKING_HOURS", "TIME_ZONE", "HOLIDAYS")
_HOURS = re.compile(r"^\s*([0-2]?[0-9]):([0-5][0-9])\s*-\s*([0-2]?[0-9]):([0-5][0-9])\s*$")

CalendarLookup = Callable[[str], WorkingCalendar]


def calendar_lookup(settings: Settings) -> CalendarLookup:
    """connection name -> its calendar, each built once (holiday tables fill lazily by year)."""

    @cache
    def lookup(connection: str) -> WorkingCalendar:
        config = settings.connections.get(connection)
        return working_calendar(config) if config is not None else CalendarTime()

    return lookup


def working_calendar(config: ConnectionConfig) -> WorkingCalendar:
    values = {key: config.get(key) for key in KEYS}
    if not any(values.values()):
        return CalendarTime()
    missing = [f"{config.env_prefix}{key}" for key, value in values.items() if not value]
    if missing:
        raise ConfigError(
            f"connection {config.name!r} sets only part of a business calendar: also set "
            f"{', '.join(missing)} (e.g. {config.env_prefix}WORKING_HOURS=09:00-17:00, "
            f"{config.env_prefix}TIME_ZONE=Europe/Warsaw, {config.env_prefix}HOLIDAYS=PL), "
            "or unset them all for calendar time"
        )
    opens, closes = _hours(config, values["WORKING_HOURS"] or "")
    return BusinessTime(
        zone=_zone(config, values["TIME_ZONE"] or ""),
        opens=opens,
        closes=closes,
        workdays=_workdays(config, config.get("WORKING_DAYS") or "mon-fri"),
        holidays=_holidays(config, values["HOLIDAYS"] or ""),
        holiday_name=(values["HOLIDAYS"] or "").strip().upper(),
    )


def _hours(config: ConnectionConfig, text: str) -> tuple[time, time]:
    match = _HOURS.match(text)
    name = f"{config.env_prefix}WORKING_HOURS"
    if not match:
        raise ConfigError(f"{name} must look like 09:00-17:00, got {text!r}")
    h1, m1, h2, m2 = (int(part) for part in match.groups())
    if h1 > 23 or h2 > 24 or (h2 == 24 and m2):
        raise ConfigError(f"{name}: {text!r} is not a time of day range")
    opens, closes = time(h1, m1), time(23, 59, 59, 999999) if h2 == 24 else time(h2, m2)
    if closes <= opens:
        raise ConfigError(f"{name}: the working day must end after it starts, got {text!r}")
    return opens, closes


def _zone(config: ConnectionConfig, text: str) -> ZoneInfo:
    try:
        return ZoneInfo(text.strip())
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f"{config.env_prefix}TIME_ZONE: unknown time zone {text!r}; "
            "use an IANA name such as Europe/Warsaw"
        ) from None


def _workdays(config: ConnectionConfig, text: str) -> frozenset[int]:
    name = f"{config.env_prefix}WORKING_DAYS"
    days: set[int] = set()
    for part in (p.strip().lower() for p in text.split(",") if p.strip()):
        first, _, last = part.partition("-")
        if first not in WEEKDAYS or (last and last not in WEEKDAYS):
            raise ConfigError(f"{name}: {part!r} is not a day or range of days (mon, tue, ... sun; mon-fri)")
        start, end = WEEKDAYS.index(first), WEEKDAYS.index(last or first)
        if end < start:
            raise ConfigError(f"{name}: {part!r} runs backwards; write it as e.g. mon-fri")
        days.update(range(start, end + 1))
    if not days:
        raise ConfigError(f"{name} names no day; e.g. mon-fri")
    return frozenset(days)


def _holidays(config: ConnectionConfig, text: str) -> holidays.HolidayBase:
    country, _, subdivision = text.strip().upper().partition("-")
    name = f"{config.env_prefix}HOLIDAYS"
    supported = holidays.list_supported_countries()
    if country not in supported:
        raise ConfigError(
            f"{name}: {country!r} is not a country the holidays library knows (ISO code, e.g. PL)"
        )
    if subdivision and subdivision not in supported[country]:
        known = ", ".join(supported[country][:12]) or "none"
        raise ConfigError(f"{name}: {country} has no subdivision {subdivision!r} (known: {known}...)")
    return holidays.country_holidays(country, subdiv=subdivision or None)
