"""`crm-approvals sync backfill`: judge the records already in a CRM against the mappings, as
if each had just been created, and open what the rules say (docs/operations.md#backfill).

Each record becomes a synthetic RecordChangeEvent (change type `backfill`) whose dedupe key
names the record and the backfill run, and goes through the worker's own path: the inbox
(`accept`, then `process_one` with the Pipeline). So a record that already has an active or
still valid approval is left alone exactly as for a webhook, a record is evaluated at most
once per run whatever happens, and failures are retried or dead-lettered like any event.

The run and the cursor of the page to fetch next are saved in `sync_checkpoints` after every
page: rerun after Ctrl-C or a crash, the job continues there; records of a page it had
already done are recognised by their dedupe keys and skipped. `--restart` starts a new run.

A dry run reads the CRM and runs the same Pipeline.apply inside a transaction that is
always rolled back, so it reports exactly what processing would do and writes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select

from connector.clock import utcnow
from connector.crm.base import CRMAdapter, QueryPage, query_record_id
from connector.crm.errors import FatalError as CRMFatalError
from connector.errors import FatalError
from connector.events import BACKFILL, RecordChangeEvent
from connector.runtime import Runtime
from connector.service.pipeline import Pipeline
from connector.storage import sync_state
from connector.storage.db import transaction
from connector.storage.inbox import accept, describe, process_one
from connector.storage.models import DEAD, DONE, PENDING, ApprovalRequestRow, ApprovalStepRow, InboxEvent
from connector.storage.outbox import FlushReport, flush
from connector.storage.sync_state import Checkpoint

log = logging.getLogger(__name__)

JOB = "backfill"


class BackfillRefused(FatalError):
    """The backfill cannot run as asked; the message says what to change."""

    code = "backfill_refused"


@dataclass(frozen=True)
class RecordOutcome:
    record_id: str
    # done | dead | retried | skipped (done earlier in this run) | busy (the worker has it)
    # dry runs: would_open | unchanged | would_fail
    outcome: str
    summary: str  # what processing did (the inbox row's result), or would do


@dataclass
class BackfillResult:
    connection: str
    object_type: str
    checkpoint: Checkpoint | None  # None for a dry run
    evaluated: int = 0  # records evaluated by this invocation
    counts: dict[str, int] = field(default_factory=dict)  # outcome -> records, this invocation
    finished: bool = False  # every page done (False: stopped at --limit)
    already_finished: bool = False  # nothing to do: the run had finished before
    resumed: bool = False
    write_back: FlushReport | None = None

    def count(self, outcome: RecordOutcome) -> None:
        self.evaluated += 1
        self.counts[outcome.outcome] = self.counts.get(outcome.outcome, 0) + 1


RecordCallback = Callable[[RecordOutcome], None]


class Backfill:
    """One backfill of one connection's object. `limit` caps the records this invocation evaluates."""

    def __init__(
        self,
        runtime: Runtime,
        pipeline: Pipeline,
        connection: str,
        object_type: str,
        *,
        since: datetime | None = None,
        limit: int | None = None,
        on_record: RecordCallback = lambda _outcome: None,
    ) -> None:
        self.runtime = runtime
        self.pipeline = pipeline
        self.connection = connection
        self.object_type = object_type
        self.since = since
        self.limit = limit
        self.on_record = on_record
        self.kind = runtime.settings.connection(connection).kind

    @property
    def options(self) -> dict[str, Any]:
        """What selects the records; a saved cursor is only valid for the same selection."""
        return {"since": self.since.isoformat() if self.since else None}

    def fields(self) -> list[str]:
        self.pipeline.refresh_mappings()
        specs = self.pipeline.mappings.for_object(self.connection, self.object_type)
        if not specs:
            raise BackfillRefused(
                f"no mapping file covers {self.connection}/{self.object_type} in "
                f"{self.pipeline.mappings.directory}; nothing would be evaluated",
                hint="check --connection and --object against the mapping files (crm-approvals validate)",
            )
        return sorted({name for spec in specs for name in spec.api_fields()})

    # --- the real run ------------------------------------------------------------------

    def run(self, *, restart: bool = False) -> BackfillResult:
        fields = self.fields()
        checkpoint = self._checkpoint(restart)
        result = BackfillResult(self.connection, self.object_type, checkpoint, resumed=checkpoint.resumed)
        if checkpoint.finished_at is not None:
            result.already_finished = result.finished = True
            return result
        adapter = self.runtime.adapter(self.connection)
        for page in self._pages(adapter, fields, checkpoint.cursor):
            checkpoint.cursor = page.cursor
            done_all = self._run_page(page, checkpoint, result)
            if not done_all:  # stopped at --limit inside this page: rerun fetches it again
                self._save(checkpoint)
                break
            checkpoint.cursor = page.next_cursor
            if page.next_cursor is None:
                checkpoint.finished_at = utcnow()
            self._save(checkpoint)
            result.write_back = self._flush(result.write_back)
            if self._limit_reached(result):
                break
        result.finished = checkpoint.finished_at is not None
        result.write_back = self._flush(result.write_back)
        return result

    def _checkpoint(self, restart: bool) -> Checkpoint:
        with self.runtime.sessions() as session:
            saved = sync_state.load_checkpoint(session, JOB, self.connection, self.object_type)
        if saved is None or restart:
            return sync_state.new_checkpoint(JOB, self.connection, self.object_type, self.options)
        if saved.finished_at is None and saved.options != self.options:
            was = saved.options.get("since") or "no --since"
            raise BackfillRefused(
                f"a backfill of {self.connection}/{self.object_type} with {was} is in progress "
                f"({saved.records_done} record(s) done since {saved.started_at:%Y-%m-%d %H:%M} UTC); "
                "its saved position belongs to that selection",
                hint="rerun with the same options to finish it, or add --restart to start over",
            )
        if saved.finished_at is not None and saved.options != self.options:
            return sync_state.new_checkpoint(JOB, self.connection, self.object_type, self.options)
        return saved

    def _pages(self, adapter: CRMAdapter, fields: Sequence[str], cursor: Any) -> Iterator[QueryPage]:
        pages = adapter.query_pages(self.object_type, fields, modified_since=self.since, cursor=cursor)
        if cursor is None:
            yield from pages
            return
        try:
            first = next(pages)
        except CRMFatalError as exc:  # e.g. a Salesforce query locator that expired meanwhile
            log.warning(
                "backfill %s/%s: the saved position no longer works (%s); scanning again from the first "
                "page of the same run, records already done are skipped",
                self.connection,
                self.object_type,
                exc,
            )
            yield from adapter.query_pages(self.object_type, fields, modified_since=self.since)
            return
        yield first
        yield from pages

    def _run_page(self, page: QueryPage, checkpoint: Checkpoint, result: BackfillResult) -> bool:
        """Evaluate the page's records not yet done in this run; False when --limit stopped it."""
        events = [self.event(checkpoint.run_id, record) for record in page.records]
        statuses = self._inbox_statuses([e.dedupe_key for e in events])
        todo: list[RecordChangeEvent] = []
        stopped = False
        for event in events:
            status = statuses.get(event.dedupe_key)
            if status is not None and status[0] != PENDING:
                self.on_record(RecordOutcome(event.record_id, "skipped", "already evaluated in this run"))
                continue
            if self._limit_reached(result, extra=len(todo)):
                stopped = True
                break
            todo.append(event)
        accept(self.runtime.sessions, [e for e in todo if e.dedupe_key not in statuses])
        stored = self._inbox_statuses([e.dedupe_key for e in todo])
        for event in todo:
            outcome = self._process(event, stored[event.dedupe_key][1])
            checkpoint.records_done += 1
            checkpoint.count(outcome.outcome)
            result.count(outcome)
            self.on_record(outcome)
        return not stopped

    def _process(self, event: RecordChangeEvent, event_id: int) -> RecordOutcome:
        settings = self.runtime.settings
        process_one(self.runtime.sessions, self.pipeline, event_id, max_attempts=settings.inbox_max_attempts)
        with self.runtime.sessions() as session:
            row = session.get(InboxEvent, event_id)
            assert row is not None
            status, summary, error = row.status, row.result, row.last_error
        if status == DONE:
            return RecordOutcome(event.record_id, "done", summary or "")
        if status == DEAD:
            return RecordOutcome(event.record_id, "dead", f"dead-lettered: {error}")
        if row.attempts:
            return RecordOutcome(event.record_id, "retried", f"will be retried by the worker: {error}")
        return RecordOutcome(event.record_id, "busy", "being processed by the worker")

    def _inbox_statuses(self, keys: Sequence[str]) -> dict[str, tuple[str, int]]:
        if not keys:
            return {}
        with self.runtime.sessions() as session:
            rows = session.execute(
                select(InboxEvent.dedupe_key, InboxEvent.status, InboxEvent.id).where(
                    InboxEvent.dedupe_key.in_(list(keys))
                )
            ).all()
        return {key: (status, event_id) for key, status, event_id in rows}

    def _save(self, checkpoint: Checkpoint) -> None:
        with transaction(self.runtime.sessions) as session:
            sync_state.save_checkpoint(session, checkpoint)

    def _flush(self, total: FlushReport | None) -> FlushReport:
        """Send the write-back of what the page opened (Status = Pending ...) now, not at the next sweep."""
        settings = self.runtime.settings
        report = flush(
            self.runtime.sessions,
            self.runtime.adapter,
            lease_seconds=settings.outbox_lease_seconds,
            max_attempts=settings.outbox_max_attempts,
        )
        if total is None:
            return report
        for name, value in vars(report).items():
            setattr(total, name, getattr(total, name) + value)
        return total

    def _limit_reached(self, result: BackfillResult, extra: int = 0) -> bool:
        return self.limit is not None and result.evaluated + extra >= self.limit

    def event(self, run_id: str, record: dict[str, Any]) -> RecordChangeEvent:
        """The synthetic event for one queried record in one run."""
        record_id = query_record_id(record)
        return RecordChangeEvent(
            source=self.kind,
            connection=self.connection,
            object_type=self.object_type,
            record_id=record_id,
            event_id=f"backfill:{run_id}",
            occurred_at=utcnow(),
            dedupe_key=f"{self.connection}:backfill:{run_id}:{self.object_type}:{record_id}",
            change_type=BACKFILL,
            values=dict(record),
            origin="backfill",
        )

    # --- the dry run -------------------------------------------------------------------

    def preview(self) -> BackfillResult:
        """What a run would do, record by record, from the first page; writes nothing."""
        fields = self.fields()
        result = BackfillResult(self.connection, self.object_type, None)
        adapter = self.runtime.adapter(self.connection)
        for page in adapter.query_pages(self.object_type, fields, modified_since=self.since):
            for record in page.records:
                if self._limit_reached(result):
                    return result
                outcome = self.preview_record(self.event("dry-run", record))
                result.count(outcome)
                self.on_record(outcome)
        result.finished = True
        return result

    def preview_record(self, event: RecordChangeEvent) -> RecordOutcome:
        try:
            prepared = self.pipeline.prepare(event)
        except FatalError as exc:
            return _would_fail(event, exc)
        session = self.runtime.sessions()
        session.begin()
        try:
            before = set(session.scalars(_requests_of(event, ApprovalRequestRow.id)))
            try:
                summary = self.pipeline.apply(session, event, prepared)
            except FatalError as exc:
                return _would_fail(event, exc)
            rows = session.scalars(_requests_of(event, ApprovalRequestRow))
            opened = [row for row in rows if row.id not in before]
            if not opened:
                return RecordOutcome(event.record_id, "unchanged", summary)
            lines = [f"would open {row.rule_name}: {_first_step(session, row)}" for row in opened]
            return RecordOutcome(event.record_id, "would_open", "; ".join(lines))
        finally:
            session.rollback()  # a dry run: nothing of it may stay
            session.close()


def _would_fail(event: RecordChangeEvent, exc: FatalError) -> RecordOutcome:
    return RecordOutcome(event.record_id, "would_fail", f"would be dead-lettered: {describe(exc)}")


def _requests_of(event: RecordChangeEvent, what: Any) -> Any:
    return (
        select(what)
        .where(ApprovalRequestRow.connection == event.connection)
        .where(ApprovalRequestRow.object_type == event.object_type)
        .where(ApprovalRequestRow.record_id == event.record_id)
    )


def _first_step(session: Any, request: ApprovalRequestRow) -> str:
    if request.current_step is None:
        return f"{request.status} at once (no step applies)"
    step = session.scalar(
        select(ApprovalStepRow)
        .where(ApprovalStepRow.request_id == request.id, ApprovalStepRow.index == request.current_step)
        .order_by(ApprovalStepRow.round.desc())
        .limit(1)
    )
    assert step is not None
    return f"step {step.index + 1} {step.name} ({step.mode}): {', '.join(step.approvers)}"
