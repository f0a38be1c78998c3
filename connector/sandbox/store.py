"""The sandbox CRM's data: one small SQLite file (stdlib sqlite3), separate from our database.

Objects have typed fields (the API's describe answer comes from the same specs). An edit
validates every field, writes the record and queues its webhook in ONE transaction, so a
change is never made without its webhook (the outgoing queue is the sandbox's own outbox).
One connection behind a lock: the sandbox is a single process, and this keeps it consistent.
"""

from __future__ import annotations

import base64
import json
import math
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from connector.clock import utcnow
from connector.errors import CrmApprovalsError

Clock = Callable[[], datetime]

# Per-record error codes of the API (docs/crms/sandbox.md).
UNKNOWN_FIELD = "UNKNOWN_FIELD"
INVALID_VALUE = "INVALID_VALUE"
READ_ONLY_FIELD = "READ_ONLY_FIELD"
NOT_FOUND = "NOT_FOUND"
RECORD_LOCKED = "RECORD_LOCKED"  # retriable: someone holds the record for a moment

ORIGIN_USER = "user"
ORIGIN_API = "api"


@dataclass(frozen=True)
class FieldSpec:
    name: str  # API name
    label: str
    type: str  # string, text, number, integer, date, datetime, picklist, multipicklist, reference
    updateable: bool = True
    required: bool = False
    values: tuple[str, ...] = ()  # allowed values of (multi)picklists
    reference_to: str | None = None  # object type a reference points at
    relationship_name: str | None = None  # "company" for company_id: company.name reads through it
    through: tuple[str, str] | None = None  # related field: (reference field, field of the target)


@dataclass(frozen=True)
class ObjectSpec:
    name: str  # API name: deal, company, user
    label: str
    table: str
    fields: tuple[FieldSpec, ...]

    def field(self, name: str) -> FieldSpec | None:
        return next((f for f in self.fields if f.name == name), None)

    @property
    def columns(self) -> list[FieldSpec]:
        """Fields stored in the table itself (not related ones)."""
        return [f for f in self.fields if f.through is None]

    @property
    def editable(self) -> list[FieldSpec]:
        return [f for f in self.fields if f.updateable]


CURRENCIES = ("EUR", "USD", "GBP")
STAGES = ("Prospecting", "Qualification", "Proposal", "Negotiation", "Closed Won", "Closed Lost")
DECISIONS = ("Approve", "Reject")  # what an approver may set on a pending deal (crm_vote)
PRODUCT_LINES = ("Software", "Services", "Hardware", "Support", "Training")

# Who changed a record last (as Salesforce's LastModifiedById): the user a page edit was made as,
# none for API writes (the connector's own). Votes from the CRM and locked fields read it.
MODIFIED_BY = FieldSpec(
    "modified_by_id",
    "Last modified by",
    "reference",
    updateable=False,
    reference_to="user",
    relationship_name="modified_by",
)
DEAL = ObjectSpec(
    "deal",
    "Deal",
    "deals",
    (
        FieldSpec("id", "Deal ID", "string", updateable=False),
        FieldSpec("name", "Deal name", "string", required=True),
        FieldSpec("amount", "Amount", "number"),
        FieldSpec("currency", "Currency", "picklist", values=CURRENCIES),
        FieldSpec("stage", "Stage", "picklist", values=STAGES),
        FieldSpec("owner_id", "Owner", "reference", reference_to="user", relationship_name="owner"),
        FieldSpec(
            "owner_manager_id",
            "Owner's manager",
            "reference",
            reference_to="user",
            relationship_name="owner_manager",
        ),
        FieldSpec("company_id", "Company", "reference", reference_to="company", relationship_name="company"),
        FieldSpec("product_lines", "Product lines", "multipicklist", values=PRODUCT_LINES),
        FieldSpec("term_months", "Term (months)", "integer"),
        FieldSpec("close_date", "Close date", "date"),
        FieldSpec("approval_status", "Approval status", "string"),
        FieldSpec("approval_expires_on", "Approval expires on", "date"),
        FieldSpec("approval_comment", "Approval comment", "text"),
        FieldSpec("approval_progress", "Approval progress", "text"),
        FieldSpec("approval_decision", "Approval decision", "picklist", values=DECISIONS),
        FieldSpec("approval_decision_comment", "Approval decision comment", "text"),
        FieldSpec("modified_at", "Last modified", "datetime", updateable=False),
        MODIFIED_BY,
        FieldSpec("company.name", "Company name", "string", updateable=False, through=("company_id", "name")),
        FieldSpec(
            "company.credit_score",
            "Company credit score",
            "integer",
            updateable=False,
            through=("company_id", "credit_score"),
        ),
    ),
)
COMPANY = ObjectSpec(
    "company",
    "Company",
    "companies",
    (
        FieldSpec("id", "Company ID", "string", updateable=False),
        FieldSpec("name", "Company name", "string", required=True),
        FieldSpec("credit_score", "Credit score", "integer"),
        FieldSpec("tax_id", "Tax ID", "string"),
        FieldSpec("owner_id", "Account manager", "reference", reference_to="user", relationship_name="owner"),
        FieldSpec("approval_status", "Approval status", "string"),
        FieldSpec("approval_expires_on", "Approval expires on", "date"),
        FieldSpec("approval_comment", "Approval comment", "text"),
        FieldSpec("modified_at", "Last modified", "datetime", updateable=False),
        MODIFIED_BY,
    ),
)
# Seed 001: a contract belongs to a company, whose approval must be in force first.
CONTRACT_TYPES = ("Supply", "Services", "Licence", "Framework")
CONTRACT = ObjectSpec(
    "contract",
    "Contract",
    "contracts",
    (
        FieldSpec("id", "Contract ID", "string", updateable=False),
        FieldSpec("name", "Contract name", "string", required=True),
        FieldSpec("contract_number", "Contract number", "string"),
        FieldSpec("contract_type", "Contract type", "picklist", values=CONTRACT_TYPES),
        FieldSpec("amount", "Amount", "number"),
        FieldSpec("company_id", "Company", "reference", reference_to="company", relationship_name="company"),
        FieldSpec("owner_id", "Owner", "reference", reference_to="user", relationship_name="owner"),
        FieldSpec("product_lines", "Product lines", "multipicklist", values=PRODUCT_LINES),
        FieldSpec("approval_status", "Approval status", "string"),
        FieldSpec("approval_comment", "Approval comment", "text"),
        FieldSpec("approval_progress", "Approval progress", "text"),
        FieldSpec("modified_at", "Last modified", "datetime", updateable=False),
        MODIFIED_BY,
        FieldSpec("company.name", "Company name", "string", updateable=False, through=("company_id", "name")),
    ),
)
USER = ObjectSpec(
    "user",
    "User",
    "users",
    (
        FieldSpec("id", "User ID", "string", updateable=False),
        FieldSpec("name", "Name", "string", updateable=False),
        FieldSpec("role", "Role", "string", updateable=False),
        FieldSpec("email", "Email", "string", updateable=False),
        FieldSpec("locale", "Language", "string", updateable=False),
        FieldSpec(
            "manager_id",
            "Manager",
            "reference",
            updateable=False,
            reference_to="user",
            relationship_name="manager",
        ),
        FieldSpec("active", "Active", "boolean", updateable=False),
        FieldSpec("modified_at", "Last modified", "datetime", updateable=False),
    ),
)
QUEUE = ObjectSpec(
    "queue",
    "Queue",
    "queues",
    (
        FieldSpec("id", "Queue ID", "string", updateable=False),
        FieldSpec("name", "Name", "string", required=True),
        FieldSpec("members", "Members (user ids, ;-separated)", "text"),
        FieldSpec("modified_at", "Last modified", "datetime", updateable=False),
    ),
)
OBJECTS: dict[str, ObjectSpec] = {spec.name: spec for spec in (DEAL, COMPANY, USER, QUEUE, CONTRACT)}

_SQL_TYPES = {"number": "REAL", "integer": "INTEGER", "boolean": "INTEGER"}
_OUTGOING_SQL = """
CREATE TABLE IF NOT EXISTS outgoing_webhooks (
    id INTEGER PRIMARY KEY,
    msg_id TEXT NOT NULL UNIQUE,
    object_type TEXT NOT NULL,
    record_id TEXT NOT NULL,
    changed_fields TEXT NOT NULL,
    origin TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TEXT NOT NULL,
    lease_until TEXT,
    delivered_at TEXT,
    last_status INTEGER,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS ix_outgoing_due ON outgoing_webhooks (delivered_at, next_attempt_at);
"""


class RecordError(CrmApprovalsError):
    """Why one record could not be written: the API's per-record error."""

    code: str

    def __init__(self, code: str, message: str, field_name: str | None = None) -> None:
        super().__init__(message, code=code)
        self.field = field_name

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "field": self.field}


class InvalidFields(RecordError):
    """Every field error of one edit (the page shows them all; the API reports the first)."""

    def __init__(self, errors: list[RecordError]) -> None:
        first = errors[0]
        super().__init__(first.code, first.message, first.field)
        self.errors = errors


@dataclass(frozen=True)
class Change:
    object_type: str
    record_id: str
    changed_fields: tuple[str, ...]
    msg_id: str | None  # the queued webhook; None when nothing changed


@dataclass(frozen=True)
class Delivery:
    """One queued webhook (its row in outgoing_webhooks)."""

    id: int
    msg_id: str
    object_type: str
    record_id: str
    changed_fields: tuple[str, ...]
    origin: str
    body: bytes
    created_at: str
    attempts: int
    next_attempt_at: str
    delivered_at: str | None
    last_status: int | None
    last_error: str | None


@dataclass
class Page:
    records: list[dict[str, Any]] = field(default_factory=list)
    next_cursor: str | None = None


def iso(moment: datetime) -> str:
    """Fixed-width UTC text, so stored times sort as text."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def spec_of(object_type: str) -> ObjectSpec:
    try:
        return OBJECTS[object_type]
    except KeyError:
        raise RecordError(
            "UNKNOWN_OBJECT", f"no object type {object_type!r}; known: {', '.join(OBJECTS)}"
        ) from None


class Store:
    def __init__(self, path: str | Path, clock: Clock = utcnow) -> None:
        self.path = str(path)
        self.clock = clock
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_schema_sql())
        self._add_new_columns()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def now(self) -> str:
        return iso(self.clock())

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._db

    # --- set-up -------------------------------------------------------------------------

    def _add_new_columns(self) -> None:
        """A store made by an older version lacks fields added since (e.g. user.email): add them."""
        with self.transaction() as db:
            for spec in OBJECTS.values():
                have = {row["name"] for row in db.execute(f"PRAGMA table_info({spec.table})")}
                for f in spec.columns:
                    if f.name not in have:
                        db.execute(
                            f'ALTER TABLE {spec.table} ADD COLUMN "{f.name}" {_SQL_TYPES.get(f.type, "TEXT")}'
                        )

    def fill_blanks(self, object_type: str, record_id: str, values: Mapping[str, Any]) -> None:
        """Set the given fields where the record has none yet (seed data added in a later version)."""
        spec = spec_of(object_type)
        with self.transaction() as db:
            for f in spec.columns:
                if f.name in values and f.name != "id":
                    db.execute(
                        f'UPDATE {spec.table} SET "{f.name}" = ? WHERE id = ? AND "{f.name}" IS NULL',
                        (_to_column(f, values[f.name]), record_id),
                    )

    def is_empty(self) -> bool:
        with self.reading() as db:
            return db.execute("SELECT COUNT(*) FROM deals").fetchone()[0] == 0

    def reset(self) -> None:
        """Delete every record and queued webhook (seed.py fills it again)."""
        with self.transaction() as db:
            for table in ("outgoing_webhooks", *(spec.table for spec in OBJECTS.values())):
                db.execute(f"DELETE FROM {table}")

    def insert(self, object_type: str, values: Mapping[str, Any]) -> None:
        """Create a record as given (seeding only: no validation, no webhook)."""
        spec = spec_of(object_type)
        row = {f.name: _to_column(f, values.get(f.name)) for f in spec.columns if f.name in values}
        row.setdefault("modified_at", self.now())
        names = ", ".join(row)
        marks = ", ".join(f":{name}" for name in row)
        with self.transaction() as db:
            db.execute(f"INSERT INTO {spec.table} ({names}) VALUES ({marks})", row)

    # --- reading ------------------------------------------------------------------------

    def get(self, object_type: str, record_id: str) -> dict[str, Any] | None:
        with self.reading() as db:
            return self._get(db, spec_of(object_type), record_id)

    def get_many(self, object_type: str, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        spec = spec_of(object_type)
        with self.reading() as db:
            found = {i: self._get(db, spec, i) for i in dict.fromkeys(ids)}
        return {i: record for i, record in found.items() if record is not None}

    def records(self, object_type: str) -> list[dict[str, Any]]:
        spec = spec_of(object_type)
        with self.reading() as db:
            rows = db.execute(f"SELECT * FROM {spec.table} ORDER BY id").fetchall()
            return [self._with_related(db, spec, _decode(spec, row)) for row in rows]

    def last_write_backs(self, object_type: str) -> dict[str, str]:
        """record id -> when our connector last wrote it through the API."""
        table = spec_of(object_type).table
        with self.reading() as db:
            rows = db.execute(
                f"SELECT id, last_write_back_at FROM {table} WHERE last_write_back_at IS NOT NULL"
            )
            return {row["id"]: row["last_write_back_at"] for row in rows}

    def query(
        self,
        object_type: str,
        *,
        modified_since: datetime | None = None,
        filters: Mapping[str, str] | None = None,
        cursor: str | None = None,
        limit: int = 100,
    ) -> Page:
        """Records ordered by (modified_at, id); the cursor is the last one a page returned."""
        spec = spec_of(object_type)
        for name in filters or {}:
            _known_field(spec, name)
        after = decode_cursor(cursor) if cursor else None
        since = iso(modified_since) if modified_since else ""
        records = [
            r
            for r in sorted(self.records(object_type), key=lambda r: (r["modified_at"], r["id"]))
            if r["modified_at"] >= since
            and (after is None or (r["modified_at"], r["id"]) > after)
            and all(matches(r.get(k), v) for k, v in (filters or {}).items())
        ]
        page = records[:limit]
        more = len(records) > limit
        return Page(page, encode_cursor(page[-1]["modified_at"], page[-1]["id"]) if more else None)

    def _get(self, db: sqlite3.Connection, spec: ObjectSpec, record_id: str) -> dict[str, Any] | None:
        row = db.execute(f"SELECT * FROM {spec.table} WHERE id = ?", (record_id,)).fetchone()
        return None if row is None else self._with_related(db, spec, _decode(spec, row))

    def _with_related(
        self, db: sqlite3.Connection, spec: ObjectSpec, record: dict[str, Any]
    ) -> dict[str, Any]:
        """Add the read-only related fields, e.g. company.credit_score through company_id."""
        for f in spec.fields:
            if f.through is not None:
                ref_field, target_field = f.through
                target = self._target(db, spec.field(ref_field), record.get(ref_field))
                record[f.name] = target.get(target_field) if target else None
        return record

    def _target(self, db: sqlite3.Connection, ref: FieldSpec | None, target_id: Any) -> dict[str, Any] | None:
        if ref is None or ref.reference_to is None or not target_id:
            return None
        target_spec = OBJECTS[ref.reference_to]
        row = db.execute(f"SELECT * FROM {target_spec.table} WHERE id = ?", (target_id,)).fetchone()
        return None if row is None else _decode(target_spec, row)

    # --- writing ------------------------------------------------------------------------

    def update(
        self,
        object_type: str,
        record_id: str,
        values: Mapping[str, Any],
        origin: str,
        *,
        from_form: bool = False,
        modified_by: str | None = None,
    ) -> Change:
        """Validate and write one record; queue its webhook when anything changed.
        Raises RecordError (nothing written) for an unknown/locked record or any bad field."""
        spec = spec_of(object_type)
        with self.transaction() as db:
            current = self._get(db, spec, record_id)
            if current is None:
                raise RecordError(NOT_FOUND, f"{object_type} {record_id!r} does not exist")
            if origin == ORIGIN_API:
                self._refuse_if_locked(db, spec, record_id)
            wanted = self._coerce_all(db, spec, values, from_form)
            changed = tuple(
                f.name for f in spec.fields if f.name in wanted and wanted[f.name] != current[f.name]
            )
            now = self.now()
            if origin == ORIGIN_API:
                db.execute(f"UPDATE {spec.table} SET last_write_back_at = ? WHERE id = ?", (now, record_id))
            if not changed:
                return Change(object_type, record_id, (), None)
            if modified_by is not None:
                try:
                    self._check_reference(db, MODIFIED_BY, modified_by)
                except RecordError as exc:
                    message = f"Edit as: there is no user {modified_by!r}; pick one from the list"
                    raise InvalidFields([RecordError(exc.code, message, "edited_by")]) from None
            self._write(db, spec, record_id, {name: wanted[name] for name in changed}, now, modified_by)
            record = self._get(db, spec, record_id)
            assert record is not None
            msg_id = self._enqueue(db, spec.name, record, changed, origin, now)
        return Change(object_type, record_id, changed, msg_id)

    def lock(self, object_type: str, record_id: str, seconds: int) -> None:
        """Hold a record for a moment (as a user editing it would): API writes get RECORD_LOCKED."""
        spec = spec_of(object_type)
        until = iso(self.clock() + timedelta(seconds=seconds))
        with self.transaction() as db:
            db.execute(f"UPDATE {spec.table} SET locked_until = ? WHERE id = ?", (until, record_id))

    def locked_until(self, object_type: str, record_id: str) -> str | None:
        spec = spec_of(object_type)
        with self.reading() as db:
            row = db.execute(f"SELECT locked_until FROM {spec.table} WHERE id = ?", (record_id,)).fetchone()
        if row is None or row["locked_until"] is None or row["locked_until"] <= self.now():
            return None
        return str(row["locked_until"])

    def _refuse_if_locked(self, db: sqlite3.Connection, spec: ObjectSpec, record_id: str) -> None:
        row = db.execute(f"SELECT locked_until FROM {spec.table} WHERE id = ?", (record_id,)).fetchone()
        if row["locked_until"] and row["locked_until"] > self.now():
            raise RecordError(
                RECORD_LOCKED,
                f"{spec.name} {record_id!r} is locked by a user until {row['locked_until']}; try again later",
            )

    def _coerce_all(
        self, db: sqlite3.Connection, spec: ObjectSpec, values: Mapping[str, Any], from_form: bool
    ) -> dict[str, Any]:
        wanted: dict[str, Any] = {}
        errors: list[RecordError] = []
        for name, raw in values.items():
            try:
                f = _known_field(spec, name)
                wanted[name] = coerce(f, raw, from_form=from_form)
                if f.reference_to and wanted[name] is not None:
                    self._check_reference(db, f, wanted[name])
            except RecordError as error:
                errors.append(error)
        if errors:
            raise InvalidFields(errors)
        return wanted

    def _check_reference(self, db: sqlite3.Connection, f: FieldSpec, target_id: str) -> None:
        table = OBJECTS[f.reference_to or ""].table
        if db.execute(f"SELECT 1 FROM {table} WHERE id = ?", (target_id,)).fetchone() is None:
            raise RecordError(INVALID_VALUE, f"{f.name}: there is no {f.reference_to} {target_id!r}", f.name)

    def _write(
        self,
        db: sqlite3.Connection,
        spec: ObjectSpec,
        record_id: str,
        values: dict[str, Any],
        now: str,
        modified_by: str | None = None,
    ) -> None:
        columns = {name: _to_column(spec.field(name), value) for name, value in values.items()}
        columns["modified_at"] = now
        columns["modified_by_id"] = modified_by
        assignments = ", ".join(f'"{name}" = :{name}' for name in columns)
        db.execute(f"UPDATE {spec.table} SET {assignments} WHERE id = :_id", {**columns, "_id": record_id})

    def _enqueue(
        self,
        db: sqlite3.Connection,
        object_type: str,
        record: dict[str, Any],
        changed: tuple[str, ...],
        origin: str,
        now: str,
    ) -> str:
        msg_id = "msg_" + uuid.uuid4().hex
        body = webhook_body(object_type, record, changed, origin, now)
        db.execute(
            "INSERT INTO outgoing_webhooks (msg_id, object_type, record_id, changed_fields, origin, body,"
            " created_at, next_attempt_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (msg_id, object_type, record["id"], json.dumps(list(changed)), origin, body.decode(), now, now),
        )
        return msg_id

    # --- the outgoing webhook queue ---------------------------------------------------------

    def claim_due(self, lease_seconds: int = 30, limit: int = 50) -> list[Delivery]:
        """Undelivered webhooks that are due and not being sent right now, leased to the caller."""
        now = self.clock()
        with self.transaction() as db:
            rows = db.execute(
                "SELECT * FROM outgoing_webhooks WHERE delivered_at IS NULL AND next_attempt_at <= ?"
                " AND (lease_until IS NULL OR lease_until <= ?) ORDER BY id LIMIT ?",
                (iso(now), iso(now), limit),
            ).fetchall()
            self._lease(db, [row["id"] for row in rows], now, lease_seconds)
        return [_delivery(row) for row in rows]

    def claim(self, msg_id: str, lease_seconds: int = 30) -> Delivery | None:
        """One webhook, to send right after the change (None if delivered or being sent)."""
        now = self.clock()
        with self.transaction() as db:
            row = db.execute(
                "SELECT * FROM outgoing_webhooks WHERE msg_id = ? AND delivered_at IS NULL"
                " AND (lease_until IS NULL OR lease_until <= ?)",
                (msg_id, iso(now)),
            ).fetchone()
            if row is None:
                return None
            self._lease(db, [row["id"]], now, lease_seconds)
        return _delivery(row)

    def _lease(self, db: sqlite3.Connection, ids: list[int], now: datetime, seconds: int) -> None:
        until = iso(now + timedelta(seconds=seconds))
        db.executemany("UPDATE outgoing_webhooks SET lease_until = ? WHERE id = ?", [(until, i) for i in ids])

    def mark_delivered(self, delivery_id: int, status: int) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE outgoing_webhooks SET delivered_at = ?, attempts = attempts + 1, last_status = ?,"
                " last_error = NULL, lease_until = NULL WHERE id = ?",
                (self.now(), status, delivery_id),
            )

    def mark_failed(self, delivery_id: int, status: int | None, error: str, retry_in: float) -> None:
        next_at = iso(self.clock() + timedelta(seconds=retry_in))
        with self.transaction() as db:
            db.execute(
                "UPDATE outgoing_webhooks SET attempts = attempts + 1, last_status = ?, last_error = ?,"
                " next_attempt_at = ?, lease_until = NULL WHERE id = ?",
                (status, error[:500], next_at, delivery_id),
            )

    def retry_all_now(self) -> int:
        """Make every undelivered webhook due now (the page's "retry now" button)."""
        with self.transaction() as db:
            cursor = db.execute(
                "UPDATE outgoing_webhooks SET next_attempt_at = ? WHERE delivered_at IS NULL", (self.now(),)
            )
            return cursor.rowcount

    def delivery(self, msg_id: str) -> Delivery | None:
        with self.reading() as db:
            row = db.execute("SELECT * FROM outgoing_webhooks WHERE msg_id = ?", (msg_id,)).fetchone()
        return None if row is None else _delivery(row)

    def pending_deliveries(self) -> list[Delivery]:
        with self.reading() as db:
            rows = db.execute(
                "SELECT * FROM outgoing_webhooks WHERE delivered_at IS NULL ORDER BY id"
            ).fetchall()
        return [_delivery(row) for row in rows]

    def recent_deliveries(self, limit: int = 10) -> list[Delivery]:
        with self.reading() as db:
            rows = db.execute(
                "SELECT * FROM outgoing_webhooks WHERE delivered_at IS NOT NULL ORDER BY id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [_delivery(row) for row in rows]


def webhook_body(
    object_type: str, record: Mapping[str, Any], changed: Sequence[str], origin: str, occurred_at: str
) -> bytes:
    """The Standard Webhooks body webhooks/standard.py parses (compact JSON, signed as sent)."""
    payload = {
        "type": "record.updated",
        "timestamp": occurred_at,
        "data": {
            "object": object_type,
            "id": record["id"],
            "changed_fields": list(changed),
            "values": dict(record),
            "origin": origin,
            "modified_by": record.get("modified_by_id"),
        },
    }
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


# --- values ---------------------------------------------------------------------------------


def coerce(f: FieldSpec, raw: Any, *, from_form: bool = False) -> Any:
    """An incoming value as stored, or RecordError (READ_ONLY_FIELD / INVALID_VALUE) naming the field.
    Form values arrive as text, where an empty box means "no value"."""
    if not f.updateable:
        raise RecordError(READ_ONLY_FIELD, f"{f.name} is read-only", f.name)
    if isinstance(raw, str) and from_form:
        raw = raw.strip()
    if raw is None or (from_form and raw in ("", [])):
        if f.required:
            raise RecordError(INVALID_VALUE, f"{f.name} is required", f.name)
        return [] if f.type == "multipicklist" else None
    try:
        return _COERCERS[f.type](f, raw)
    except (ValueError, TypeError, InvalidOperation):
        raise RecordError(INVALID_VALUE, f"{f.name}: {raw!r} is not {_EXPECTED[f.type]}", f.name) from None


def _string(f: FieldSpec, raw: Any) -> str:
    if not isinstance(raw, str):
        raise TypeError
    if f.required and not raw.strip():
        raise ValueError
    if len(raw) > (255 if f.type == "string" else 32000):
        raise ValueError
    return raw


def _number(_f: FieldSpec, raw: Any) -> int | float:
    if isinstance(raw, bool) or not isinstance(raw, int | float | str | Decimal):
        raise TypeError
    value = Decimal(str(raw).strip())
    if not value.is_finite() or not math.isfinite(float(value)):
        raise ValueError
    return int(value) if value == value.to_integral_value() else float(value)


def _integer(f: FieldSpec, raw: Any) -> int:
    value = _number(f, raw)
    if isinstance(value, float):
        raise ValueError
    return value


def _date(_f: FieldSpec, raw: Any) -> str:
    if not isinstance(raw, str) or len(raw) != 10:
        raise TypeError
    return date.fromisoformat(raw).isoformat()


def _picklist(f: FieldSpec, raw: Any) -> str:
    if not isinstance(raw, str) or raw not in f.values:
        raise ValueError
    return raw


def _multipicklist(f: FieldSpec, raw: Any) -> list[str]:
    items = raw.split(";") if isinstance(raw, str) else raw  # ";" as Salesforce writes multi-picklists
    if not isinstance(items, list):
        raise TypeError
    chosen = [str(item).strip() for item in items if str(item).strip()]
    if not all(item in f.values for item in chosen):
        raise ValueError
    return list(dict.fromkeys(chosen))


def _reference(_f: FieldSpec, raw: Any) -> str:
    if not isinstance(raw, str) or not raw:
        raise TypeError
    return raw


_COERCERS: dict[str, Callable[[FieldSpec, Any], Any]] = {
    "string": _string,
    "text": _string,
    "number": _number,
    "integer": _integer,
    "date": _date,
    "picklist": _picklist,
    "multipicklist": _multipicklist,
    "reference": _reference,
}
_EXPECTED = {
    "string": "text (at most 255 characters)",
    "text": "text (at most 32000 characters)",
    "number": "a number",
    "integer": "a whole number",
    "date": "a date (YYYY-MM-DD)",
    "picklist": "one of the allowed values (see describe)",
    "multipicklist": "a list of allowed values (see describe)",
    "reference": "a record id",
}


def matches(value: Any, wanted: str) -> bool:
    """Equality filter from a query string: numbers compare as numbers, lists by membership."""
    if isinstance(value, list):
        return wanted in value
    if value is None:
        return wanted == ""
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return Decimal(str(value)) == Decimal(wanted)
        except InvalidOperation:
            return False
    return str(value) == wanted


def encode_cursor(modified_at: str, record_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([modified_at, record_id]).encode()).decode()


def decode_cursor(cursor: str) -> tuple[str, str]:
    try:
        modified_at, record_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        return str(modified_at), str(record_id)
    except (ValueError, TypeError):
        raise RecordError(
            "BAD_CURSOR", "cursor is not one this API returned; start again without it"
        ) from None


def _known_field(spec: ObjectSpec, name: str) -> FieldSpec:
    found = spec.field(name)
    if found is None:
        raise RecordError(UNKNOWN_FIELD, f"{spec.name} has no field {name!r} (see describe)", name)
    return found


def _to_column(f: FieldSpec | None, value: Any) -> Any:
    return json.dumps(value) if f is not None and f.type == "multipicklist" and value is not None else value


def _decode(spec: ObjectSpec, row: sqlite3.Row) -> dict[str, Any]:
    record: dict[str, Any] = {}
    for f in spec.columns:
        value = row[f.name]
        if f.type == "multipicklist":
            value = json.loads(value) if value else []
        elif f.type == "boolean" and value is not None:
            value = bool(value)
        elif f.type == "number" and isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        record[f.name] = value
    return record


def _delivery(row: sqlite3.Row) -> Delivery:
    return Delivery(
        id=row["id"],
        msg_id=row["msg_id"],
        object_type=row["object_type"],
        record_id=row["record_id"],
        changed_fields=tuple(json.loads(row["changed_fields"])),
        origin=row["origin"],
        body=row["body"].encode(),
        created_at=row["created_at"],
        attempts=row["attempts"],
        next_attempt_at=row["next_attempt_at"],
        delivered_at=row["delivered_at"],
        last_status=row["last_status"],
        last_error=row["last_error"],
    )


def _schema_sql() -> str:
    statements = [_OUTGOING_SQL]
    for spec in OBJECTS.values():
        columns = [
            f'"{f.name}" {_SQL_TYPES.get(f.type, "TEXT")}' + (" PRIMARY KEY" if f.name == "id" else "")
            for f in spec.columns
        ]
        columns += ["last_write_back_at TEXT", "locked_until TEXT"]
        statements.append(f"CREATE TABLE IF NOT EXISTS {spec.table} ({', '.join(columns)});")
    return "\n".join(statements)
