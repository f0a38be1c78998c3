"""The append-only audit log: one row per thing that happened, in the caller's transaction."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from connector.clock import utcnow
from connector.storage.models import AuditEntry

KINDS = (
    "webhook_received",
    "echo_ignored",
    "rule_matched",
    "transition",
    "step_opened",
    "vote",
    "action_queued",
    "writeback_result",
    "expired",
)


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
    session.add(
        AuditEntry(
            at=utcnow(),
            kind=kind,
            connection=connection,
            object_type=object_type,
            record_id=record_id,
            request_id=request_id,
            actor=actor,
            mapping_hash=mapping_hash,
            detail=_jsonable(detail),
        )
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)  # dates, Decimals: as their text
