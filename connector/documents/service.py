"""The worker's document job: render the documents that are due, then attach new versions.

Durable without a queue of its own: the database says what is due. A document is due when
its request has a transition of one of the document's kinds (`on:`) newer than the one the
stored version shows (`source_seq`); a stored version is due for the CRM while its
`crm_status` is pending. So a crash, a lost nudge or a CRM outage only delays the work; the
next flush or sweep finds it again.

Rendering and CRM calls happen with no transaction open (never while holding SQLite's write
lock); each write is one short transaction that re-checks what it is about to replace.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from connector.approvals.spec import DocumentSpec, MappingSpec, RuleSpec
from connector.clock import utcnow
from connector.crm.base import AttachmentsUnsupported, FileUpload
from connector.directory.service import find_person
from connector.documents.models import ATTACHED, FAILED, PENDING, UNSUPPORTED, RequestDocument
from connector.documents.render import DocumentRenderer, DocumentTemplateError, file_name
from connector.errors import FatalError, RetriableError
from connector.logs import log_event
from connector.rules import MappingSet
from connector.storage import approval_store as store
from connector.storage.approval_store import StoredRequest
from connector.storage.db import transaction
from connector.storage.models import ApprovalRequestRow, ApprovalTransitionRow

log = logging.getLogger(__name__)
BATCH = 20  # documents rendered or attached per run; the next run takes the rest
MAX_BACKOFF = timedelta(hours=1)
RENDER_RETRY_SECONDS = 600.0


@dataclass(frozen=True)
class DueDocument:
    request_id: str
    spec: MappingSpec
    rule: RuleSpec
    document: DocumentSpec
    seq: int  # the newest transition of the document's kinds


def due_documents(session: Session, mappings: MappingSet, limit: int = BATCH) -> list[DueDocument]:
    """Documents whose request moved on since their stored version (or that have none yet)."""
    due: list[DueDocument] = []
    for spec, rule, document in _documents(mappings):
        R, T, D = ApprovalRequestRow, ApprovalTransitionRow, RequestDocument
        newest = func.max(T.seq)
        rows = session.execute(
            select(R.id, newest)
            .join(T, T.request_id == R.id)
            .outerjoin(D, and_(D.request_id == R.id, D.name == document.name))
            .where(
                R.connection == spec.connection,
                func.lower(R.object_type) == spec.object_type.lower(),
                R.rule_name == rule.name,
                T.kind.in_(sorted(document.on)),
            )
            .group_by(R.id, D.source_seq)
            .having(newest > func.coalesce(D.source_seq, 0))
            .limit(limit - len(due))
        ).all()
        due += [DueDocument(request_id, spec, rule, document, seq) for request_id, seq in rows]
        if len(due) >= limit:
            break
    return due


def _documents(mappings: MappingSet) -> Iterator[tuple[MappingSpec, RuleSpec, DocumentSpec]]:
    for spec in mappings.mappings:
        for rule in spec.rules:
            for document in rule.documents:
                yield spec, rule, document


def _names(session: Session, stored: StoredRequest) -> dict[str, str]:
    """Display names from the user directory for everyone the request names."""
    request = stored.request
    ids = {
        request.submitter,
        *(a for s in request.steps for a in s.approvers),
        *(v.approver for v in request.votes),
    }
    found = {}
    for user_id in ids:
        person = find_person(session, stored.record.connection, user_id)
        if person is not None and person.name:
            found[user_id] = person.name
    return found


def document_variables(
    stored: StoredRequest, document: DocumentSpec, version: int, names: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """What a document template sees (docs/documents.md#variables): plain values only. People
    are named by the user directory where it knows them, else by their CRM user id."""
    names = names or {}
    request = stored.request
    values = dict(request.record)
    steps = sorted(request.steps, key=lambda s: (s.entered_at, s.index, s.round))
    step_names = {(s.index, s.round): s.name for s in request.steps}
    approvers = sorted({names.get(v.approver, v.approver) for v in request.votes if v.decision == "approve"})
    title = values.get("name") or values.get("title") or stored.record.ref
    return {
        "document": {
            "name": document.name,
            "title": document.label,
            "version": version,
            "generated_at": utcnow(),
        },
        "request": {
            "id": request.id,
            "rule": request.rule_name,
            "status": request.status,
            "submitter": names.get(request.submitter, request.submitter),
            "submitted_at": request.submitted_at,
            "approved_at": request.approved_at,
            "closed_at": request.closed_at,
            "expires_at": request.expires_at,
        },
        "record": {
            "ref": stored.record.ref,
            "connection": stored.record.connection,
            "object": stored.record.object_type,
            "id": stored.record.record_id,
            "title": str(title),
            "fields": [{"name": k, "value": _text(v)} for k, v in values.items()],
        },
        "steps": [
            {
                "number": s.index + 1,
                "round": s.round,
                "name": s.name,
                "mode": s.mode,
                "approvers": [names.get(a, a) for a in s.approvers],
                "status": s.status,
                "entered_at": s.entered_at,
                "left_at": s.left_at,
            }
            for s in steps
        ],
        "votes": [
            {
                "at": v.at,
                "step": step_names.get((v.step_index, v.round), str(v.step_index + 1)),
                "approver": names.get(v.approver, v.approver),
                "approver_id": v.approver,
                "decision": v.decision,
                "comment": v.comment,
                "acting_admin": v.acting_admin,
            }
            for v in sorted(request.votes, key=lambda v: v.at)
        ],
        "history": [
            {
                "at": t.at,
                "kind": t.kind,
                "actor": names.get(t.actor, t.actor) if t.actor else None,
                "comment": t.comment,
            }
            for t in request.transitions
        ],
        "values": values,  # the record's fields by canonical name: {{ values.amount }}
        "approvers": approvers,
    }


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    return str(value)


@dataclass
class RunReport:
    rendered: int = 0
    attached: int = 0
    failed: int = 0


class DocumentJob:
    """The flush/sweep job (connector/wiring.py): render what is due, attach what is pending."""

    def __init__(self, templates_dir: str, clock: Any = time.monotonic) -> None:
        self.renderer = DocumentRenderer(templates_dir)
        self.clock = clock
        # A broken template fails again until an admin fixes it: try each such render again
        # after RENDER_RETRY_SECONDS, not on every flush (the log says it once per try).
        self._render_failures: dict[tuple[str, str, int], float] = {}

    def __call__(self, runtime: Any) -> dict[str, int]:
        report = RunReport()
        if runtime.mappings is not None:
            self.render_due(runtime, report)
        self.attach_pending(runtime, report)
        return vars(report)

    def render_due(self, runtime: Any, report: RunReport) -> None:
        with runtime.sessions() as session:
            due = due_documents(session, runtime.mappings)
        for item in due:
            self._render_one(runtime, item, report)

    def _render_one(self, runtime: Any, item: DueDocument, report: RunReport) -> None:
        key = (item.request_id, item.document.name, item.seq)
        if self.clock() < self._render_failures.get(key, 0.0):
            return
        with runtime.sessions() as session:
            stored = store.load(session, item.request_id)
            row = _row(session, item.request_id, item.document.name)
            version = (row.version if row is not None else 0) + 1
            names = _names(session, stored) if stored is not None else {}
        if stored is None:
            return
        try:
            rendered = self.renderer.render(
                item.document.template, document_variables(stored, item.document, version, names)
            )
        except DocumentTemplateError as exc:
            self._render_failures[key] = self.clock() + RENDER_RETRY_SECONDS
            report.failed += 1
            log_event(log, logging.ERROR, "document_render_failed", "%s", exc, request_id=item.request_id)
            return
        try:
            with transaction(runtime.sessions) as session:
                row = _row(session, item.request_id, item.document.name)
                if row is not None and row.source_seq >= item.seq:
                    return  # another worker rendered this or a newer state meanwhile
                if row is None:
                    row = RequestDocument(
                        request_id=item.request_id,
                        name=item.document.name,
                        connection=stored.record.connection,
                        object_type=stored.record.object_type,
                        record_id=stored.record.record_id,
                        version=0,
                        crm_attempts=0,
                    )
                    session.add(row)
                row.version += 1
                row.title = item.document.label
                row.source_seq = item.seq
                row.filename = file_name(item.document.name, row.version)
                row.html, row.pdf = rendered.html, rendered.pdf
                row.rendered_at = utcnow()
                row.crm_status, row.crm_error = PENDING, None
                row.crm_attempts, row.crm_next_attempt_at = 0, None
        except IntegrityError:
            if not self._stored_meanwhile(runtime, item):
                raise
            # another worker stored this document's first version between our read and our
            # write (uq_request_document): its render stands; a newer state is due next run
            return
        report.rendered += 1

    @staticmethod
    def _stored_meanwhile(runtime: Any, item: DueDocument) -> bool:
        with runtime.sessions() as session:
            return _row(session, item.request_id, item.document.name) is not None

    def attach_pending(self, runtime: Any, report: RunReport) -> None:
        now = utcnow()
        with runtime.sessions() as session:
            ids = list(
                session.scalars(
                    select(RequestDocument.id)
                    .where(RequestDocument.crm_status == PENDING)
                    .where(
                        or_(
                            RequestDocument.crm_next_attempt_at.is_(None),
                            RequestDocument.crm_next_attempt_at <= now,
                        )
                    )
                    .order_by(RequestDocument.id)
                    .limit(BATCH)
                )
            )
        for document_id in ids:
            self._attach_one(runtime, document_id, report)

    def _attach_one(self, runtime: Any, document_id: int, report: RunReport) -> None:
        with runtime.sessions() as session:
            row = session.get(RequestDocument, document_id)
            if row is None or row.crm_status != PENDING:
                return
            version, replaces = row.version, row.crm_ref
            where = (row.connection, row.object_type, row.record_id)
            upload = FileUpload(row.filename, row.title, row.pdf, document=row.name)
        try:
            ref = runtime.adapter(where[0]).attach_file(where[1], where[2], upload, replaces)
        except (AttachmentsUnsupported, FatalError, RetriableError) as exc:
            self._failed(runtime, document_id, version, exc)
            report.failed += 1
            return
        with transaction(runtime.sessions) as session:
            row = session.get(RequestDocument, document_id)
            if row is None:
                return
            row.crm_ref = ref  # the next version replaces what the CRM holds now
            if row.version == version:
                row.crm_status, row.crm_version, row.crm_error = ATTACHED, version, None
                row.attached_at = utcnow()
        report.attached += 1

    def _failed(self, runtime: Any, document_id: int, version: int, exc: Exception) -> None:
        with transaction(runtime.sessions) as session:
            row = session.get(RequestDocument, document_id)
            if row is None or row.version != version:
                return
            row.crm_error = str(exc)
            if isinstance(exc, RetriableError):
                row.crm_attempts += 1
                wait = min(MAX_BACKOFF, timedelta(seconds=30 * 2 ** min(row.crm_attempts, 10)))
                retry_after = getattr(exc, "retry_after", None)
                if retry_after:
                    wait = max(wait, timedelta(seconds=float(retry_after)))
                row.crm_next_attempt_at = utcnow() + wait
            else:
                row.crm_status = UNSUPPORTED if isinstance(exc, AttachmentsUnsupported) else FAILED
        log_event(
            log,
            logging.WARNING,
            "document_attach_failed",
            "document %s: the CRM did not take it: %s",
            document_id,
            exc,
            document_id=document_id,
        )


def _row(session: Session, request_id: str, name: str) -> RequestDocument | None:
    return session.scalar(
        select(RequestDocument).where(RequestDocument.request_id == request_id, RequestDocument.name == name)
    )


def documents_of(session: Session, request_id: str) -> list[RequestDocument]:
    return list(
        session.scalars(
            select(RequestDocument)
            .where(RequestDocument.request_id == request_id)
            .order_by(RequestDocument.name)
        )
    )
