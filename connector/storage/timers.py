"""The open steps' next due moments (reminders, escalation, time-outs), for the worker's sweep.

One row per request whose open step has timing: its next due moment (``due_at``, indexed), kept
in step with the request by ``schedule`` in every transaction that saves the request. The row
only says *when to look*; what is due is decided from the request's own history
(``connector.approvals.timers``), so a row that is early, late or stale is harmless.

Claiming (several workers): ``claim_due`` marks a batch of due rows with a claim id and a lease
in one conditional UPDATE (on PostgreSQL its row selection skips rows another worker has locked,
``FOR UPDATE SKIP LOCKED``); a row leased to someone else is never claimed. Saving what a timer
did releases the claim in the same transaction, and only if the claim is still ours
(``release``), so each due moment acts once even when two sweeps race.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import cast

from sqlalchemy import Index, Integer, String, Table, delete, insert, or_, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from connector.approvals.timers import DueTimer
from connector.errors import RetriableError
from connector.storage.bulk import update_rows
from connector.storage.db import Base, UTCDateTime


class ApprovalTimerRow(Base):
    __tablename__ = "approval_timers"

    request_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    step_index: Mapped[int] = mapped_column(Integer)
    round: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))  # remind | escalate | timeout
    due_at: Mapped[datetime] = mapped_column(UTCDateTime)
    claim_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    __table_args__ = (Index("ix_timers_due", "due_at"),)


class LostClaimError(RetriableError):
    """Our claim on a timer row is gone (the request changed, or the lease ran out and another
    worker took it): what we decided must not be saved."""


def schedule(session: Session, request_id: str, due: DueTimer | None) -> None:
    """Set the request's next due moment (None: nothing more will happen), releasing any claim."""
    row = session.get(ApprovalTimerRow, request_id)
    if due is None:
        if row is not None:
            session.execute(delete(ApprovalTimerRow).where(ApprovalTimerRow.request_id == request_id))
        return
    if row is None:
        session.add(
            ApprovalTimerRow(
                request_id=request_id,
                step_index=due.step_index,
                round=due.round,
                kind=due.kind,
                due_at=due.at,
            )
        )
        session.flush()
        return
    row.step_index, row.round, row.kind, row.due_at = due.step_index, due.round, due.kind, due.at
    row.claim_id = row.lease_until = None
    session.flush()


def schedule_many(session: Session, dues: Mapping[str, DueTimer | None]) -> None:
    """`schedule` for many requests at once: one statement per kind of change."""
    if not dues:
        return
    table = cast(Table, ApprovalTimerRow.__table__)
    existing = set(session.scalars(select(table.c.request_id).where(table.c.request_id.in_(list(dues)))))
    move_many(session, {rid: due for rid, due in dues.items() if rid in existing})
    added = [
        {
            "request_id": rid,
            "step_index": due.step_index,
            "round": due.round,
            "kind": due.kind,
            "due_at": due.at,
        }
        for rid, due in dues.items()
        if due is not None and rid not in existing
    ]
    if added:
        session.execute(insert(table), added)


def changed(session: Session, dues: Mapping[str, DueTimer | None]) -> dict[str, DueTimer | None]:
    """Those of `dues` the stored rows do not say already (a worker's start-up recomputation
    mostly finds every row right: no write for those, and no claim of another worker cleared)."""
    if not dues:
        return {}
    table = cast(Table, ApprovalTimerRow.__table__)
    stored = {
        row.request_id: (row.step_index, row.round, row.kind, row.due_at)
        for row in session.execute(
            select(table.c.request_id, table.c.step_index, table.c.round, table.c.kind, table.c.due_at).where(
                table.c.request_id.in_(list(dues))
            )
        )
    }
    return {
        rid: due
        for rid, due in dues.items()
        if (None if due is None else (due.step_index, due.round, due.kind, due.at)) != stored.get(rid)
    }


def move_many(session: Session, dues: Mapping[str, DueTimer | None]) -> None:
    """`schedule_many` for rows known to exist (the sweep's claimed rows): no look-up first;
    the moves as `UPDATE ... FROM (VALUES ...)`, 500 rows a statement."""
    table = cast(Table, ApprovalTimerRow.__table__)
    moved = [
        (rid, due.step_index, due.round, due.kind, due.at) for rid, due in dues.items() if due is not None
    ]
    gone = [rid for rid, due in dues.items() if due is None]
    update_rows(
        session,
        table,
        ("request_id",),
        ("step_index", "round", "kind", "due_at"),
        moved,
        nulls=("claim_id", "lease_until"),
    )
    if gone:
        session.execute(delete(table).where(table.c.request_id.in_(gone)))


def claim_due(session: Session, now: datetime, *, limit: int, lease: timedelta) -> tuple[str, list[str]]:
    """Claim up to ``limit`` due, unleased rows (earliest first); returns the claim id and their
    request ids. Commit right after, so the lease is visible to other workers."""
    claim_id = uuid.uuid4().hex
    free = or_(ApprovalTimerRow.lease_until.is_(None), ApprovalTimerRow.lease_until < now)
    due = (
        select(ApprovalTimerRow.request_id)
        .where(ApprovalTimerRow.due_at <= now, free)
        .order_by(ApprovalTimerRow.due_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    session.execute(
        update(ApprovalTimerRow)
        .where(ApprovalTimerRow.request_id.in_(due.scalar_subquery()), free)  # re-checked under the lock
        .values(claim_id=claim_id, lease_until=now + lease)
        .execution_options(synchronize_session=False)
    )
    ids = session.scalars(
        select(ApprovalTimerRow.request_id)
        .where(ApprovalTimerRow.claim_id == claim_id)
        .order_by(ApprovalTimerRow.due_at)
    ).all()
    return claim_id, list(ids)


def release(session: Session, request_id: str, claim_id: str) -> None:
    """Inside the transaction saving what the timer did: raise LostClaimError unless the claim is
    still ours (a conditional UPDATE, so two workers can never both pass)."""
    result = session.execute(
        update(ApprovalTimerRow)
        .where(ApprovalTimerRow.request_id == request_id, ApprovalTimerRow.claim_id == claim_id)
        .values(claim_id=None, lease_until=None)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise LostClaimError(f"timer of request {request_id} is no longer claimed by {claim_id}")


def due_count(session: Session, now: datetime) -> int:
    """How many rows are due (for ops and the benchmark)."""
    from sqlalchemy import func

    return int(session.scalar(select(func.count()).where(ApprovalTimerRow.due_at <= now)) or 0)
