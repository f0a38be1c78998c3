"""Adding a duration to a moment, in calendar time or in a connection's business time.

Pure: no clock, no I/O. Two variants with the same ``add`` method, picked once per connection
(``connector.service.timer_calendars``):

* ``CalendarTime``: ``start + duration``, every hour counts.
* ``BusinessTime``: only working hours count, on working days that are not holidays, in the
  connection's time zone. A moment outside working hours starts counting at the next opening;
  ``9:00-17:00`` Monday-Friday means ``8h`` from Friday 15:00 ends Monday 15:00. Hours are
  wall-clock hours of the time zone, so a daylight-saving change (at night) never shifts a
  deadline by an hour.

Holidays come from the ``holidays`` library (``holidays.country_holidays("PL")``) or any
container of dates, so tests can pass their own.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from connector.errors import FatalError

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
MAX_DAYS_WITHOUT_WORK = 370  # a calendar with no working day for a year is a configuration mistake


class NoWorkingDaysError(FatalError, ValueError):
    """The calendar has no working time to count in (e.g. every day a holiday)."""


@dataclass(frozen=True)
class CalendarTime:
    """Every hour counts."""

    def add(self, start: datetime, duration: timedelta) -> datetime:
        return start + duration

    @property
    def day_length(self) -> timedelta:
        return timedelta(days=1)

    def describe(self) -> str:
        return "calendar time"


@dataclass(frozen=True)
class BusinessTime:
    """Working hours ``opens``-``closes`` on ``workdays`` (0 = Monday) in ``zone``, minus ``holidays``."""

    zone: ZoneInfo
    opens: time
    closes: time
    workdays: frozenset[int] = frozenset(range(5))
    holidays: Container[date] = field(default_factory=frozenset)
    holiday_name: str = ""  # e.g. "PL", for messages

    def __post_init__(self) -> None:
        if self.closes <= self.opens:
            raise ValueError(f"working hours must end after they start, got {self.opens}-{self.closes}")
        if not self.workdays:
            raise ValueError("at least one working day is needed")

    @property
    def day_length(self) -> timedelta:
        """One working day: what `1d` means in business time."""
        day = date(2000, 1, 3)
        return datetime.combine(day, self.closes) - datetime.combine(day, self.opens)

    def is_working_day(self, day: date) -> bool:
        return day.weekday() in self.workdays and day not in self.holidays

    def add(self, start: datetime, duration: timedelta) -> datetime:
        """The moment ``duration`` of working time after ``start`` (aware, returned in UTC)."""
        if duration < timedelta(0):
            raise ValueError("a duration to add must not be negative")
        local = start.astimezone(self.zone).replace(tzinfo=None)  # wall clock of the zone
        remaining = duration
        day = local.date()
        moment = local.time()
        for _ in range(MAX_DAYS_WITHOUT_WORK * 20):
            if self.is_working_day(day) and moment < self.closes:
                begin = max(moment, self.opens)
                available = datetime.combine(day, self.closes) - datetime.combine(day, begin)
                if remaining <= available:
                    end = datetime.combine(day, begin) + remaining
                    return end.replace(tzinfo=self.zone).astimezone(UTC)
                remaining -= available
            day, moment = self._next_working_day(day), self.opens
        raise NoWorkingDaysError("the working calendar has no working time left to count in")

    def _next_working_day(self, day: date) -> date:
        for _ in range(MAX_DAYS_WITHOUT_WORK):
            day += timedelta(days=1)
            if self.is_working_day(day):
                return day
        raise NoWorkingDaysError(
            f"no working day within {MAX_DAYS_WITHOUT_WORK} days after {day}: check the working days "
            "and the holiday calendar"
        )

    def describe(self) -> str:
        days = ",".join(WEEKDAYS[d] for d in sorted(self.workdays))
        hours = f"{self.opens:%H:%M}-{self.closes:%H:%M}"
        holidays = f", holidays of {self.holiday_name}" if self.holiday_name else ""
        return f"business time ({days} {hours} {self.zone.key}{holidays})"


WorkingCalendar = CalendarTime | BusinessTime
