"""Type coercion for CRM values and mapping-file literals.

CRMs send the same kind of value in many shapes (HubSpot sends numbers as strings,
Salesforce multi-selects are ';'-joined text, Bitrix24 dates are midnight datetimes).
Each coercer turns one raw value into the canonical Python value of a field type:

* returns ``None`` when the value is blank (None, '', whitespace, empty list);
* raises :class:`CoercionError` when the value cannot be read as that type — callers
  in the criteria hot path turn that into a false condition, never an exception;
* never produces a float for number/money: floats are converted through ``str`` so
  ``0.1`` becomes ``Decimal("0.1")`` and not ``Decimal(0.1000000000000000055...)``.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from connector.approvals.spec import FieldType
from connector.errors import FatalError

FIELD_TYPES: tuple[FieldType, ...] = (
    "string",
    "number",
    "money",
    "date",
    "datetime",
    "boolean",
    "user",
    "list",
)
LIST_SEPARATOR = ";"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_PLAIN_NUMBER = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$")
_GROUPED_NUMBER = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_CURRENCY_SYMBOLS = "$€£¥₹"
_CURRENCY_CODE = re.compile(r"^(?:[A-Z]{3}\s+(?P<a>.+)|(?P<b>.+?)\s+[A-Z]{3})$")
_TRUE = frozenset({"true", "yes", "1"})
_FALSE = frozenset({"false", "no", "0"})


class CoercionError(FatalError, ValueError):
    """A value that cannot be read as the field's type. The message says why."""

    code = "coercion_error"


@dataclass(frozen=True)
class CoercionFailure:
    """Shown as the actual value in `explain` when coercion failed."""

    raw: Any
    type: str
    reason: str

    def __str__(self) -> str:
        return f"cannot read {self.raw!r} as {self.type}: {self.reason}"


def _kind(raw: Any) -> str:
    return type(raw).__name__


# --- blank ---------------------------------------------------------------------


def is_blank(raw: Any) -> bool:
    """None, '', whitespace-only text and empty collections are blank."""
    if raw is None:
        return True
    if isinstance(raw, str):
        return not raw.strip()
    if isinstance(raw, list | tuple | set | frozenset | dict):
        return len(raw) == 0
    return False


# --- text -------------------------------------------------------------------


def to_string(raw: Any) -> str | None:
    """Text, compared exactly as the CRM sent it (no trimming, case-sensitive)."""
    if type(raw) is str:
        return raw if raw.strip() else None
    if raw is None:
        return None
    if isinstance(raw, bool):
        return "true" if raw else "false"
    if isinstance(raw, int | Decimal):
        return str(raw)
    if isinstance(raw, float):
        return repr(raw)
    if isinstance(raw, date):
        return raw.isoformat()
    raise CoercionError(f"expected text, got {_kind(raw)}")


def to_user(raw: Any) -> str | None:
    """A user id. Surrounding whitespace is never part of an id, so it is trimmed."""
    text = to_string(raw)
    return text.strip() if text is not None else None


def to_list(raw: Any) -> tuple[str, ...] | None:
    """A list of text values: a JSON list, or ';'-separated text (Salesforce multi-select)."""
    if raw is None:
        return None
    if isinstance(raw, str):
        items = [part.strip() for part in raw.split(LIST_SEPARATOR)]
    elif isinstance(raw, list | tuple | set | frozenset):
        items = [_list_item(item) for item in raw]
    elif isinstance(raw, int | Decimal | float) and not isinstance(raw, bool):
        items = [_list_item(raw)]
    else:
        raise CoercionError(f"expected a list or ';'-separated text, got {_kind(raw)}")
    values = tuple(item for item in items if item)
    return values or None


def _list_item(item: Any) -> str:
    text = to_string(item)
    return text.strip() if text is not None else ""


# --- numbers --------------------------------------------------------------------


def to_number(raw: Any) -> Decimal | None:
    """An exact Decimal. Accepts int, Decimal, float (via str) and text like '100,000.50'."""
    # One dict lookup instead of an isinstance ladder: this runs on every evaluation.
    convert = _NUMBER_BY_TYPE.get(raw.__class__)
    if convert is not None:
        return convert(raw)
    if raw is None:
        return None
    # Subclasses (IntEnum, str subclasses...) take the slow road through their base type.
    if isinstance(raw, bool):
        raise CoercionError("true/false is not a number")
    if isinstance(raw, int):
        return Decimal(int(raw))
    if isinstance(raw, float):
        return _decimal_from_float(float(raw))
    if isinstance(raw, Decimal):
        return _finite(Decimal(raw), raw)
    if isinstance(raw, str):
        return _decimal_from_text(str(raw))
    raise CoercionError(f"expected a number, got {_kind(raw)}")


def to_money(raw: Any) -> Decimal | None:
    """Like number, and text may also carry one currency symbol or a 3-letter code."""
    if raw.__class__ is str:
        text = raw.strip()
        if not text:
            return None
        number = _strip_currency(text)
        if not number.lstrip("+-"):
            raise CoercionError("no digits (a currency symbol or sign alone is not an amount)")
        return _parse_number(number, raw)
    return to_number(raw)


def _decimal_from_float(raw: float) -> Decimal:
    # repr() is the shortest text that round-trips, so 0.1 stays 0.1 (Decimal(0.1) would not).
    return _finite(Decimal(repr(raw)), raw)


def _decimal_from_text(raw: str) -> Decimal | None:
    return _parse_number(raw.strip(), raw)


def _bool_is_not_a_number(raw: bool) -> Decimal:
    raise CoercionError("true/false is not a number")


_NUMBER_BY_TYPE: dict[type, Callable[[Any], Decimal | None]] = {
    int: Decimal,
    float: _decimal_from_float,
    Decimal: lambda raw: _finite(raw, raw),
    str: _decimal_from_text,
    bool: _bool_is_not_a_number,
}


def _parse_number(text: str, raw: Any) -> Decimal | None:
    if not text:
        return None
    if "," in text:
        if not _GROUPED_NUMBER.match(text):
            raise CoercionError("commas must separate groups of three digits, e.g. 100,000.50")
        text = text.replace(",", "")
    if not _PLAIN_NUMBER.match(text):
        raise CoercionError("not a number (use digits, an optional '.' and ',' thousands separators)")
    try:
        return _finite(Decimal(text), raw)
    except InvalidOperation as exc:  # pragma: no cover - the regex already vetted the text
        raise CoercionError("not a number") from exc


def _strip_currency(text: str) -> str:
    match = _CURRENCY_CODE.match(text)
    if match:
        text = (match.group("a") or match.group("b")).strip()
    sign = ""
    if text.startswith(("+", "-")):
        sign, text = text[0], text[1:].lstrip()
    if text.startswith(tuple(_CURRENCY_SYMBOLS)):
        text = text[1:].lstrip()
    elif text.endswith(tuple(_CURRENCY_SYMBOLS)):
        text = text[:-1].rstrip()
    if not sign and text.startswith(("+", "-")):  # "$-5"
        sign, text = text[0], text[1:]
    return sign + text if text else ""


def _finite(value: Decimal, raw: Any) -> Decimal:
    if not value.is_finite():
        raise CoercionError(f"{raw!r} is not a finite number")
    return value


# --- dates ----------------------------------------------------------------------


def to_date(raw: Any) -> date | None:
    """A calendar date. A datetime keeps its own calendar date (the offset is not applied)."""
    if isinstance(raw, datetime):
        return raw.date()
    if type(raw) is date:
        return raw
    if raw is None:
        return None
    if isinstance(raw, str):
        return _parse_date(raw.strip())
    if isinstance(raw, int) and not isinstance(raw, bool):
        return _from_epoch_ms(raw).date()
    raise CoercionError(f"expected an ISO date (YYYY-MM-DD), got {_kind(raw)}")


def _parse_date(text: str) -> date | None:
    if not text:
        return None
    if text.isdigit():
        return _from_epoch_ms(int(text)).date()
    try:
        return date.fromisoformat(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).date()
    except ValueError:
        raise CoercionError("not an ISO 8601 date (expected YYYY-MM-DD)") from None


def to_datetime(raw: Any) -> datetime | None:
    """An aware datetime in UTC. Naive values are taken as UTC; a bare date is midnight UTC."""
    if isinstance(raw, datetime):
        return _utc(raw)
    if type(raw) is date:
        return datetime(raw.year, raw.month, raw.day, tzinfo=UTC)
    if raw is None:
        return None
    if isinstance(raw, str):
        return _parse_datetime(raw.strip())
    if isinstance(raw, int) and not isinstance(raw, bool):
        return _from_epoch_ms(raw)
    raise CoercionError(f"expected an ISO 8601 datetime, got {_kind(raw)}")


def _parse_datetime(text: str) -> datetime | None:
    if not text:
        return None
    if text.isdigit():
        return _from_epoch_ms(int(text))
    try:
        return _utc(datetime.fromisoformat(text))
    except ValueError:
        raise CoercionError("not an ISO 8601 datetime (expected e.g. 2024-05-01T12:00:00Z)") from None


def _utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def _from_epoch_ms(ms: int) -> datetime:
    # HubSpot sends dates and datetimes as milliseconds since the Unix epoch.
    try:
        return _EPOCH + timedelta(milliseconds=ms)
    except OverflowError:
        raise CoercionError(f"{ms} is out of range for milliseconds since 1970") from None


# --- booleans ----------------------------------------------------------------------


def to_boolean(raw: Any) -> bool | None:
    """True/False, 1/0, and the texts true/false, yes/no, 1/0 (any case)."""
    if raw is True or raw is False:
        return raw
    if raw is None:
        return None
    if isinstance(raw, int | Decimal) and raw in (0, 1):
        return bool(raw)
    if isinstance(raw, str):
        text = raw.strip().lower()
        if not text:
            return None
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise CoercionError("expected true/false, yes/no or 1/0")


Coercer = Callable[[Any], Any]

COERCERS: dict[str, Coercer] = {
    "string": to_string,
    "user": to_user,
    "list": to_list,
    "number": to_number,
    "money": to_money,
    "date": to_date,
    "datetime": to_datetime,
    "boolean": to_boolean,
}


def coerce(raw: Any, field_type: str) -> Any:
    """Coerce one value; None when blank; raises CoercionError when it cannot be read."""
    return COERCERS[field_type](raw)


def try_coerce(raw: Any, field_type: str) -> Any:
    """Like :func:`coerce` but returns a :class:`CoercionFailure` instead of raising."""
    try:
        return COERCERS[field_type](raw)
    except CoercionError as exc:
        return CoercionFailure(raw, field_type, str(exc))


# --- durations ---------------------------------------------------------------------

DurationUnit = Literal["d", "w", "m", "y"]
_DURATION = re.compile(r"^\s*(\d+)\s*([dwmy])\s*$")


@dataclass(frozen=True)
class Duration:
    """A length of time written like 180d, 2w, 6m or 1y."""

    amount: int
    unit: DurationUnit

    def __str__(self) -> str:
        return f"{self.amount}{self.unit}"

    @property
    def is_exact(self) -> bool:
        """Days and weeks have a fixed length; months and years do not."""
        return self.unit in ("d", "w")

    def as_timedelta(self) -> timedelta:
        if self.unit == "d":
            return timedelta(days=self.amount)
        if self.unit == "w":
            return timedelta(weeks=self.amount)
        raise ValueError(f"{self} has no fixed length")

    def before(self, moment: date) -> Any:
        """``moment`` minus this duration; works for date and datetime alike."""
        if self.is_exact:
            return moment - self.as_timedelta()
        return add_months(moment, -self._months())

    def after(self, moment: date) -> Any:
        if self.is_exact:
            return moment + self.as_timedelta()
        return add_months(moment, self._months())

    def _months(self) -> int:
        return self.amount * (12 if self.unit == "y" else 1)


def parse_duration(text: Any) -> Duration:
    """'180d' -> Duration(180, 'd'). Raises CoercionError with the expected form."""
    if not isinstance(text, str):
        raise CoercionError("expected a duration such as 180d, 2w, 6m or 1y")
    match = _DURATION.match(text)
    if not match:
        raise CoercionError("expected a duration such as 180d, 2w, 6m or 1y")
    return Duration(int(match.group(1)), match.group(2))  # type: ignore[arg-type]


def add_months(moment: Any, months: int) -> Any:
    """Calendar arithmetic: 31 Jan + 1 month = 28/29 Feb (clamped to the month's end)."""
    index = moment.year * 12 + (moment.month - 1) + months
    year, month = divmod(index, 12)
    day = min(moment.day, calendar.monthrange(year, month + 1)[1])
    return moment.replace(year=year, month=month + 1, day=day)
