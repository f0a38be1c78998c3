"""Logs: LOG_FORMAT=json with stable keys and secrets masked, the sweep as one short line
(DEBUG when idle), a WARNING per CRM retry without secrets, one INFO line per business
event and only once its transaction committed."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event as sa_event
from sqlalchemy import select
from sqlalchemy.orm import Session

from connector.config import ConfigError, Settings, parse_connections
from connector.crm.errors import RetriableError
from connector.crm.retry import RetryPolicy
from connector.logs import configure_logging, log_event, log_sweep, sweep_summary
from connector.rules import MappingSet
from connector.runtime import Runtime
from connector.service.pipeline import Pipeline
from connector.storage.db import after_commit, transaction
from connector.storage.inbox import accept, process_pending
from connector.storage.models import ApprovalRequestRow
from connector.worker import Tasks, make_huey
from tests.fakes import MemoryCRM
from tests.processors import CountingProcessor
from tests.storage.test_inbox import event

DATA = Path(__file__).parent / "data" / "pipeline"
DEAL = {
    "amount": 150000,
    "stage": "negotiation",
    "owner_id": "u-rep",
    "owner_manager_id": "u-mgr",
    "company.credit_score": 80,
    "approval_status": None,
    "approval_expires_on": None,
    "approval_comment": None,
}


@pytest.fixture
def root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_have_stable_keys_event_fields_and_masked_secrets(
    root_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = "sfdc-password-123456"
    settings = Settings(
        log_format="json",
        connections=parse_connections({"CRM_CONNECTIONS": "salesforce", "SALESFORCE_PASSWORD": secret}),
    )
    configure_logging(settings)
    logger = logging.getLogger("crm.test")
    logger.info("plain line with %s", secret)
    log_event(
        logger, logging.WARNING, "dead_letter", "refused: %s", "x", record="sf:Opportunity:1", note=secret
    )
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [set(line) for line in lines] == [
        {"time", "level", "logger", "message"},
        {"time", "level", "logger", "message", "event", "record", "note"},
        {"time", "level", "logger", "message", "exception"},
    ]
    plain, evented, failed = lines
    assert plain["message"] == "plain line with ***" and plain["level"] == "INFO"
    assert (evented["event"], evented["record"], evented["note"]) == (
        "dead_letter",
        "sf:Opportunity:1",
        "***",
    )
    assert evented["logger"] == "crm.test" and evented["time"].endswith("+00:00")
    assert "ValueError: boom" in failed["exception"]


def test_text_format_is_the_default_and_a_bad_format_is_refused(
    root_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging(Settings())
    log_event(logging.getLogger("crm.test"), logging.INFO, "request_opened", "request r1 opened", rule="x")
    assert capsys.readouterr().err.rstrip().endswith("INFO crm.test: request r1 opened")
    assert Settings.from_env({"LOG_FORMAT": "JSON"}, dotenv_path=None).log_format == "json"
    with pytest.raises(ConfigError, match="LOG_FORMAT must be one of text, json, got 'yaml'"):
        Settings.from_env({"LOG_FORMAT": "yaml"}, dotenv_path=None)


def test_sweep_is_one_short_line_or_debug_when_idle(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("crm.sweep")
    with caplog.at_level(logging.DEBUG, logger="crm.sweep"):
        log_sweep(
            logger,
            {
                "inbox": {"done": 0, "retried": 0, "dead": 0},
                "outbox": {"sent_records": 0, "done": 0, "notifications": {"sent": 0, "dead": 0}},
                "people": {"notifications": {"sent": 0}, "warned": 0},
                "api_usage": {"salesforce": "1200/15000 used today"},
                "reload_mappings": None,
                "expire": [],
            },
        )
        log_sweep(
            logger,
            {
                "inbox": {"done": 3, "retried": 1, "dead": 0},
                "outbox": {"sent_records": 2, "done": 2, "dead": 0},
                "api_usage": {"salesforce": "1200/15000 used today"},
                "expire": ["sandbox:deal:D-1 (deal-approval, request r1)"],
            },
        )
    idle, busy = caplog.records
    assert idle.levelno == logging.DEBUG and idle.getMessage().startswith("sweep: nothing to do")
    assert busy.levelno == logging.INFO
    assert busy.getMessage() == (
        "sweep: inbox done=3 retried=1; outbox sent_records=2 done=2; expire 1 "
        "(API use: salesforce 1200/15000 used today)"
    )


def test_a_nested_job_shows_only_its_nonzero_counts() -> None:
    summary = {
        "outbox": {"done": 2, "notifications": {"sent": 1, "dead": 0}},
        "people": {"notifications": {}},
    }
    assert sweep_summary(summary) == "outbox done=2 notifications.sent=1"


def test_the_worker_sweep_logs_through_it(
    runtime: Runtime, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime.processor = CountingProcessor()
    runtime.set_adapter("sandbox", MemoryCRM())
    tasks = Tasks(runtime, make_huey("memory://"))
    with caplog.at_level(logging.DEBUG, logger="connector.worker"):
        tasks.run_sweep()
        accept(runtime.sessions, [event(1)])
        tasks.run_sweep()
    lines = [r for r in caplog.records if r.name == "connector.worker"]
    assert [r.levelno for r in lines] == [logging.DEBUG, logging.INFO]
    assert lines[1].getMessage() == "sweep: inbox done=1"


def test_each_crm_retry_is_a_warning_with_crm_status_and_wait_but_no_secret(
    caplog: pytest.LogCaptureFixture,
) -> None:
    failures = [
        RetriableError("POST https://x.bitrix24.com/rest/1/s3cr3t-hook/ failed", status=503, retry_after=2),
        RetriableError("slow down", status=429, code="REQUEST_LIMIT_EXCEEDED", retry_after=7),
    ]

    def call() -> str:
        if failures:
            raise failures.pop(0)
        return "ok"

    with caplog.at_level(logging.WARNING, logger="connector.crm.retry"):
        assert RetryPolicy(sleep=lambda _s: None).call(call, crm="b24") == "ok"
    first, second = (r.getMessage() for r in caplog.records)
    assert first == "b24: CRM call failed (HTTP 503), retrying in 2.0 s (attempt 2 of 5)"
    assert (
        second
        == "b24: CRM call failed (HTTP 429, REQUEST_LIMIT_EXCEEDED), retrying in 7.0 s (attempt 3 of 5)"
    )
    assert all("s3cr3t" not in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert caplog.records[1].event_fields == {  # type: ignore[attr-defined]
        "connection": "b24",
        "status": 429,
        "code": "REQUEST_LIMIT_EXCEEDED",
        "wait_seconds": 7.0,
        "attempt": 3,
    }


def test_after_commit_runs_only_when_the_transaction_commits(runtime: Runtime) -> None:
    ran: list[str] = []
    with transaction(runtime.sessions) as session:
        after_commit(session, lambda: ran.append("committed"))
        assert ran == []
    with pytest.raises(RuntimeError), transaction(runtime.sessions) as session:
        after_commit(session, lambda: ran.append("rolled back"))
        raise RuntimeError("the change fails")
    with transaction(runtime.sessions) as session:
        pass  # a later commit of the same factory does not run the dropped callback
    assert ran == ["committed"]


def test_one_info_line_per_business_event(
    tmp_path: Path, settings_factory: Any, runtime_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    mappings = tmp_path / "mappings"
    shutil.copytree(DATA, mappings)
    runtime = runtime_factory(settings_factory(mappings_dir=str(mappings)))
    runtime.set_adapter("sandbox", MemoryCRM(records={"D-1": dict(DEAL), "D-2": dict(DEAL)}))
    pipeline = Pipeline(runtime, MappingSet.load(mappings))
    runtime.processor = pipeline
    service = pipeline.approvals
    with caplog.at_level(logging.INFO, logger="connector.service.approval_service"):
        accept(runtime.sessions, [replace(event(1), record_id="D-1", values=DEAL)])
        accept(runtime.sessions, [replace(event(2), record_id="D-2", values=DEAL)])
        process_pending(runtime.sessions, pipeline)
        with runtime.sessions() as session:
            first, second = session.scalars(select(ApprovalRequestRow).order_by(ApprovalRequestRow.record_id))
        service.vote(runtime.sessions, first.id, user="u-mgr", decision="approve", step_index=0)
        service.vote(runtime.sessions, first.id, user="u-gm", decision="approve", step_index=1)
        service.vote(
            runtime.sessions, second.id, user="u-mgr", decision="reject", step_index=0, comment="Too risky"
        )
        service.clock = lambda: datetime.now(UTC) + timedelta(days=181)
        service.expire_due(runtime.sessions)
    lines = [(r.event, r.getMessage()) for r in caplog.records if hasattr(r, "event")]  # type: ignore[attr-defined]
    assert lines == [
        (
            "request_opened",
            f"request {first.id} opened by u-rep: sandbox:deal:D-1 rule big-deal (status pending)",
        ),
        (
            "request_opened",
            f"request {second.id} opened by u-rep: sandbox:deal:D-2 rule big-deal (status pending)",
        ),
        (
            "request_approved",
            f"request {first.id} approved by u-gm: sandbox:deal:D-1 rule big-deal (status approved)",
        ),
        (
            "request_rejected",
            f"request {second.id} rejected by u-mgr: sandbox:deal:D-2 rule big-deal (status rejected)",
        ),
        ("request_expired", f"request {first.id} expired: sandbox:deal:D-1 rule big-deal (status expired)"),
    ]
    opened = next(r for r in caplog.records if getattr(r, "event", None) == "request_opened")
    assert opened.event_fields == {  # type: ignore[attr-defined]
        "request_id": first.id,
        "record": "sandbox:deal:D-1",
        "rule": "big-deal",
        "actor": "u-rep",
        "status": "pending",
    }


def test_a_vote_that_fails_to_commit_logs_no_business_event(
    tmp_path: Path, settings_factory: Any, runtime_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    mappings = tmp_path / "mappings"
    shutil.copytree(DATA, mappings)
    runtime = runtime_factory(settings_factory(mappings_dir=str(mappings)))
    runtime.set_adapter("sandbox", MemoryCRM(records={"D-1": dict(DEAL)}))
    pipeline = Pipeline(runtime, MappingSet.load(mappings))
    runtime.processor = pipeline
    accept(runtime.sessions, [replace(event(1), record_id="D-1", values=DEAL)])
    process_pending(runtime.sessions, pipeline)
    with runtime.sessions() as session:
        request_id = session.scalars(select(ApprovalRequestRow.id)).one()
    caplog.clear()  # the "opened" line of the request above

    def failing_commit(_session: Session) -> None:
        raise RuntimeError("the vote's transaction fails to commit")

    def sessions() -> Session:  # the database refuses the commit
        session = runtime.sessions()
        sa_event.listen(session, "before_commit", failing_commit)
        return session

    with caplog.at_level(logging.INFO), pytest.raises(RuntimeError):
        pipeline.approvals.vote(
            sessions, request_id, user="u-mgr", decision="reject", step_index=0, comment="Too risky"
        )
    assert not [r for r in caplog.records if getattr(r, "event", "").startswith("request_")]
