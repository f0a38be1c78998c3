"""The append-only, hash-chained audit log: one row per thing that happened.

`record` adds an entry to the caller's transaction. Entries are appended to the chain when
that transaction commits (a `before_commit` hook), so the chain-head lock is always the
last lock a transaction takes: no lock-order deadlock with the request and outbox rows it
locked before, and the lock is held only for the moment of the commit.

Each row carries `prev_hash` (the previous row's hash) and `row_hash`, the SHA-256 of its
canonical content including its id and `prev_hash`. `audit_chain_head` holds the id and
hash of the last row. The database refuses UPDATE, DELETE, TRUNCATE, replace-by-id and any
insert that does not extend the head (triggers of migration 0002); `verify` detects what
someone who dropped the triggers changed, deleted, inserted or cut off. Cutting off the
tail together with the head row is only detectable against a head recorded outside the
database: docs/operations.md, "Audit log".
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import event, func, insert, select
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker

from connector.clock import utcnow
from connector.storage.models import AuditChainHead, AuditEntry

# Every kind of entry; `record` refuses others, so a typo cannot start a kind nobody queries.
KINDS = (
    "webhook_received",
    "webhook_id_reused",
    "echo_ignored",
    "rule_matched",
    "transition",
    "step_opened",
    "vote",
    "action_queued",
    "writeback_result",
    "writeback_in_doubt",
    "drift_repaired",
    "expired",
    "delegation_set",
    "delegation_cancelled",
    "timer_fired",  # a step's reminder, escalation or time-out acted (connector/service/timers.py)
)

GENESIS_HASH = "0" * 64  # the prev_hash of the first row
HEAD_ID = 1  # audit_chain_head has this one row
CONTENT_COLUMNS = (
    "id",
    "at",
    "kind",
    "connection",
    "object_type",
    "record_id",
    "request_id",
    "actor",
    "mapping_hash",
    "detail",
    "prev_hash",
)
_PENDING = "audit_pending"  # Session.info key: entries waiting for the commit


def record(
    session: Session,
    kind: str,
    *,
    connection: str | None = None,
    object_type: str | None = None,
    record_id: str | None = None,
    request_id: str | None = None,
    actor: str | None = None,
    mapping_hash: str | None = None,
    **detail: Any,
) -> None:
    """Add an entry to the caller's transaction; it is written when that transaction commits
    and dropped if it (or the savepoint it was recorded in) rolls back."""
    if kind not in KINDS:
        raise ValueError(f"unknown audit entry kind {kind!r}: add it to KINDS in connector/storage/audit.py")
    entry = {
        "at": utcnow(),
        "kind": kind,
        "connection": connection,
        "object_type": object_type,
        "record_id": record_id,
        "request_id": request_id,
        "actor": actor,
        "mapping_hash": mapping_hash,
        "detail": _jsonable(detail),
    }
    owner = session.get_nested_transaction() or session.get_transaction()
    session.info.setdefault(_PENDING, []).append((owner, entry))


def row_hash(row: Mapping[str, Any]) -> str:
    """SHA-256 of a row's canonical content (CONTENT_COLUMNS, prev_hash included).

    Canonical JSON: sorted keys, no spaces, ASCII; `at` as UTC ISO 8601 with microseconds;
    whole floats as integers, because PostgreSQL's JSONB hands 1.0 and 1e20 back as integers.
    Changing this format invalidates every stored hash: it needs a migration that re-anchors.
    """
    content = {name: row[name] for name in CONTENT_COLUMNS}
    at: datetime = content["at"]
    content["at"] = at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    content["detail"] = _canonical_numbers(content["detail"])
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


# --- appending on commit ----------------------------------------------------------------


@event.listens_for(Session, "before_commit")
def _append_pending(session: Session) -> None:
    if session.in_nested_transaction():
        return  # a savepoint's entries wait for the outer commit
    pending = session.info.pop(_PENDING, None)
    if pending:
        # A worker's batch of 50 events records a few hundred entries: `append_many` writes
        # them as multi-row INSERTs of tuples, the hashes from cached canonical pieces, where
        # `append`'s executemany processed every parameter of every row (a third of the
        # worker's CPU per event). The same rows and hashes (tests/service/test_batch_writes.py).
        session.flush()  # the session's pending rows first, as an ORM flush would order them
        append_many(session, [entry for _owner, entry in pending])


@event.listens_for(Session, "after_soft_rollback")
def _drop_rolled_back(session: Session, previous_transaction: SessionTransaction) -> None:
    pending = session.info.get(_PENDING)
    if pending:
        session.info[_PENDING] = [
            (owner, entry) for owner, entry in pending if not _within(owner, previous_transaction)
        ]


@event.listens_for(Session, "after_transaction_end")
def _forget_at_end(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:  # the outermost transaction ended (commit, rollback or close)
        session.info.pop(_PENDING, None)


def _within(owner: SessionTransaction | None, ended: SessionTransaction) -> bool:
    if owner is None:  # recorded before the session began: belongs to the outermost transaction
        return ended.parent is None
    node: SessionTransaction | None = owner
    while node is not None:
        if node is ended:
            return True
        node = node.parent
    return False


def _lock_head(session: Session) -> tuple[int, str]:
    """The chain head (last id, last hash), locked until the caller's transaction ends."""
    head = session.execute(
        select(AuditChainHead.last_id, AuditChainHead.last_hash)
        .where(AuditChainHead.id == HEAD_ID)
        .with_for_update()
    ).one_or_none()
    if head is None:
        raise RuntimeError(
            "the audit chain head row is missing: run `crm-approvals db upgrade`; if the database is "
            "migrated, someone deleted it, and `crm-approvals audit verify` tells what else changed"
        )
    return head[0], head[1]


def append(session: Session, entries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Append entries to the chain now. Locks the chain head (FOR UPDATE on PostgreSQL;
    SQLite's writer lock already serialises writers) so concurrent writers cannot fork it.
    One INSERT statement for all of them (no ORM objects: a sweep may append thousands)."""
    last_id, last_hash = _lock_head(session)
    rows = []
    for entry in entries:
        values = {**entry, "at": entry["at"].astimezone(UTC), "id": last_id + 1, "prev_hash": last_hash}
        values["row_hash"] = row_hash(values)
        rows.append(values)
        last_id, last_hash = values["id"], values["row_hash"]
    if rows:
        session.flush()  # the session's pending rows first, as an ORM flush would order them
        # Core, not ORM bulk insert: the ORM splits rows by which values are None, one
        # statement per shape; Core sends them all as one executemany.
        session.execute(insert(AuditEntry.__table__), rows)  # type: ignore[arg-type]  # the insert triggers advance the head
    return rows


def append_many(session: Session, entries: Iterable[Mapping[str, Any]], batch: int = 500) -> int:
    """`append` for thousands of entries (set-based expiry): chained and hashed as `append`
    does, written as multi-row INSERTs of plain tuples in id order, so the insert triggers
    accept each row. A `detail` dict object shared by many entries is canonicalised once.
    The caller's transaction holds the head lock from here to its commit: call this last,
    as the commit hook does. Returns how many rows were appended."""
    from connector.storage.bulk import insert_rows

    last_id, last_hash = _lock_head(session)
    chain: list[Any] = [last_id, last_hash, _encode(last_hash)]  # id, hash, hash as JSON text
    # The canonical text before the id and from the id to prev_hash repeat from entry to entry
    # (a sweep's entries share their detail object, moment, connection, kind): built once each.
    # (id(detail), at, actor, connection) -> (text, at in UTC, detail's text, the detail kept
    # alive so that its id stays its own while cached)
    openings: dict[tuple[Any, ...], tuple[str, datetime, str, Any]] = {}
    middles: dict[tuple[Any, ...], str] = {}  # (kind, mapping_hash, object_type) -> text
    moments: dict[datetime, tuple[datetime, str]] = {}  # at -> (in UTC, as text): details may all differ

    def rows() -> Iterator[tuple[Any, ...]]:
        for entry in entries:
            detail = entry.get("detail") or _NO_DETAIL
            actor = entry.get("actor")
            connection = entry.get("connection")
            key = (id(detail), entry["at"], actor, connection)
            opening = openings.get(key)
            if opening is None:
                if len(openings) >= _CACHED:  # entries that all differ: stay flat
                    openings.clear()
                moment = moments.get(entry["at"])
                if moment is None:
                    if len(moments) >= _CACHED:
                        moments.clear()
                    utc = entry["at"].astimezone(UTC)
                    moment = moments[entry["at"]] = (utc, utc.strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
                at = moment[0]
                detail_text = _canonical_detail(detail)
                text = _opening(actor, moment[1], connection, detail_text)
                opening = openings[key] = (text, at, detail_text, detail)
            kind = entry["kind"]
            mapping_hash = entry.get("mapping_hash")
            object_type = entry.get("object_type")
            middle_key = (kind, mapping_hash, object_type)
            middle = middles.get(middle_key)
            if middle is None:
                if kind not in KINDS:
                    raise ValueError(
                        f"unknown audit entry kind {kind!r}: add it to KINDS in connector/storage/audit.py"
                    )
                if len(middles) >= _CACHED:
                    middles.clear()
                middle = middles[middle_key] = _middle(kind, mapping_hash, object_type)
            record_id = entry.get("record_id")
            request_id = entry.get("request_id")
            ident = chain[0] + 1
            prev_hash = chain[1]
            text = (
                f"{opening[0]}{ident}{middle}{chain[2]}"
                f',"record_id":{"null" if record_id is None else _encode(record_id)}'
                f',"request_id":{"null" if request_id is None else _encode(request_id)}}}'
            )  # _closing, inline
            digest = hashlib.sha256(text.encode("ascii")).hexdigest()
            yield (
                ident, opening[1], kind, connection, object_type, record_id, request_id, actor,
                mapping_hash, opening[2], prev_hash, digest,
            )  # fmt: skip
            chain[0], chain[1], chain[2] = ident, digest, f'"{digest}"'

    return insert_rows(
        session,
        AuditEntry.__table__,  # type: ignore[arg-type]  # a Table, typed as FromClause
        (*CONTENT_COLUMNS[:-1], "prev_hash", "row_hash"),
        rows(),
        json_text=("detail",),
        batch=batch,
    )


_encode = json.encoder.encode_basestring_ascii  # C, as json.dumps uses
_CACHED = 4096  # append_many's caches of canonical pieces start over beyond this
_NO_DETAIL: dict[str, Any] = {}  # one object for every entry without a detail


def _canonical_text(detail: Any) -> str:
    return json.dumps(
        _canonical_numbers(detail), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


def _canonical_detail(detail: Mapping[str, Any]) -> str:
    """`_canonical_text(_jsonable(detail))`, without its two copies of the detail when every
    value is canonical JSON already (`_is_plain`: str, int, bool and None, in lists, tuples
    and str-keyed dicts at any depth), as a sweep's details and most of a batch's are
    (a write-back's fields, an event's changed fields): json.dumps writes those exactly so."""
    for key, value in detail.items():
        if type(key) is str and (type(value) in _PLAIN or _is_plain(value)):
            continue
        return _canonical_text(_jsonable(detail))
    return _PLAIN_ENCODE(detail)


def _is_plain(value: Any) -> bool:
    """Whether `value` is canonical JSON as it is: `_jsonable` and `_canonical_numbers` would
    leave it equal (no floats, dates, sets or non-str keys; no subclasses, whose text may differ)."""
    kind = type(value)
    if kind in _PLAIN:
        return True
    if kind is dict:
        return all(type(k) is str and _is_plain(v) for k, v in value.items())
    if kind is list or kind is tuple:
        return all(_is_plain(v) for v in value)
    return False


_PLAIN = frozenset({str, int, bool, type(None)})
# json.dumps builds an encoder per call when given options: one, built once
_PLAIN_ENCODE = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode


def _fast_hash(ident: int, at: str, kind: str, detail: str, prev_hash: str, values: tuple[Any, ...]) -> str:
    """`row_hash` without building the dict, from the pieces `append_many` assembles: the same
    canonical text, keys in sorted order (tests/service/test_bulk_expiry.py compares the two)."""
    actor, connection, mapping_hash, object_type, record_id, request_id = values
    text = (
        _opening(actor, at, connection, detail)
        + str(ident)
        + _middle(kind, mapping_hash, object_type)
        + _encode(prev_hash)
        + _closing(record_id, request_id)
    )
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _json_text(value: str | None) -> str:
    return "null" if value is None else _encode(value)


def _opening(actor: str | None, at: str, connection: str | None, detail: str) -> str:
    """The canonical text up to the id's value (keys: actor, at, connection, detail, id)."""
    return (
        f'{{"actor":{_json_text(actor)},"at":"{at}","connection":{_json_text(connection)},'
        f'"detail":{detail},"id":'
    )


def _middle(kind: str, mapping_hash: str | None, object_type: str | None) -> str:
    """From after the id's value to the prev_hash's value (kind, mapping_hash, object_type)."""
    return (
        f',"kind":{_encode(kind)},"mapping_hash":{_json_text(mapping_hash)},'
        f'"object_type":{_json_text(object_type)},"prev_hash":'
    )


def _closing(record_id: str | None, request_id: str | None) -> str:
    """After the prev_hash's value: record_id, request_id and the closing brace."""
    return f',"record_id":{_json_text(record_id)},"request_id":{_json_text(request_id)}}}'


# --- verification -----------------------------------------------------------------------


@dataclass(frozen=True)
class ChainHead:
    id: int
    hash: str

    def __str__(self) -> str:
        return f"{self.id}:{self.hash}"

    @classmethod
    def parse(cls, text: str) -> ChainHead:
        """`ID:HASH` as `crm-approvals audit head` prints it."""
        ident, sep, digest = text.strip().partition(":")
        digest = digest.lower()
        if not sep or not ident.isascii() or not ident.isdigit() or len(digest) != 64:
            raise ValueError(f"{text!r} is not ID:HASH (a row id, a colon, 64 hex digits)")
        try:
            int(digest, 16)
        except ValueError:
            raise ValueError(f"{text!r} is not ID:HASH (a row id, a colon, 64 hex digits)") from None
        return cls(int(ident), digest)


@dataclass(frozen=True)
class Verification:
    rows: int  # rows checked
    head: ChainHead | None  # as recorded in audit_chain_head
    bad_id: int | None = None  # the first row id found wrong (or missing)
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None


def chain_head(session: Session) -> ChainHead | None:
    row = session.execute(
        select(AuditChainHead.last_id, AuditChainHead.last_hash).where(AuditChainHead.id == HEAD_ID)
    ).one_or_none()
    return ChainHead(row[0], row[1]) if row is not None else None


def verify(
    sessions: sessionmaker[Session], anchors: Iterable[ChainHead] = (), page_size: int = 1000
) -> Verification:
    """Walk the chain in id order and stop at the first problem.

    Finds a changed row (its hash no longer matches), a deleted one (the next row links
    past it), an inserted one (it does not link, the next row links around it, or it lies
    beyond the chain head), and a cut-off tail (the chain ends before the recorded head, or
    before an external anchor). Reads a page per short transaction, so writers go on
    meanwhile: rows appended during the walk are legitimate as long as the head covers them.
    """
    with sessions() as session:
        head = chain_head(session)  # rows up to here were committed before the walk began
    wanted = {a.id: a for a in anchors}

    def failed(rows: int, bad_id: int | None, problem: str) -> Verification:
        return Verification(rows, head, bad_id, problem)

    if head is None:
        return failed(0, None, "the chain head row (audit_chain_head) is missing: it was deleted")
    count = 0
    before_previous: str | None = None  # hash of the row before the previous one
    previous_id: int | None = None
    previous_hash = GENESIS_HASH
    for row in _rows(sessions, page_size):
        row_id = row["id"]
        if row_hash(row) != row["row_hash"]:
            return failed(
                count, row_id, f"row {row_id} was changed (or inserted by hand): it does not match its hash"
            )
        if row["prev_hash"] != previous_hash:
            return failed(count, *_broken_link(row, previous_id, before_previous))
        if row_id == head.id and row["row_hash"] != head.hash:
            return failed(count, row_id, f"row {row_id} does not match the recorded chain head {head}")
        anchor = wanted.pop(row_id, None)
        if anchor is not None and anchor.hash != row["row_hash"]:
            return failed(
                count,
                row_id,
                f"row {row_id} does not match the external anchor {anchor}: "
                "the log up to that row was rewritten",
            )
        count += 1
        before_previous, previous_id, previous_hash = previous_hash, row_id, row["row_hash"]
    last_id = previous_id or 0
    if last_id < head.id:
        ends = f"ends at row {last_id}" if previous_id is not None else "is empty"
        problem = f"the log {ends} but the chain head records row {head.id}: rows were removed"
        return failed(count, head.id, problem)
    with sessions() as session:
        end_head = chain_head(session)  # every row the walk saw was committed before this
        beyond = session.scalar(
            select(func.min(AuditEntry.id)).where(AuditEntry.id > (end_head.id if end_head else 0))
        )
    if end_head is None:
        return failed(count, None, "the chain head row (audit_chain_head) was deleted during the check")
    if beyond is not None and beyond <= last_id:
        return failed(
            count, beyond, f"row {beyond} lies beyond the chain head {end_head}: it was inserted by hand"
        )
    for anchor in sorted(wanted.values(), key=lambda a: a.id):
        if anchor.id == 0 and anchor.hash == GENESIS_HASH:
            continue  # the anchor of an empty log
        return failed(
            count,
            anchor.id,
            f"row {anchor.id} of the external anchor {anchor} is not in the log: rows were removed "
            "(and the chain head rewritten)",
        )
    return Verification(count, head)


def _broken_link(
    row: Mapping[str, Any], previous_id: int | None, before_previous: str | None
) -> tuple[int, str]:
    """(first bad id, what happened) for a row whose prev_hash is not the previous row's hash.

    Chain ids are consecutive (each new row is head id + 1), so a gap in the ids at a broken
    link means deleted rows; no gap means the previous row was rewritten with a fresh hash.
    """
    row_id = row["id"]
    if previous_id is None:
        return row_id, f"row {row_id} does not start the chain: the rows before it were deleted"
    if row["prev_hash"] == before_previous:
        return previous_id, f"row {previous_id} was inserted: row {row_id} links past it"
    if row_id > previous_id + 1:
        missing = f"{previous_id + 1}" if row_id == previous_id + 2 else f"{previous_id + 1}-{row_id - 1}"
        return previous_id + 1, f"row(s) {missing} deleted: row {row_id} does not link to row {previous_id}"
    return previous_id, (
        f"row {previous_id} was rewritten with a recomputed hash: row {row_id} was chained to other content"
    )


def _rows(sessions: sessionmaker[Session], page_size: int) -> Iterator[dict[str, Any]]:
    """Every row in id order, a page per short transaction (keyset paging)."""
    columns = [AuditEntry.__table__.c[name] for name in (*CONTENT_COLUMNS, "row_hash")]
    after = None
    while True:
        query = select(*columns).order_by(AuditEntry.id).limit(page_size)
        if after is not None:
            query = query.where(AuditEntry.id > after)
        with sessions() as session:
            page = [dict(r._mapping) for r in session.execute(query)]
        yield from page
        if len(page) < page_size:
            return
        after = page[-1]["id"]


def _jsonable(value: Any) -> Any:
    if type(value) in _PLAIN:  # most values: returned as they are, as below, without the checks
        return value
    if isinstance(value, dict):
        return {str(k): v if type(v) in _PLAIN else _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [v if type(v) in _PLAIN else _jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN or infinity
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)  # dates, Decimals: as their text


def _canonical_numbers(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _canonical_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical_numbers(v) for v in value]
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)  # only rows from before the chain can hold these
        return int(value) if value.is_integer() else value
    return value
