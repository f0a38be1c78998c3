"""`crm-approvals sync expire --dry-run / --as-of` and `sync expiring --within`, with the
write-back going to a `responses`-mocked sandbox API in its documented format."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import responses
from click.testing import CliRunner, Result
from sqlalchemy import func, select

from connector.cli import main
from connector.config import Settings
from connector.runtime import Runtime
from connector.storage.db import transaction
from connector.storage.migrate import upgrade
from connector.storage.models import ApprovalRequestRow, OutboxUpdate

ROOT = Path(__file__).resolve().parents[2]
SANDBOX = "http://sandbox.test"
UPDATE_URL = f"{SANDBOX}/api/v1/objects/deal/batch-update"
NOW = datetime.now(UTC)


@pytest.fixture
def env_file(tmp_path: Path) -> Path:
    mappings = tmp_path / "mappings"
    mappings.mkdir()
    shutil.copy(ROOT / "mappings/examples/sandbox-deals.yaml", mappings)
    env = tmp_path / ".env"
    env.write_text(
        f"DATABASE_URL=sqlite:///{tmp_path}/app.db\nQUEUE_URL=memory://\nMAPPINGS_DIR={mappings}\n"
        f"CRM_CONNECTIONS=sandbox\nSANDBOX_API_TOKEN=t0ken\nSANDBOX_URL={SANDBOX}\n"
    )
    upgrade(f"sqlite:///{tmp_path}/app.db")
    return env


@pytest.fixture
def runtime(env_file: Path) -> Iterator[Runtime]:
    runtime = Runtime.from_settings(Settings.from_env({}, dotenv_path=str(env_file)))
    yield runtime
    runtime.close()


@pytest.fixture
def crm() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:

        def ok_for_each(request: Any) -> tuple[int, dict[str, str], str]:
            records = json.loads(request.body)["records"]
            return 200, {}, json.dumps({"results": [{"id": r["id"], "ok": True} for r in records]})

        rsps.add_callback(responses.POST, UPDATE_URL, callback=ok_for_each)
        yield rsps


def invoke(env_file: Path, *args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(main, ["--env-file", str(env_file), *args], input=input)


def add_approved(
    runtime: Runtime, request_id: str, record_id: str, expires_in: timedelta, **extra: Any
) -> None:
    """An approved request as the engine stores it (getting there is tested with the lifecycle)."""
    expires_at = NOW + expires_in
    approved_at = expires_at - timedelta(days=180)
    with transaction(runtime.sessions) as session:
        session.add(
            ApprovalRequestRow(
                id=request_id,
                connection="sandbox",
                object_type="deal",
                record_id=record_id,
                rule_name="deal-approval",
                mapping_path="sandbox-deals.yaml",
                mapping_hash="0" * 64,
                submitter="u-rep-anna",
                status="approved",
                current_step=None,
                record={},
                record_previous=None,
                changed_fields=[],
                submitted_at=approved_at,
                updated_at=approved_at,
                approved_at=approved_at,
                expires_at=expires_at,
                closed_at=approved_at,
                version=3,
                **extra,
            )
        )


def statuses(runtime: Runtime) -> dict[str, str]:
    with runtime.sessions() as session:
        return {
            row.id: row.status
            for row in session.execute(select(ApprovalRequestRow.id, ApprovalRequestRow.status))
        }


def outbox_count(runtime: Runtime) -> int:
    with runtime.sessions() as session:
        return int(session.scalar(select(func.count()).select_from(OutboxUpdate)) or 0)


def test_dry_run_lists_what_would_expire_and_writes_nothing(
    env_file: Path, runtime: Runtime, crm: responses.RequestsMock
) -> None:
    add_approved(runtime, "req-due", "D-1001", -timedelta(days=2))
    add_approved(runtime, "req-later", "D-1002", timedelta(days=10))
    result = invoke(env_file, "sync", "expire", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "would expire sandbox:deal:D-1001 (deal-approval, request req-due, due " in result.output
    assert "D-1002" not in result.output
    assert "1 approval(s) would expire; nothing was written" in result.output
    assert statuses(runtime) == {"req-due": "approved", "req-later": "approved"}
    assert outbox_count(runtime) == 0 and len(crm.calls) == 0


def test_as_of_a_future_date_expires_what_is_due_by_then_after_confirmation(
    env_file: Path, runtime: Runtime, crm: responses.RequestsMock
) -> None:
    add_approved(runtime, "req-10d", "D-1001", timedelta(days=10))
    add_approved(runtime, "req-60d", "D-1002", timedelta(days=60))
    as_of = (NOW + timedelta(days=10)).date().isoformat()

    preview = invoke(env_file, "sync", "expire", "--as-of", as_of, "--dry-run")
    assert f"1 approval(s) would expire as of the end of {as_of} (UTC); nothing was written" in preview.output

    declined = invoke(env_file, "sync", "expire", "--as-of", as_of, input="n\n")
    assert declined.exit_code == 1 and "is in the future" in declined.output and "Aborted" in declined.output
    assert statuses(runtime)["req-10d"] == "approved" and len(crm.calls) == 0

    done = invoke(env_file, "sync", "expire", "--as-of", as_of, "--yes")
    assert done.exit_code == 0, done.output
    assert "expired sandbox:deal:D-1001 (deal-approval, request req-10d)" in done.output
    assert f"1 approval(s) expired as of the end of {as_of} (UTC); write-back: 1 sent" in done.output
    assert statuses(runtime) == {"req-10d": "expired", "req-60d": "approved"}
    assert json.loads(crm.calls[0].request.body)["records"] == [
        {"id": "D-1001", "fields": {"approval_status": "Expired", "approval_expires_on": None}}
    ]
    with runtime.sessions() as session:
        expired_at = session.scalar(
            select(ApprovalRequestRow.expired_at).where(ApprovalRequestRow.id == "req-10d")
        )
    assert expired_at is not None and expired_at.date().isoformat() == as_of  # expired as of that day


def test_as_of_a_past_date_expires_only_what_was_due_then(
    env_file: Path, runtime: Runtime, crm: responses.RequestsMock
) -> None:
    add_approved(runtime, "req-5d-ago", "D-1001", -timedelta(days=5))
    add_approved(runtime, "req-1d-ago", "D-1002", -timedelta(days=1))
    as_of = (NOW - timedelta(days=3)).date().isoformat()
    result = invoke(env_file, "sync", "expire", "--as-of", as_of)
    assert result.exit_code == 0, result.output
    assert statuses(runtime) == {"req-5d-ago": "expired", "req-1d-ago": "approved"}


@pytest.mark.parametrize("value", ["2026-02-30", "31/12/2026", "tomorrow"])
def test_as_of_that_is_not_a_date_is_refused_clearly(env_file: Path, runtime: Runtime, value: str) -> None:
    add_approved(runtime, "req-due", "D-1001", -timedelta(days=2))
    result = invoke(env_file, "sync", "expire", "--as-of", value)
    assert result.exit_code == 2
    assert f"Invalid value for '--as-of': {value!r} is not a date; write it as YYYY-MM-DD" in result.output
    assert statuses(runtime) == {"req-due": "approved"}


def test_expiring_lists_approvals_in_force_that_expire_within_the_window(
    env_file: Path, runtime: Runtime
) -> None:
    add_approved(runtime, "req-10d", "D-1001", timedelta(days=10))
    add_approved(runtime, "req-25d", "D-1004", timedelta(days=25))
    add_approved(runtime, "req-60d", "D-1002", timedelta(days=60))
    add_approved(runtime, "req-old", "D-1003", timedelta(days=5), superseded_by="req-new")
    add_approved(runtime, "req-overdue", "D-1006", -timedelta(hours=1))

    result = invoke(env_file, "sync", "expiring", "--within", "30")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [line.split()[0] for line in lines[:2]] == [
        (NOW + timedelta(days=10)).date().isoformat(),
        (NOW + timedelta(days=25)).date().isoformat(),
    ]
    assert (
        "in 10 day(s)" in lines[0]
        and "sandbox:deal:D-1001" in lines[0]
        and "submitted by u-rep-anna" in lines[0]
    )
    assert "D-1002" not in result.output and "req-old" not in result.output
    assert "2 approval(s) expire within 30 day(s)" in result.output
    assert (
        "1 approval(s) are past their expiry; `crm-approvals sync expire` expires them now" in result.output
    )

    week = json.loads(invoke(env_file, "sync", "expiring", "--within", "14", "--json").output)
    assert [item["request_id"] for item in week["expiring"]] == ["req-10d"]
    assert week["past_expiry"] == 1 and week["expiring"][0]["submitter"] == "u-rep-anna"
    assert statuses(runtime)["req-overdue"] == "approved"  # a report writes nothing


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--within", "0"], "0 is not in the range x>=1"),
        (["--connection", "nope"], "unknown connection 'nope'; configured: sandbox"),
    ],
)
def test_expiring_bad_options_are_refused(env_file: Path, args: list[str], message: str) -> None:
    result = invoke(env_file, "sync", "expiring", *args)
    assert result.exit_code in (1, 2) and message in result.output
