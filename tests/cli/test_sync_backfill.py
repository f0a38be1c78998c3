"""`crm-approvals sync backfill` against the real sandbox CRM app (HTTP through `responses`
callbacks into its Flask test client): dry run, a full run, --limit and Ctrl-C with a rerun
that does nothing twice, a crash between storing and processing, changed options, errors."""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import StringIO
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import responses
from click.testing import CliRunner, Result
from requests import PreparedRequest
from sqlalchemy import func, select

from connector.cli import main
from connector.clock import utcnow
from connector.commands.progress import JobProgress
from connector.config import Settings
from connector.crm.base import query_record_id
from connector.crm.sandbox import SandboxAdapter
from connector.events import RecordChangeEvent
from connector.runtime import Runtime
from connector.sandbox.app import SandboxConfig, create_sandbox_app
from connector.sandbox.store import Store
from connector.service.backfill import JOB, Backfill
from connector.service.pipeline import Pipeline
from connector.storage.db import transaction
from connector.storage.inbox import accept, process_pending
from connector.storage.migrate import upgrade
from connector.storage.models import (
    DONE,
    ApprovalRequestRow,
    AuditEntry,
    InboxEvent,
    OutboxUpdate,
    RecordSnapshot,
)
from connector.storage.sync_state import SyncCheckpoint, load_checkpoint, save_checkpoint
from connector.wiring import build_runtime
from tests.conftest import SANDBOX_SECRET
from tests.contract.harness_sandbox import API_TOKEN
from tests.sandbox.test_sandbox import forward_to

ROOT = Path(__file__).resolve().parents[2]
SANDBOX = "http://sandbox.test"
QUERY_URL = f"{SANDBOX}/api/v1/objects/deal"
UPDATE_URL = f"{SANDBOX}/api/v1/objects/deal/batch-update"
# The seed deals the shipped example rule (mappings/examples/sandbox-deals.yaml) matches:
# D-1001 amount 185,000; D-1002 credit 64 and 24 months; D-1004 credit 58; D-1006 credit 64.
MATCHING = ["D-1001", "D-1002", "D-1004", "D-1006"]
# Opening a request queues two write-backs per record in the sandbox example: the `submit`
# action (Status = Pending) and the `step` action (where the request waits).
OPENING_WRITES = 2
ALL_DEALS = ["D-1001", "D-1002", "D-1003", "D-1004", "D-1005", "D-1006"]


@dataclass
class Setup:
    env_file: Path
    store: Store
    rsps: responses.RequestsMock
    runtime: Runtime  # for looking at the database the commands wrote
    before_request: list[Callable[[PreparedRequest], None]]  # run before the sandbox answers

    def invoke(self, *args: str) -> Result:
        return CliRunner().invoke(main, ["--env-file", str(self.env_file), *args], catch_exceptions=False)

    def count(self, model: Any) -> int:
        with self.runtime.sessions() as session:
            return int(session.scalar(select(func.count()).select_from(model)) or 0)

    def requests_by_record(self) -> Counter[str]:
        with self.runtime.sessions() as session:
            return Counter(session.scalars(select(ApprovalRequestRow.record_id)))

    def written_records(self) -> list[str]:
        """Record ids of every write-back the sandbox received, in order."""
        return [
            record["id"]
            for call in self.rsps.calls
            if call.request.url == UPDATE_URL
            for record in json.loads(call.request.body)["records"]
        ]

    def query_calls(self) -> list[dict[str, list[str]]]:
        return [
            parse_qs(urlsplit(call.request.url).query)
            for call in self.rsps.calls
            if call.request.method == "GET" and call.request.url.split("?")[0] == QUERY_URL
        ]


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    yield from make_setup(tmp_path, f"sqlite:///{tmp_path}/app.db")


@pytest.fixture
def pg_setup(tmp_path: Path, pg_url: str) -> Iterator[Setup]:
    yield from make_setup(tmp_path, pg_url)


def make_setup(tmp_path: Path, database_url: str) -> Iterator[Setup]:
    mappings = tmp_path / "mappings"
    mappings.mkdir()
    shutil.copy(ROOT / "mappings/examples/sandbox-deals.yaml", mappings)
    env_file = tmp_path / ".env"
    env_file.write_text(
        f"DATABASE_URL={database_url}\nQUEUE_URL=memory://\nMAPPINGS_DIR={mappings}\n"
        f"CRM_CONNECTIONS=sandbox\nSANDBOX_API_TOKEN={API_TOKEN}\nSANDBOX_URL={SANDBOX}\n"
        f"SANDBOX_DB_PATH={tmp_path}/sandbox.db\nSANDBOX_WEBHOOK_SECRET={SANDBOX_SECRET}\n"
    )
    upgrade(database_url)
    settings = Settings.from_env({}, dotenv_path=str(env_file))
    sandbox = create_sandbox_app(SandboxConfig.from_settings(settings), start_delivery=False)
    runtime = Runtime.from_settings(settings)
    hooks: list[Callable[[PreparedRequest], None]] = []
    forward = forward_to(sandbox.test_client())

    def answer(request: PreparedRequest) -> Any:
        for hook in hooks:
            hook(request)
        return forward(request)

    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        for method in (responses.GET, responses.POST):
            rsps.add_callback(method, re.compile(re.escape(SANDBOX) + "/api/.*"), answer)
        yield Setup(env_file, sandbox.extensions["sandbox"].store, rsps, runtime, hooks)
    runtime.close()


@pytest.fixture
def small_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two records per query page, so that six seed deals make three pages."""
    monkeypatch.setattr(SandboxAdapter, "page_size", 2)


def test_dry_run_prints_rule_and_first_step_approvers_per_record_and_writes_nothing(setup: Setup) -> None:
    result = setup.invoke("sync", "backfill", "--dry-run")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "dry run: nothing is written" in out
    assert "D-1001: would open deal-approval: step 1 manager (one): u-mgr-boris" in out
    for deal in MATCHING:
        assert f"{deal}: would open deal-approval" in out
    assert "D-1003: no rule matched" in out and "D-1005: no rule matched" in out
    assert "sandbox/deal: dry run of 6 record(s) (2 unchanged, 4 would open); nothing was written" in out
    for model in (ApprovalRequestRow, OutboxUpdate, InboxEvent, AuditEntry, RecordSnapshot, SyncCheckpoint):
        assert setup.count(model) == 0, model.__tablename__
    assert setup.written_records() == []
    assert setup.store.get("deal", "D-1001")["approval_status"] == "Not submitted"  # type: ignore[index]


def test_backfill_opens_what_the_rules_say_writes_it_back_and_a_rerun_does_nothing(setup: Setup) -> None:
    first = setup.invoke("sync", "backfill")
    assert first.exit_code == 0, first.output
    assert "D-1001: deal-approval: opened" in first.output
    assert "sandbox/deal: finished; 6 record(s) evaluated now" in first.output
    assert "write-back: 4 sent" in first.output
    assert setup.requests_by_record() == Counter(MATCHING)
    assert sorted(setup.written_records()) == MATCHING
    assert setup.store.get("deal", "D-1004")["approval_status"] == "Pending"  # type: ignore[index]
    with setup.runtime.sessions() as session:
        rows = session.scalars(select(InboxEvent)).all()
        assert {(r.change_type, r.origin, r.status) for r in rows} == {("backfill", "backfill", DONE)}
        assert sorted(r.record_id for r in rows) == ALL_DEALS

    again = setup.invoke("sync", "backfill")
    assert again.exit_code == 0, again.output
    assert "nothing to do. Add --restart to evaluate every record again." in again.output
    assert setup.requests_by_record() == Counter(MATCHING)
    assert sorted(setup.written_records()) == MATCHING  # no second write-back
    assert setup.count(OutboxUpdate) == OPENING_WRITES * len(MATCHING)


def test_restart_evaluates_again_and_leaves_records_with_an_active_request_alone(setup: Setup) -> None:
    setup.invoke("sync", "backfill")
    outbox_before = setup.count(OutboxUpdate)
    restarted = setup.invoke("sync", "backfill", "--restart")
    assert restarted.exit_code == 0, restarted.output
    assert "D-1001: deal-approval: already pending as" in restarted.output
    assert setup.requests_by_record() == Counter(MATCHING)
    assert setup.count(OutboxUpdate) == outbox_before
    assert setup.count(InboxEvent) == 2 * len(ALL_DEALS)  # a new run: new dedupe keys


def test_limit_then_rerun_finishes_without_doing_anything_twice(setup: Setup, small_pages: None) -> None:
    first = setup.invoke("sync", "backfill", "--limit", "3")
    assert first.exit_code == 0, first.output
    assert "stopped at --limit; run again to continue; 3 record(s) evaluated now" in first.output
    with setup.runtime.sessions() as session:
        checkpoint = load_checkpoint(session, JOB, "sandbox", "deal")
    assert checkpoint is not None and checkpoint.records_done == 3 and checkpoint.cursor is not None

    second = setup.invoke("sync", "backfill")
    assert second.exit_code == 0, second.output
    assert "sandbox/deal: finished" in second.output and "continuing the run started" in second.output
    assert "this run so far: 6 (6 done)" in second.output
    assert setup.requests_by_record() == Counter(MATCHING)  # each request opened once
    assert Counter(setup.written_records()) == Counter(MATCHING)  # each written back once
    with setup.runtime.sessions() as session:
        outbox = session.scalars(select(OutboxUpdate.record_id)).all()
        keys = session.scalars(select(InboxEvent.dedupe_key)).all()
    assert Counter(outbox) == Counter(MATCHING * OPENING_WRITES)  # no duplicate outbox writes
    assert len(keys) == len(set(keys)) == len(ALL_DEALS)


def test_ctrl_c_mid_run_then_rerun_continues_from_the_saved_page(setup: Setup, small_pages: None) -> None:
    pages_served = 0

    def interrupt_on_second_page(request: PreparedRequest) -> None:
        nonlocal pages_served
        if request.method == "GET" and (request.url or "").split("?")[0] == QUERY_URL:
            pages_served += 1
            if pages_served == 2:
                raise KeyboardInterrupt  # as Ctrl-C does while the page is being read

    setup.before_request.append(interrupt_on_second_page)
    interrupted = setup.invoke("sync", "backfill")
    assert interrupted.exit_code == 130
    assert "interrupted during sandbox/deal; run the same command again to continue" in interrupted.output
    with setup.runtime.sessions() as session:
        checkpoint = load_checkpoint(session, JOB, "sandbox", "deal")
    assert checkpoint is not None and checkpoint.records_done == 2 and checkpoint.finished_at is None
    setup.before_request.clear()
    calls_before = len(setup.query_calls())

    rerun = setup.invoke("sync", "backfill")
    assert rerun.exit_code == 0, rerun.output
    assert "sandbox/deal: finished" in rerun.output
    assert setup.query_calls()[calls_before]["cursor"] == [checkpoint.cursor]  # from the saved page on
    assert setup.requests_by_record() == Counter(MATCHING)
    assert Counter(setup.written_records()) == Counter(MATCHING)


def test_events_a_crash_left_stored_but_unprocessed_are_processed_once(
    setup: Setup, small_pages: None
) -> None:
    setup.invoke("sync", "backfill", "--limit", "1")
    with setup.runtime.sessions() as session:
        checkpoint = load_checkpoint(session, JOB, "sandbox", "deal")
    assert checkpoint is not None
    # What a crash between storing a page's events and processing them leaves: a pending event.
    runtime = build_runtime(setup.runtime.settings)
    assert isinstance(runtime.processor, Pipeline)
    job = Backfill(runtime, runtime.processor, "sandbox", "deal")
    [record] = [r for r in runtime.adapter("sandbox").query("deal", ["amount"]) if r["id"] == "D-1002"]
    assert accept(runtime.sessions, [job.event(checkpoint.run_id, record)]).accepted == 1
    runtime.close()

    rerun = setup.invoke("sync", "backfill")
    assert rerun.exit_code == 0, rerun.output
    assert "D-1002: deal-approval: opened" in rerun.output
    assert setup.requests_by_record() == Counter(MATCHING)
    with setup.runtime.sessions() as session:
        rows = session.scalars(select(InboxEvent).where(InboxEvent.record_id == "D-1002")).all()
    assert [(r.status, r.attempts) for r in rows] == [(DONE, 1)]
    assert Counter(setup.written_records()) == Counter(MATCHING)


def test_since_selects_by_modification_time(setup: Setup) -> None:
    result = setup.invoke("sync", "backfill", "--since", "2999-01-01", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "dry run of 0 record(s)" in result.output
    assert setup.query_calls()[0]["modified_since"] == ["2999-01-01T00:00:00+00:00"]


def test_other_options_than_the_run_in_progress_are_refused(setup: Setup, small_pages: None) -> None:
    setup.invoke("sync", "backfill", "--limit", "1")
    refused = CliRunner().invoke(
        main, ["--env-file", str(setup.env_file), "sync", "backfill", "--since", "2026-01-01"]
    )
    assert refused.exit_code == 1
    assert "a backfill of sandbox/deal with no --since is in progress (1 record(s) done" in refused.output
    assert "rerun with the same options to finish it, or add --restart" in refused.output
    assert setup.count(InboxEvent) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "last week"], "'last week' is neither a date (YYYY-MM-DD) nor an ISO 8601 time"),
        (["--dry-run", "--restart"], "--dry-run saves no position, so there is nothing to --restart"),
        (["--limit", "0"], "0 is not in the range x>=1"),
        (["--object", "invoice"], "no mapping file covers sandbox/invoice"),
        (["--connection", "nope"], "unknown connection 'nope'; configured: sandbox"),
    ],
)
def test_bad_options_get_a_clear_error_and_nothing_is_written(
    setup: Setup, args: list[str], message: str
) -> None:
    result = CliRunner().invoke(main, ["--env-file", str(setup.env_file), "sync", "backfill", *args])
    assert result.exit_code in (1, 2)
    assert message in result.output and "Traceback" not in result.output
    assert setup.count(InboxEvent) == 0 and setup.count(SyncCheckpoint) == 0


def test_several_connections_need_connection_named(setup: Setup) -> None:
    with setup.env_file.open("a") as env:
        env.write("CRM_CONNECTIONS=sandbox,other=sandbox\n")
    result = CliRunner().invoke(main, ["--env-file", str(setup.env_file), "sync", "backfill"])
    assert result.exit_code == 2
    assert "several connections are configured (other, sandbox); name one with --connection" in result.output


def test_progress_is_a_rich_bar_on_a_terminal_and_plain_lines_otherwise() -> None:
    terminal = StringIO()
    with JobProgress(interactive=True, file=terminal) as progress:
        progress.task("backfill sandbox/deal", total=3)
        progress.line("  D-1001: opened")
        progress.advance(2)
    shown = terminal.getvalue()
    assert "\x1b[" in shown  # styled for a terminal
    assert "D-1001: opened" in shown and "2/3" in shown

    piped = StringIO()
    with JobProgress(interactive=False, file=piped) as progress:
        progress.task("backfill sandbox/deal", total=3)
        progress.line("  D-1001: opened")
        progress.advance(2)
    assert piped.getvalue() == "backfill sandbox/deal\n  D-1001: opened\n"


def test_a_record_seen_before_is_judged_again_after_a_new_rule(setup: Setup, tmp_path: Path) -> None:
    """The point of a backfill: a webhook already showed D-1003 (nothing matched then, and its
    values have not changed since); after the threshold is lowered the backfill opens it."""
    runtime = build_runtime(setup.runtime.settings)
    pipeline = runtime.processor
    assert isinstance(pipeline, Pipeline)
    values = runtime.adapter("sandbox").get_record("deal", "D-1003", ["amount", "stage"])
    event = RecordChangeEvent(
        source="sandbox",
        connection="sandbox",
        object_type="deal",
        record_id="D-1003",
        event_id="evt-1",
        occurred_at=utcnow(),
        dedupe_key="sandbox:evt-1",
        changed_fields=("amount",),
        values=values,
    )
    accept(runtime.sessions, [event])
    assert process_pending(runtime.sessions, pipeline).done == 1
    runtime.close()
    assert setup.requests_by_record() == Counter()

    mapping = tmp_path / "mappings" / "sandbox-deals.yaml"
    mapping.write_text(mapping.read_text().replace("- amount: {gt: 100000}", "- amount: {gt: 10000}"))
    result = setup.invoke("sync", "backfill", "--object", "deal")
    assert result.exit_code == 0, result.output
    assert "D-1003: deal-approval: opened" in result.output
    assert setup.requests_by_record()["D-1003"] == 1


def test_a_saved_position_the_crm_no_longer_accepts_falls_back_to_the_first_page(
    setup: Setup, small_pages: None, caplog: pytest.LogCaptureFixture
) -> None:
    """Like an expired Salesforce query locator: the sandbox refuses the cursor (400 BAD_CURSOR)."""
    setup.invoke("sync", "backfill", "--limit", "2")
    with setup.runtime.sessions() as session:
        checkpoint = load_checkpoint(session, JOB, "sandbox", "deal")
    assert checkpoint is not None and checkpoint.cursor is not None
    checkpoint.cursor = "bm90IGEgY3Vyc29y"
    with transaction(setup.runtime.sessions) as session:
        save_checkpoint(session, checkpoint)

    logger = logging.getLogger("connector.service.backfill")
    logger.addHandler(caplog.handler)  # the command replaces the root logger's handlers
    try:
        rerun = setup.invoke("sync", "backfill")
    finally:
        logger.removeHandler(caplog.handler)
    assert rerun.exit_code == 0, rerun.output
    assert "the saved position no longer works" in caplog.text and "BAD_CURSOR" in caplog.text
    assert "this run so far: 6 (6 done)" in rerun.output
    assert setup.requests_by_record() == Counter(MATCHING)
    assert Counter(setup.written_records()) == Counter(MATCHING)


@pytest.mark.xdist_group("services")
def test_dry_run_then_interrupted_run_then_rerun_on_postgres(pg_setup: Setup, small_pages: None) -> None:
    dry = pg_setup.invoke("sync", "backfill", "--dry-run")
    assert "dry run of 6 record(s) (2 unchanged, 4 would open)" in dry.output, dry.output
    assert pg_setup.count(ApprovalRequestRow) == 0 and pg_setup.count(AuditEntry) == 0
    assert pg_setup.count(RecordSnapshot) == 0

    assert "stopped at --limit" in pg_setup.invoke("sync", "backfill", "--limit", "3").output
    rerun = pg_setup.invoke("sync", "backfill")
    assert "this run so far: 6 (6 done)" in rerun.output, rerun.output
    assert pg_setup.requests_by_record() == Counter(MATCHING)
    assert Counter(pg_setup.written_records()) == Counter(MATCHING)
    assert "nothing to do" in pg_setup.invoke("sync", "backfill").output


@pytest.mark.parametrize(
    ("record", "expected"),
    [({"Id": "006A"}, "006A"), ({"ID": 42, "TITLE": "x"}, "42"), ({"id": "D-1"}, "D-1")],
)
def test_the_id_of_a_queried_record_in_each_crms_letter_case(record: dict[str, Any], expected: str) -> None:
    assert query_record_id(record) == expected


def test_a_queried_record_without_id_is_an_error() -> None:
    with pytest.raises(KeyError, match="a queried record carries no id"):
        query_record_id({"Name": "x"})
