"""Business-time arithmetic (connector.approvals.business_time), with real holiday calendars."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import holidays
import pytest

from connector.approvals.business_time import BusinessTime, CalendarTime, NoWorkingDaysError
from connector.approvals.timing import TimerDuration

WARSAW = ZoneInfo("Europe/Warsaw")


def warsaw(year: int, month: int, day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=WARSAW).astimezone(UTC)


def polish_office(**overrides: object) -> BusinessTime:
    values: dict[str, object] = dict(
        zone=WARSAW,
        opens=time(9),
        closes=time(17),
        holidays=holidays.country_holidays("PL"),
        holiday_name="PL",
    )
    values.update(overrides)
    return BusinessTime(**values)  # type: ignore[arg-type]


def test_calendar_time_counts_every_hour() -> None:
    start = datetime(2026, 11, 6, 15, tzinfo=UTC)  # a Friday
    assert CalendarTime().add(start, timedelta(hours=8)) == datetime(2026, 11, 6, 23, tzinfo=UTC)
    assert TimerDuration(2, "d").length(CalendarTime()) == timedelta(days=2)
    assert TimerDuration(1, "w").length(CalendarTime()) == timedelta(days=7)


def test_within_one_working_day() -> None:
    office = polish_office()
    assert office.add(warsaw(2026, 11, 4, 10), timedelta(hours=3)) == warsaw(2026, 11, 4, 13)
    assert office.add(warsaw(2026, 11, 4, 9), timedelta(hours=8)) == warsaw(2026, 11, 4, 17)


def test_a_friday_afternoon_runs_over_the_weekend() -> None:
    office = polish_office()
    # Friday 6 Nov 2026 15:00 + 8 working hours: 2 h on Friday, 6 h on Monday 9 Nov
    assert office.add(warsaw(2026, 11, 6, 15), timedelta(hours=8)) == warsaw(2026, 11, 9, 15)


def test_a_holiday_is_not_a_working_day() -> None:
    office = polish_office()
    # Tuesday 10 Nov 16:00 + 4 h: 1 h on Tuesday, Wednesday 11 Nov is Independence Day in Poland,
    # so the remaining 3 h run on Thursday 12 Nov
    assert date(2026, 11, 11) in holidays.country_holidays("PL")
    assert office.add(warsaw(2026, 11, 10, 16), timedelta(hours=4)) == warsaw(2026, 11, 12, 12)
    # the same in a calendar without Polish holidays ends on Wednesday
    assert polish_office(holidays=frozenset()).add(warsaw(2026, 11, 10, 16), timedelta(hours=4)) == warsaw(
        2026, 11, 11, 12
    )


def test_weekend_and_holiday_together() -> None:
    office = polish_office()
    # Friday 24 Dec 2027 is Christmas Eve (a holiday in Poland from 2025), Christmas on the weekend:
    # Thursday 23 Dec 2027 16:00 + 2 h -> 1 h on Thursday, then Monday 27 Dec 10:00
    pl = holidays.country_holidays("PL")
    assert date(2027, 12, 24) in pl
    assert office.add(warsaw(2027, 12, 23, 16), timedelta(hours=2)) == warsaw(2027, 12, 27, 10)


def test_start_outside_working_hours_counts_from_the_next_opening() -> None:
    office = polish_office()
    assert office.add(warsaw(2026, 11, 4, 6), timedelta(hours=1)) == warsaw(2026, 11, 4, 10)
    assert office.add(warsaw(2026, 11, 4, 20), timedelta(hours=1)) == warsaw(2026, 11, 5, 10)
    assert office.add(warsaw(2026, 11, 7, 12), timedelta(minutes=30)) == warsaw(
        2026, 11, 9, 9, 30
    )  # Saturday
    assert office.add(warsaw(2026, 11, 7, 12), timedelta(0)) == warsaw(2026, 11, 9, 9)


def test_days_and_weeks_are_working_days_in_business_time() -> None:
    office = polish_office()
    assert TimerDuration(1, "d").length(office) == timedelta(hours=8)
    assert TimerDuration(1, "w").length(office) == timedelta(hours=40)
    # 2 working days from Thursday 5 Nov 12:00 -> Monday 9 Nov 12:00
    two_days = TimerDuration(2, "d").length(office)
    assert office.add(warsaw(2026, 11, 5, 12), two_days) == warsaw(2026, 11, 9, 12)


def test_daylight_saving_change_does_not_shift_working_hours() -> None:
    office = polish_office()
    # clocks go back on Sunday 25 Oct 2026; Friday 16:00 + 2 h ends Monday 10:00 local time
    assert office.add(warsaw(2026, 10, 23, 16), timedelta(hours=2)) == warsaw(2026, 10, 26, 10)


def test_a_calendar_without_working_time_is_refused() -> None:
    with pytest.raises(ValueError, match="end after"):
        polish_office(opens=time(17), closes=time(9))
    with pytest.raises(ValueError, match="working day"):
        polish_office(workdays=frozenset())
    every_day = type("Every", (), {"__contains__": lambda self, day: True})()
    with pytest.raises(NoWorkingDaysError, match="no working day"):
        polish_office(holidays=every_day).add(warsaw(2026, 11, 4, 10), timedelta(hours=1))
