"""`crm-approvals explain` (read-only) and `crm-approvals sync expire` (idempotent), and
the audit log refusing changes."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import responses
from click.testing import CliRunner
from sqlalchemy import func, select, text
from sqlalchemy.exc import DatabaseError

from connector.cli import main
from connector.config import Settings
from connector.runtime import Runtime
from connector.storage.db import transaction
from connector.storage.migrate import upgrade
from connector.storage.models import ApprovalRequestRow, AuditEntry, OutboxUpdate

ROOT = Path(__file__).resolve().parents[2]
SANDBOX = "http://sandbox.test"
DEAL = {
    "amount": 150000,
    "stage": "Negotiation",
    "owner_id": "u-rep-anna",
    "owner_manager_id": "u-mgr-boris",
    "company.credit_score": 64,
    "company.name": "Contoso",
    "term_months": 6,
    "product_lines": [],
    "currency": "EUR",
    "name": "POS refresh",
    "close_date": "2026-12-31",
    "approval_status": None,
    "approval_expires_on": None,
    "approval_comment": None,
}


@pytest.fixture
def env_file(tmp_path: Path) -> Path:
    mappings = tmp_path / "mappings"
    mappings.mkdir()
    shutil.copy(ROOT / "mappings/examples/sandbox-deals.yaml", mappings)
    env = tmp_path / ".env"
    env.write_text(
        f"DATABASE_URL=sqlite:///{tmp_path}/app.db\nQUEUE_URL=memory://\nMAPPINGS_DIR={mappings}\n"
        "CRM_CONNECTIONS=sandbox\n"
    )
    upgrade(f"sqlite:///{tmp_path}/app.db")
    return env


def invoke(env_file: Path, *args: str) -> Any:
    return CliRunner().invoke(main, ["--env-file", str(env_file), *args], catch_exceptions=False)


def test_explain_shows_the_matching_rule_each_condition_and_the_chain(env_file: Path, tmp_path: Path) -> None:
    record = tmp_path / "deal.json"
    record.write_text(json.dumps({"connection": "sandbox", "object": "deal", "values": DEAL}))
    result = invoke(env_file, "explain", "--record", str(record))
    assert result.exit_code == 0, result.output
    out = result.output
    assert "rule deal-approval: MATCHES" in out
    assert "amount gt" in out and "(actual: " in out
    assert "step 1 manager [one, 1 of 1]: u-mgr-boris" in out
    assert "step 2 general-manager [one, 1 of 1]: u-gm-carla" in out
    assert "step 3 finance" in out and "u-fin-dmitri" in out
    assert "step 4 legal: skipped" in out  # term 6 months: no legal


def test_explain_creates_nothing(env_file: Path, tmp_path: Path) -> None:
    record = tmp_path / "deal.json"
    record.write_text(json.dumps(DEAL))
    result = invoke(
        env_file, "explain", "--record", str(record), "--connection", "sandbox", "--object", "deal", "--json"
    )
    assert json.loads(result.output)["rules"][0]["matched"] is True
    runtime = Runtime.from_settings(Settings.from_env({}, dotenv_path=str(env_file)))
    with runtime.sessions() as session:
        for model in (ApprovalRequestRow, OutboxUpdate, AuditEntry):
            assert session.scalar(select(func.count()).select_from(model)) == 0
    runtime.close()


def test_explain_of_a_record_below_every_threshold_says_no_match(env_file: Path, tmp_path: Path) -> None:
    record = tmp_path / "deal.json"
    record.write_text(json.dumps({**DEAL, "amount": 5000, "company.credit_score": 90}))
    result = invoke(
        env_file, "explain", "--record", str(record), "--connection", "sandbox", "--object", "deal"
    )
    assert "rule deal-approval: does not match" in result.output
    assert "step 1" not in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "exactly one of --record"),
        (["--record-id", "D-1"], "--record-id needs --connection and --object"),
    ],
)
def test_explain_usage_errors_are_clear(env_file: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["--env-file", str(env_file), "explain", *args])
    assert result.exit_code == 2 and message in result.output


def test_explain_of_an_object_without_mapping_says_so(env_file: Path, tmp_path: Path) -> None:
    record = tmp_path / "deal.json"
    record.write_text("{}")
    result = CliRunner().invoke(
        main,
        [
            "--env-file",
            str(env_file),
            "explain",
            "--record",
            str(record),
            "--connection",
            "x",
            "--object",
            "y",
        ],
    )
    assert result.exit_code == 1 and "no mapping file covers x/y" in result.output


@responses.activate
def test_sync_expire_expires_due_approvals_once_writes_back_and_reports(env_file: Path) -> None:
    with env_file.open("a") as env:
        env.write(f"SANDBOX_API_TOKEN=t0ken\nSANDBOX_URL={SANDBOX}\n")
    writes = responses.post(
        f"{SANDBOX}/api/v1/objects/deal/batch-update", json={"results": [{"id": "D-1002", "ok": True}]}
    )
    runtime = Runtime.from_settings(Settings.from_env({}, dotenv_path=str(env_file)))
    past = datetime.now(UTC) - timedelta(days=200)
    with transaction(runtime.sessions) as session:
        session.add(_approved_request(expires_at=past + timedelta(days=180)))
    first = invoke(env_file, "sync", "expire")
    assert "expired sandbox:deal:D-1002 (deal-approval" in first.output
    assert "1 approval(s) expired; write-back: 1 sent" in first.output
    assert json.loads(writes.calls[0].request.body)["records"] == [
        {"id": "D-1002", "fields": {"approval_status": "Expired", "approval_expires_on": None}}
    ]
    with runtime.sessions() as session:
        assert session.scalars(select(ApprovalRequestRow.status)).one() == "expired"
    assert "0 approval(s) expired" in invoke(env_file, "sync", "expire").output
    assert len(writes.calls) == 1
    runtime.close()


def test_sync_expire_without_crm_credentials_says_which_variable_to_set(env_file: Path) -> None:
    runtime = Runtime.from_settings(Settings.from_env({}, dotenv_path=str(env_file)))
    with transaction(runtime.sessions) as session:
        session.add(_approved_request(expires_at=datetime.now(UTC) - timedelta(days=1)))
    result = CliRunner().invoke(main, ["--env-file", str(env_file), "sync", "expire"])
    assert result.exit_code == 1
    assert "needs SANDBOX_API_TOKEN" in result.output and "Traceback" not in result.output
    runtime.close()


def _approved_request(expires_at: datetime) -> ApprovalRequestRow:
    """An approved request as the engine stores it (the lifecycle of getting there is tested elsewhere)."""
    at = expires_at - timedelta(days=180)
    return ApprovalRequestRow(
        id="req-1",
        connection="sandbox",
        object_type="deal",
        record_id="D-1002",
        rule_name="deal-approval",
        mapping_path="sandbox-deals.yaml",
        mapping_hash="0" * 64,
        submitter="u-rep-anna",
        status="approved",
        current_step=None,
        record={},
        record_previous=None,
        changed_fields=[],
        submitted_at=at,
        updated_at=at,
        approved_at=at,
        expires_at=expires_at,
        closed_at=at,
        version=3,
    )


@pytest.mark.parametrize("statement", ["UPDATE audit_log SET kind = 'x'", "DELETE FROM audit_log"])
def test_audit_log_is_append_only(runtime: Runtime, statement: str) -> None:
    from connector.storage import audit

    with transaction(runtime.sessions) as session:
        audit.record(session, "vote", actor="u-mgr-boris")
    with pytest.raises(DatabaseError, match="append-only"), transaction(runtime.sessions) as session:
        session.execute(text(statement))


@pytest.mark.xdist_group("services")
def test_audit_log_is_append_only_on_postgres(pg_url: str, runtime_factory: Any) -> None:
    from connector.storage import audit

    runtime = runtime_factory(Settings(database_url=pg_url))
    with transaction(runtime.sessions) as session:
        audit.record(session, "vote", actor="u-mgr-boris")
    with pytest.raises(DatabaseError, match="append-only"), transaction(runtime.sessions) as session:
        session.execute(text("UPDATE audit_log SET kind = 'x'"))


def test_explain_refuses_a_salesforce_record_id_with_a_wrong_checksum(tmp_path: Path) -> None:
    """Read nothing from Salesforce for an id that names no record: a usage error saying why."""
    env = tmp_path / ".env"
    env.write_text(
        f"DATABASE_URL=sqlite:///{tmp_path}/app.db\nQUEUE_URL=memory://\nMAPPINGS_DIR={tmp_path}\n"
        "CRM_CONNECTIONS=salesforce\nSALESFORCE_ORG_IDS=00D5e000000AbCdEAK\n"
    )
    args = ["--record-id", "0065e00000R1001ZZZ", "--connection", "salesforce", "--object", "Opportunity"]
    result = CliRunner().invoke(main, ["--env-file", str(env), "explain", *args])
    assert result.exit_code == 2, result.output
    assert "checksum suffix 'ZZZ'" in result.output and "--record-id" in result.output


def test_init_without_the_template_says_what_to_do(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from connector.cli import main

    with CliRunner().isolated_filesystem(temp_dir=tmp_path):
        result = CliRunner().invoke(main, ["--env-file", ".env", "init"])
    assert result.exit_code == 1
    assert ".env.example not found" in result.output and "--env-example" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
