"""`crm-approvals sync reconcile` against the real sandbox CRM app (HTTP through `responses`
callbacks into its Flask test client, as in test_sync_backfill): a record whose approval
fields someone changed in the CRM is reported and repaired once; --dry-run writes nothing;
Ctrl-C and a rerun, or a page done twice after a crash, repeat nothing."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from requests import PreparedRequest
from sqlalchemy import select

from connector.crm.sandbox import SandboxAdapter
from connector.sandbox.store import ORIGIN_USER
from connector.service.drift import RECONCILE_JOB, reconcile_records
from connector.storage.db import transaction
from connector.storage.models import AuditEntry, OutboxUpdate
from connector.storage.sync_state import SyncCheckpoint, load_checkpoint, new_checkpoint, save_checkpoint
from tests.cli.test_sync_backfill import MATCHING, SANDBOX, Setup, make_setup

READ_URL = f"{SANDBOX}/api/v1/objects/deal/batch-read"
# What the backfill of the sandbox example writes on opening: Status = Pending, and where it waits.
OURS = "Pending"


@pytest.fixture
def opened(tmp_path: Path) -> Iterator[Setup]:
    """The sandbox with the example rule's four requests opened and written back by a backfill."""
    for setup in make_setup(tmp_path, f"sqlite:///{tmp_path}/app.db"):
        result = setup.invoke("sync", "backfill")
        assert result.exit_code == 0, result.output
        setup.rsps.calls.reset()
        yield setup


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two records per read call, so that the four written records make two batches."""
    monkeypatch.setattr(SandboxAdapter, "batch_limit", 2)


def drift(setup: Setup, record_id: str, status: str = "Approved") -> None:
    """Someone edits the approval status by hand in the CRM."""
    setup.store.update("deal", record_id, {"approval_status": status}, ORIGIN_USER)


def status(setup: Setup, record_id: str) -> str:
    record = setup.store.get("deal", record_id)
    assert record is not None
    return str(record["approval_status"])


def read_calls(setup: Setup) -> list[list[str]]:
    return [json.loads(c.request.body)["ids"] for c in setup.rsps.calls if c.request.url == READ_URL]


def written(setup: Setup) -> list[str]:
    return [
        record["id"]
        for call in setup.rsps.calls
        if call.request.url == f"{SANDBOX}/api/v1/objects/deal/batch-update"
        for record in json.loads(call.request.body)["records"]
    ]


def repairs(setup: Setup) -> Counter[str]:
    with setup.runtime.sessions() as session:
        rows = session.scalars(select(AuditEntry).where(AuditEntry.kind == "drift_repaired")).all()
        return Counter(row.record_id for row in rows)


def test_a_drifted_record_is_reported_and_repaired_once(opened: Setup) -> None:
    drift(opened, "D-1004")
    result = opened.invoke("sync", "reconcile")
    assert result.exit_code == 0, result.output
    assert "D-1004 approval_status: CRM has 'Approved', ours is 'Pending'; re-queued ours" in result.output
    assert "sandbox/deal: finished; 4 record(s) compared now, 1 differ, 1 re-queued" in result.output
    assert "write-back: 1 sent" in result.output
    assert status(opened, "D-1004") == OURS
    assert written(opened) == ["D-1004"]
    assert read_calls(opened) == [sorted(MATCHING)]  # one read call for the batch
    assert repairs(opened) == Counter({"D-1004": 1})

    again = opened.invoke("sync", "reconcile")  # a finished run: a new one compares again
    assert again.exit_code == 0, again.output
    assert "4 record(s) compared now, 0 differ, 0 re-queued" in again.output
    assert written(opened) == ["D-1004"]
    assert repairs(opened) == Counter({"D-1004": 1})


def test_dry_run_prints_the_differences_and_writes_nothing(opened: Setup) -> None:
    drift(opened, "D-1001", "Rejected")
    with opened.runtime.sessions() as session:
        outbox_before = len(session.scalars(select(OutboxUpdate.id)).all())
    result = opened.invoke("sync", "reconcile", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "dry run: nothing is written" in result.output
    out = result.output
    assert "D-1001 approval_status: CRM has 'Rejected', ours is 'Pending'; would re-queue ours" in out
    assert "sandbox/deal: dry run compared 4 record(s), 1 differ from ours; nothing was written" in out
    assert status(opened, "D-1001") == "Rejected"
    assert written(opened) == []
    assert repairs(opened) == Counter()
    with opened.runtime.sessions() as session:
        assert len(session.scalars(select(OutboxUpdate.id)).all()) == outbox_before
        assert session.scalars(select(SyncCheckpoint).where(SyncCheckpoint.job == RECONCILE_JOB)).all() == []


def test_ctrl_c_then_rerun_continues_and_repairs_nothing_twice(opened: Setup, small_batches: None) -> None:
    drift(opened, "D-1001")
    drift(opened, "D-1006")
    reads = 0

    def interrupt_on_second_read(request: PreparedRequest) -> None:
        nonlocal reads
        if request.url == READ_URL:
            reads += 1
            if reads == 2:
                raise KeyboardInterrupt  # as Ctrl-C does while the batch is being read

    opened.before_request.append(interrupt_on_second_read)
    interrupted = opened.invoke("sync", "reconcile")
    assert interrupted.exit_code == 130
    assert "interrupted during sandbox/deal; run the same command again to continue" in interrupted.output
    repaired = "D-1001 approval_status: CRM has 'Approved', ours is 'Pending'; re-queued ours"
    assert repaired in interrupted.output
    with opened.runtime.sessions() as session:
        checkpoint = load_checkpoint(session, RECONCILE_JOB, "sandbox", "deal")
    assert checkpoint is not None and checkpoint.records_done == 2 and checkpoint.cursor == "D-1002"
    assert checkpoint.finished_at is None
    opened.before_request.clear()
    opened.rsps.calls.reset()

    rerun = opened.invoke("sync", "reconcile")
    assert rerun.exit_code == 0, rerun.output
    assert "2 record(s) compared now, continuing the run started" in rerun.output
    assert "this run in all: 4 compared, 2 differ, 2 re-queued" in rerun.output
    assert "D-1001 approval_status" not in rerun.output  # its batch was done before Ctrl-C
    assert read_calls(opened) == [["D-1004", "D-1006"]]  # from the saved batch on
    assert sorted(written(opened)) == ["D-1001", "D-1006"]  # the queued repair goes out once
    assert status(opened, "D-1001") == OURS and status(opened, "D-1006") == OURS
    assert repairs(opened) == Counter({"D-1001": 1, "D-1006": 1})


def test_a_batch_done_again_after_a_crash_repeats_nothing(opened: Setup) -> None:
    drift(opened, "D-1002")
    adapter = opened.runtime.adapter("sandbox")
    ids = ["D-1001", "D-1002"]
    first = reconcile_records(opened.runtime.sessions, adapter, "sandbox", "deal", ids, since=None)
    assert [(d.record_id, d.found, d.queued) for d in first] == [
        ("D-1002", {"approval_status": "Approved"}, True)
    ]
    # A crash now, before the position was saved: the rerun compares the same batch again.
    again = reconcile_records(opened.runtime.sessions, adapter, "sandbox", "deal", ids, since=None)
    assert again == []  # the queued repair is the outbox's now
    assert repairs(opened) == Counter({"D-1002": 1})
    rerun = opened.invoke("sync", "reconcile")
    assert rerun.exit_code == 0, rerun.output
    assert "0 differ" in rerun.output and "write-back: 1 sent" in rerun.output
    assert written(opened) == ["D-1002"]
    assert status(opened, "D-1002") == OURS


def test_a_rerun_with_other_options_than_the_unfinished_run_is_refused(
    opened: Setup, small_batches: None
) -> None:
    with transaction(opened.runtime.sessions) as session:
        unfinished = new_checkpoint(RECONCILE_JOB, "sandbox", "deal", {"since": None})
        unfinished.cursor = "D-1002"
        save_checkpoint(session, unfinished)
    refused = opened.invoke("sync", "reconcile", "--since", "2026-01-01")
    assert refused.exit_code == 1
    assert "repeat its options to continue it, or add --restart to start over" in refused.output
    restarted = opened.invoke("sync", "reconcile", "--since", "2026-01-01", "--restart")
    assert restarted.exit_code == 0, restarted.output
    assert "4 record(s) compared now" in restarted.output


def test_since_limits_reconcile_to_records_written_since_then(opened: Setup) -> None:
    result = opened.invoke("sync", "reconcile", "--dry-run", "--since", "2999-01-01")
    assert result.exit_code == 0, result.output
    assert "dry run compared 0 record(s)" in result.output
    assert read_calls(opened) == []


def test_bad_options_get_a_clear_error(opened: Setup) -> None:
    bad_date = opened.invoke("sync", "reconcile", "--since", "yesterday")
    assert bad_date.exit_code == 2 and "neither a date (YYYY-MM-DD)" in bad_date.output
    both = opened.invoke("sync", "reconcile", "--dry-run", "--restart")
    assert both.exit_code == 2 and "nothing to --restart" in both.output
    unknown = opened.invoke("sync", "reconcile", "--connection", "nope")
    assert unknown.exit_code != 0 and "nope" in unknown.output
