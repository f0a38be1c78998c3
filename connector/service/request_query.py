"""Finding approval requests: filters, who may see what, and keyset pages.

One query for `GET /api/v1/requests` and `crm-approvals requests list`. Both validate their
input with `RequestFilters` (so a bad value gets the same message from either), then call
`find_requests`. Pages are keyset pages over (submitted_at, id), newest first: a cursor is the
position after the last row shown, so rows inserted while someone pages are never shown
twice and never push an unseen row onto a page already read. docs/api.md#pagination.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema
from sqlalchemy import (
    ColumnElement,
    FromClause,
    and_,
    bindparam,
    func,
    or_,
    select,
    union,
)
from sqlalchemy.orm import Session

from connector.approvals.lifecycle import RequestStatus
from connector.clock import utcnow
from connector.crm.salesforce_ids import id_spellings
from connector.rules.coerce import parse_duration
from connector.storage import approval_store as store
from connector.storage.approval_store import RecordKey, StoredRequest
from connector.storage.db import UTCDateTime
from connector.storage.models import (
    ApprovalAssigneeRow,
    ApprovalRequestRow,
    ApprovalWaitingRow,
)
from connector.storage.request_counts import count_query

DEFAULT_LIMIT, MAX_LIMIT = 100, 500
REQUESTS, WAITING = ApprovalRequestRow.__table__, ApprovalWaitingRow.__table__
ASSIGNEES = ApprovalAssigneeRow.__table__
COLUMNS = tuple(REQUESTS.c)  # a page is read as plain rows
MAX_AGE = timedelta(days=366 * 100)  # further back than any request; keeps date arithmetic in range
# The durations of mapping files (connector/rules/coerce.py: d, w, m, y) and hours.
_DURATION = re.compile(r"^(\d{1,9})([hdwmy])$")
_UNIT_DAYS = {"h": 1 / 24, "d": 1, "w": 7, "m": 31, "y": 366}
MOMENT_FORMS = (
    "a duration such as 12h, 7d, 2w, 6m or 1y, or a time such as 2026-11-01 or 2026-11-01T09:30:00Z"
)


@dataclass(frozen=True)
class Viewer:
    """Who asks: admins see every request; others what they submitted or are assigned to."""

    user_id: str
    is_admin: bool


@dataclass(frozen=True)
class PagePosition:
    """Where the next page starts: after the row with this (submitted_at, id)."""

    submitted_at: datetime
    request_id: str

    def encode(self) -> str:
        raw = json.dumps([self.submitted_at.isoformat(), self.request_id], separators=(",", ":"))
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(value: Any) -> PagePosition:
    if isinstance(value, PagePosition):
        return value
    try:
        text = str(value)
        raw = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        at, request_id = raw
        submitted_at = datetime.fromisoformat(at)
        if submitted_at.tzinfo is None or not isinstance(request_id, str) or "\x00" in request_id:
            raise ValueError
        submitted_at = submitted_at.astimezone(UTC)
    except (ValueError, TypeError, OverflowError, binascii.Error, UnicodeDecodeError):
        raise ValueError(
            "not a cursor this list gave out; pass next_cursor from the previous page unchanged, "
            "or leave cursor out to start at the first page"
        ) from None
    return PagePosition(submitted_at, request_id)


def parse_moment(value: Any, now: datetime | None = None) -> datetime:
    """'12h', '7d', '2w', '6m', '1y' before now, or an ISO 8601 date or time (UTC unless it says)."""
    if isinstance(value, datetime):
        return _as_utc(value)
    text = str(value).strip()
    now = now or utcnow()
    duration = _DURATION.match(text)
    if duration:
        amount, unit = int(duration.group(1)), duration.group(2)
        if amount * _UNIT_DAYS[unit] > MAX_AGE.days:
            raise ValueError("that is more than 100 years ago")
        if unit == "h":
            return now - timedelta(hours=amount)
        return parse_duration(f"{amount}{unit}").before(now)
    try:
        return _as_utc(datetime.fromisoformat(text))
    except (ValueError, OverflowError):
        raise ValueError(f"expected {MOMENT_FORMS}") from None


def _as_utc(moment: datetime) -> datetime:
    """Stored times are UTC, and SQLite compares them as text: so must every bound be."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def parse_record(value: Any) -> RecordKey:
    if isinstance(value, RecordKey):
        return value
    parts = str(value).split(":", 2)  # the record id itself may contain ':'
    if len(parts) != 3 or not all(p.strip() for p in parts):
        raise ValueError("expected CONNECTION:OBJECT:ID such as sandbox:deal:D-1001")
    return RecordKey(*(p.strip() for p in parts))


# Query-string types: what the caller sends is a string; the spec says which strings.
Moment = Annotated[
    datetime,
    BeforeValidator(parse_moment),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": r"^(\d{1,6}[hdwmy]|\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?"
            r"(Z|[+-]\d{2}:\d{2})?)?)$",
            "examples": ["7d", "2026-11-01T09:30:00Z"],
        }
    ),
]
Record = Annotated[
    RecordKey,
    BeforeValidator(parse_record),
    WithJsonSchema({"type": "string", "pattern": "^[^:]+:[^:]+:.+$", "examples": ["sandbox:deal:D-1001"]}),
]
Cursor = Annotated[PagePosition, BeforeValidator(decode_cursor), WithJsonSchema({"type": "string"})]


class RequestFilters(BaseModel):
    """Which requests, and which page of them. Every filter narrows the list (AND)."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    status: list[RequestStatus] = Field(
        default_factory=list, description="Only these statuses; repeat the parameter for several."
    )
    rule: str | None = Field(None, min_length=1, description="Only requests of this rule (its name).")
    connection: str | None = Field(None, min_length=1, description="Only records of this connection.")
    object: str | None = Field(
        None, min_length=1, description="Only records of this CRM object (case-insensitive), e.g. deal."
    )
    record: Record | None = Field(
        None, description="Only this record: CONNECTION:OBJECT:ID (object case-insensitive)."
    )
    older_than: Moment | None = Field(
        None, description=f"Only requests submitted before this: {MOMENT_FORMS}."
    )
    newer_than: Moment | None = Field(
        None, description=f"Only requests submitted at or after this: {MOMENT_FORMS}."
    )
    pending_for: str | None = Field(
        None,
        min_length=1,
        description="Only requests whose open step waits for this user's vote.",
    )
    limit: int = Field(
        DEFAULT_LIMIT,
        ge=1,
        le=MAX_LIMIT,
        description=f"Requests per page: 1..{MAX_LIMIT}, default {DEFAULT_LIMIT}.",
    )
    cursor: Cursor | None = Field(
        None, description="next_cursor of the previous page; leave it out for the first page."
    )


@dataclass(frozen=True)
class RequestPage:
    requests: list[StoredRequest]
    total: int  # matching requests on all pages
    next_cursor: str | None  # None on the last page


def find_requests(session: Session, filters: RequestFilters, viewer: Viewer | None) -> RequestPage:
    """One page of the requests matching `filters` that `viewer` may see (None: everything)."""
    rows, total, next_cursor = page_rows(session, filters, viewer, COLUMNS)
    # summaries show no history: the page's requests come without their transitions
    return RequestPage(store.load_rows(session, rows, history=False), total, next_cursor)


def page_rows(
    session: Session, filters: RequestFilters, viewer: Viewer | None, columns: Sequence[Any]
) -> tuple[list[Any], int, str | None]:
    """The page's rows of approval_requests (these columns; `id` and `submitted_at` among
    them), the total on all pages and the next cursor.

    Every list is read from an index in page order: newest first by (submitted_at, id), so
    a page costs its rows, not the table. With `pending_for` the rows come from the
    approver's index of waiting requests (approval_waiting), which holds the same order."""
    conn = session.connection()  # plain rows, read without the ORM's result machinery
    # Read in page order from an index, the page's columns come with it. Visibility's OR
    # is the one filter no index order serves: there the page's ids are the union of two
    # pages (_visible_page), and the rows of those ids are read in the same statement.
    params = _cursor_params(filters)
    after = filters.cursor is not None
    if _visible_only(filters, viewer) and filters.pending_for is None:
        assert viewer is not None
        counted = _total(filters, viewer, lambda: _count_of(REQUESTS, _conditions(session, filters, viewer)))
        page = _with_total(_visible_page(filters, viewer.user_id, tuple(columns)), counted)
        params["me"] = viewer.user_id
    else:
        pending = filters.pending_for is not None
        if pending:
            params["approver"] = filters.pending_for
        if not _visible_only(filters, viewer) and not _narrowing(filters):
            # the usual pages (an approver's pending list, an admin's list of everything):
            # their statements are built once per page size
            page, counted = _plain_page(pending, filters.limit, after, tuple(columns))
        else:
            conditions = _conditions(session, filters, viewer)
            page, source, conditions = _page_of(pending, filters.limit, after, columns, conditions)
            counted = _total(filters, viewer, lambda: _count_of(source, conditions))
            page = _with_total(page, counted)
    rows = list(conn.execute(page, params).all())
    total = int(rows[0].total if rows else conn.scalar(counted, params) or 0)
    shown = rows[: filters.limit]
    next_cursor = None
    if len(rows) > filters.limit:
        last = shown[-1]
        next_cursor = PagePosition(last.submitted_at, last.id).encode()
    return shown, total, next_cursor


def _with_total(page: Any, counted: Any) -> Any:
    """The total rides along as a column of every row (an uncorrelated subquery: computed
    once); only a page without rows asks for it on its own (page_rows)."""
    return page.add_columns(counted.scalar_subquery().label("total"))


@functools.cache
def _plain_page(pending: bool, limit: int, after: bool, columns: tuple[Any, ...]) -> tuple[Any, Any]:
    """The page with its total, and the total's statement, of an approver's pending list
    (`pending`; parameter `approver`) or of every request, narrowed by nothing else."""
    page, _, _ = _page_of(pending, limit, after, columns, ())
    if pending:  # approval_waiting's rows of the approver, from its index alone
        counted: Any = select(func.count()).where(WAITING.c.approver == bindparam("approver"))
    else:
        counted = count_query()
    return _with_total(page, counted), counted


def _page_of(
    pending: bool, limit: int, after: bool, columns: Sequence[Any], narrowing: Sequence[ColumnElement[bool]]
) -> tuple[Any, FromClause, list[ColumnElement[bool]]]:
    """The page statement (newest first, `limit` + 1 rows; parameters `approver` if
    `pending`, `after_at` and `after_id` if `after`), what it reads from, and its conditions
    but the cursor's (those of the total)."""
    R, W = REQUESTS.c, WAITING.c  # table columns: cheaper to build statements of than ORM ones
    conditions = list(narrowing)
    if pending:
        order_at, order_id = W.submitted_at, W.request_id
        source: FromClause = WAITING.join(REQUESTS, R.id == W.request_id)
        # approval_waiting holds pending requests only (migration 0023's triggers drop
        # the rows of a request leaving pending): no status filter to keep the planner
        # from reading the approver's index in order and stopping at the page's end
        conditions.insert(0, W.approver == bindparam("approver"))
    else:
        order_at, order_id = R.submitted_at, R.id
        source = REQUESTS
    page = select(*columns).select_from(source).where(*conditions)
    if after:
        page = page.where(_after(order_at, order_id))
    return page.order_by(order_at.desc(), order_id.desc()).limit(limit + 1), source, conditions


def _count_of(source: FromClause, conditions: Sequence[ColumnElement[bool]]) -> Any:
    return select(func.count()).select_from(source).where(*conditions)


def _visible_page(filters: RequestFilters, user_id: str, columns: tuple[Any, ...]) -> Any:
    """The page's rows of what `user_id` (parameter `me`) may see: the page of their own
    requests (read in order from the submitter index) merged with the page of those
    assigned to them (sorted: no index holds them in submission order), the union's first
    page; those ids' rows in the same statement. Exactly the page of `submitter = me OR
    assigned to me`, without sorting every request of a busy submitter."""
    narrowing = tuple(_narrowing(filters))
    if narrowing:
        ids = _visible_page_statement(filters.limit, filters.cursor is not None, narrowing)
        return _rows_of(columns, ids)
    # the usual page: built once per page size
    return _plain_visible_page(filters.limit, filters.cursor is not None, columns)


@functools.cache
def _plain_visible_page(limit: int, after: bool, columns: tuple[Any, ...]) -> Any:
    return _rows_of(columns, _visible_page_statement(limit, after, ()))


def _visible_page_statement(limit: int, after: bool, narrowing: Sequence[ColumnElement[bool]]) -> Any:
    R, A = REQUESTS.c, ASSIGNEES.c
    me: Any = bindparam("me")
    conditions = list(narrowing)
    if after:
        conditions.append(_after(R.submitted_at, R.id))
    order = (R.submitted_at.desc(), R.id.desc())
    own = select(R.id, R.submitted_at).where(R.submitter == me, *conditions)
    assigned = (
        select(R.id, R.submitted_at)
        .select_from(ASSIGNEES.join(REQUESTS, R.id == A.request_id))
        .where(A.approver == me, *conditions)
    )
    merged = union(*(select(part.order_by(*order).limit(limit + 1).subquery()) for part in (own, assigned)))
    pages = merged.subquery()
    return select(pages.c.id).order_by(pages.c.submitted_at.desc(), pages.c.id.desc()).limit(limit + 1)


def _rows_of(columns: tuple[Any, ...], ids: Any) -> Any:
    """These columns of the requests whose ids `ids` selects, newest first."""
    R = REQUESTS.c
    return select(*columns).where(R.id.in_(ids)).order_by(R.submitted_at.desc(), R.id.desc())


def _total(filters: RequestFilters, viewer: Viewer | None, counted: Callable[[], Any]) -> Any:
    """The statement of the exact number of matching requests on all pages, the cheap one
    when the filters allow one (each the same number as `counted`, the count of the page
    query's rows):

    * the kept counts (approval_request_counts, per status, rule and connection) for lists
      without visibility narrowed by nothing else;
    * an approver's own pending list: their rows of approval_waiting, from its index alone
      (it holds pending requests only: migration 0023's triggers);
    * a non-admin's visible requests: their own by the submitter index, plus their rows of
      approval_assignees (which holds existing requests only: the same triggers), less
      those both (parameter `me`);
    * anything else: `counted()`."""
    visibility = _visible_only(filters, viewer)
    other = {
        name
        for name in ("object", "record", "older_than", "newer_than")
        if getattr(filters, name) is not None
    }
    if filters.pending_for is not None:
        if visibility or other or filters.status or filters.rule or filters.connection:
            return counted()
        return select(func.count()).where(WAITING.c.approver == filters.pending_for)
    if other:
        return counted()
    if not visibility:
        return count_query(filters.status, filters.rule, filters.connection)
    if filters.status or filters.rule or filters.connection:
        return counted()
    return VISIBLE_COUNT


def _visible_count() -> Any:
    """own + assigned - both, each read from an index by the user alone (a join of "assigned
    to me" to the table, to leave out one's own, lets PostgreSQL scan the table instead)."""
    R, A = REQUESTS.c, ASSIGNEES.c
    me: Any = bindparam("me")
    own = select(func.count()).where(R.submitter == me)
    assigned = select(func.count()).where(A.approver == me)
    both = (
        select(func.count())
        .select_from(ASSIGNEES.join(REQUESTS, R.id == A.request_id))
        .where(A.approver == me, R.submitter == me)
    )
    return select(own.scalar_subquery() + assigned.scalar_subquery() - both.scalar_subquery())


VISIBLE_COUNT = _visible_count()


def ids_pending_for(session: Session, user_id: str, limit: int | None = None) -> list[str]:
    """Requests whose open step waits for this user's vote, oldest first (an inbox): read
    in order from the index of approval_waiting."""
    W = ApprovalWaitingRow
    query = select(W.request_id).where(W.approver == user_id).order_by(W.submitted_at, W.request_id)
    return list(session.scalars(query if limit is None else query.limit(limit)))


def find_request(session: Session, request_id: str, viewer: Viewer | None) -> StoredRequest | None:
    """The request if it exists and `viewer` may see it; None in both other cases alike."""
    condition = [ApprovalRequestRow.id == request_id]
    if viewer is not None and not viewer.is_admin:
        condition.append(_visible_to(session, viewer.user_id))
    row = session.scalar(select(ApprovalRequestRow).where(*condition))
    return store.load_rows(session, [row])[0] if row is not None else None


def _conditions(
    session: Session, filters: RequestFilters, viewer: Viewer | None
) -> Sequence[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []
    if _visible_only(filters, viewer):
        assert viewer is not None
        conditions.append(_visible_to(session, viewer.user_id))
    return [*conditions, *_narrowing(filters)]


def _narrowing(filters: RequestFilters) -> list[ColumnElement[bool]]:
    """The filters' conditions on approval_requests (pending_for aside)."""
    R = REQUESTS.c
    conditions: list[ColumnElement[bool]] = []
    if filters.status:
        conditions.append(R.status.in_(filters.status))
    if filters.rule is not None:
        conditions.append(R.rule_name == filters.rule)
    if filters.connection is not None:
        conditions.append(R.connection == filters.connection)
    if filters.object is not None:
        conditions.append(func.lower(R.object_type) == filters.object.lower())
    if filters.record is not None:
        conditions += [
            R.connection == filters.record.connection,
            func.lower(R.object_type) == filters.record.object_type.lower(),
            R.record_id.in_(id_spellings(filters.record.record_id)),  # a Salesforce id as 15 or 18
        ]
    if filters.older_than is not None:
        conditions.append(R.submitted_at < filters.older_than)
    if filters.newer_than is not None:
        conditions.append(R.submitted_at >= filters.newer_than)
    return conditions  # pending_for: find_requests reads approval_waiting


def _visible_only(filters: RequestFilters, viewer: Viewer | None) -> bool:
    """Whether the list is narrowed to what the viewer may see: not for admins (or no viewer),
    nor for one's own pending list (waiting for you means assigned to you)."""
    return viewer is not None and not viewer.is_admin and filters.pending_for != viewer.user_id


def _cursor_params(filters: RequestFilters) -> dict[str, Any]:
    """The parameters of `_after` for the filters' cursor, if any."""
    if filters.cursor is None:
        return {}
    return {"after_at": filters.cursor.submitted_at, "after_id": filters.cursor.request_id}


def _after(order_at: Any, order_id: Any) -> ColumnElement[bool]:
    """After the cursor's row in page order (parameters `after_at`, `after_id`)."""
    at = bindparam("after_at", type_=UTCDateTime())
    return or_(order_at < at, and_(order_at == at, order_id < bindparam("after_id")))


def _visible_to(session: Session, user_id: str) -> ColumnElement[bool]:
    """Today's rule: the submitter, and anyone assigned to any step of it (any round) so far
    (approval_assignees, by index)."""
    assigned = select(ASSIGNEES.c.request_id).where(ASSIGNEES.c.approver == user_id)
    return or_(REQUESTS.c.submitter == user_id, REQUESTS.c.id.in_(assigned))
