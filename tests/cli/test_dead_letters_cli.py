"""`crm-approvals dead-letters list|show|retry|discard` and `crm-approvals replay`, against
the sandbox CRM's documented batch-update answers (mocked with `responses`)."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import responses
from click.testing import CliRunner
from sqlalchemy import select

from connector.cli import main
from connector.config import Settings
from connector.events import RecordChangeEvent
from connector.runtime import Runtime
from connector.storage.db import transaction
from connector.storage.inbox import accept
from connector.storage.migrate import upgrade
from connector.storage.models import DeadLetter, InboxEvent
from connector.storage.outbox import enqueue_update, flush

ROOT = Path(__file__).resolve().parents[2]
SANDBOX = "http://sandbox.test"
BATCH = f"{SANDBOX}/api/v1/objects/deal/batch-update"
REFUSED = {
    "results": [
        {
            "id": "D-2",
            "ok": False,
            "error": {
                "code": "FIELD_CUSTOM_VALIDATION_EXCEPTION",
                "message": "Amount must be positive",
                "field": "amount",
            },
        }
    ]
}


@pytest.fixture
def env_file(tmp_path: Path) -> Path:
    mappings = tmp_path / "mappings"
    mappings.mkdir()
    shutil.copy(ROOT / "tests/data/pipeline/deals.yaml", mappings)
    env = tmp_path / ".env"
    env.write_text(
        f"DATABASE_URL=sqlite:///{tmp_path}/app.db\nQUEUE_URL=memory://\nMAPPINGS_DIR={mappings}\n"
        f"CRM_CONNECTIONS=sandbox\nSANDBOX_API_TOKEN=t0ken-cli\nSANDBOX_URL={SANDBOX}\n"
    )
    upgrade(f"sqlite:///{tmp_path}/app.db")
    return env


@pytest.fixture
def runtime(env_file: Path) -> Any:
    runtime = Runtime.from_settings(Settings.from_env({}, dotenv_path=str(env_file)))
    yield runtime
    runtime.close()


def invoke(env_file: Path, *args: str) -> Any:
    return CliRunner().invoke(main, ["--env-file", str(env_file), *args], catch_exceptions=False)


def refused_write_back(runtime: Runtime, record_id: str = "D-2") -> int:
    with transaction(runtime.sessions) as session:
        enqueue_update(session, "sandbox", "deal", record_id, {"approval_status": "Approved"}, reason="r1")
    with responses.RequestsMock() as rsps:
        rsps.post(BATCH, json=REFUSED)
        assert flush(runtime.sessions, runtime.adapter).dead == 1
    with runtime.sessions() as session:
        return session.scalars(select(DeadLetter.id)).one()


def test_list_and_show_give_the_crm_message(env_file: Path, runtime: Runtime) -> None:
    letter_id = refused_write_back(runtime)
    listed = invoke(env_file, "dead-letters", "list")
    assert listed.exit_code == 0
    assert "sandbox:deal:D-2" in listed.output
    assert "FIELD_CUSTOM_VALIDATION_EXCEPTION: Amount must be positive" in listed.output
    assert "1 shown of 1" in listed.output
    as_json = json.loads(invoke(env_file, "dead-letters", "list", "--json").output)
    assert as_json["total"] == 1 and as_json["dead_letters"][0]["error"]["fields"] == ["amount"]
    assert "no open dead letters match" in invoke(env_file, "dead-letters", "list", "--code", "OTHER").output
    assert "D-2" in invoke(env_file, "dead-letters", "list", "--older-than", "0s").output
    assert "no open" in invoke(env_file, "dead-letters", "list", "--object", "company").output

    shown = invoke(env_file, "dead-letters", "show", str(letter_id))
    assert f"dead letter {letter_id} (write-back 1)" in shown.output
    assert "fields:    amount" in shown.output and '"approval_status": "Approved"' in shown.output
    assert (
        json.loads(invoke(env_file, "dead-letters", "show", str(letter_id), "--json").output)["id"]
        == letter_id
    )


def test_retry_after_the_crm_is_fixed_writes_it_exactly_once(env_file: Path, runtime: Runtime) -> None:
    letter_id = refused_write_back(runtime)
    with responses.RequestsMock() as rsps:
        batch = rsps.post(BATCH, json={"results": [{"id": "D-2", "ok": True}]})
        dry = invoke(env_file, "dead-letters", "retry", str(letter_id), "--dry-run")
        assert "would be requeued: would send approval_status = 'Approved'" in dry.output
        assert "dry run, nothing changed" in dry.output and batch.call_count == 0

        first = invoke(env_file, "dead-letters", "retry", str(letter_id))
        assert first.exit_code == 0, first.output
        assert f"dead letter {letter_id} (outbox sandbox:deal:D-2): requeued" in first.output
        assert "write-back 2 for sandbox:deal:D-2: sent" in first.output
        again = invoke(env_file, "dead-letters", "retry", "--code", "FIELD_CUSTOM_VALIDATION_EXCEPTION")
        assert "no open dead letters match" in again.output
        by_id = invoke(env_file, "dead-letters", "retry", str(letter_id))
        assert "skipped: already resolved (retried" in by_id.output
    assert batch.call_count == 1
    assert json.loads(batch.calls[0].request.body)["records"] == [
        {"id": "D-2", "fields": {"approval_status": "Approved"}}
    ]
    assert "retried" in invoke(env_file, "dead-letters", "list", "--state", "resolved").output


def test_a_retry_refused_again_says_so(env_file: Path, runtime: Runtime) -> None:
    letter_id = refused_write_back(runtime)
    with responses.RequestsMock() as rsps:
        rsps.post(BATCH, json=REFUSED)
        result = invoke(env_file, "dead-letters", "retry", str(letter_id))
    assert "refused again: FIELD_CUSTOM_VALIDATION_EXCEPTION: Amount must be positive" in result.output


def test_retry_and_discard_need_ids_a_filter_or_all(env_file: Path, runtime: Runtime) -> None:
    for verb in ("retry", "discard"):
        result = CliRunner().invoke(main, ["--env-file", str(env_file), "dead-letters", verb])
        assert result.exit_code == 2 and f"say which dead letters to {verb}" in result.output
    bad_age = CliRunner().invoke(
        main, ["--env-file", str(env_file), "dead-letters", "list", "--older-than", "soon"]
    )
    assert bad_age.exit_code == 2 and "'soon' is not an age such as 90s" in bad_age.output
    missing = CliRunner().invoke(main, ["--env-file", str(env_file), "dead-letters", "show", "42"])
    assert missing.exit_code == 1 and "no dead letter 42" in missing.output


def test_discard_all_then_nothing_is_sent(env_file: Path, runtime: Runtime) -> None:
    refused_write_back(runtime)
    assert "would be discarded" in invoke(env_file, "dead-letters", "discard", "--all", "--dry-run").output
    result = invoke(env_file, "dead-letters", "discard", "--all")
    assert "discarded: resolved without retrying" in result.output and "1 discarded" in result.output
    assert "no open dead letters" in invoke(env_file, "dead-letters", "list").output
    with responses.RequestsMock():  # any call to the CRM would fail the test
        assert flush(runtime.sessions, runtime.adapter).sent_records == 0


def test_retry_no_send_leaves_the_sending_to_the_worker(env_file: Path, runtime: Runtime) -> None:
    letter_id = refused_write_back(runtime)
    with responses.RequestsMock():
        result = invoke(env_file, "dead-letters", "retry", str(letter_id), "--no-send")
    assert "queued; the worker sends" in result.output


def test_replay_by_record_with_dry_run_then_for_real(env_file: Path, runtime: Runtime) -> None:
    values = {
        "amount": 150000,
        "stage": "negotiation",
        "owner_id": "u-rep",
        "owner_manager_id": "u-mgr",
        "company.credit_score": 80,
        "approval_status": None,
        "approval_expires_on": None,
        "approval_comment": None,
    }
    accept(
        runtime.sessions,
        [
            RecordChangeEvent(
                "sandbox",
                "sandbox",
                "deal",
                "D-1",
                "e1",
                datetime.now(UTC),
                "sandbox:t:e1",
                changed_fields=("amount",),
                values=values,
            )
        ],
    )
    with transaction(runtime.sessions) as session:  # processed while a wrong mapping was live
        row = session.scalars(select(InboxEvent)).one()
        row.status, row.result = "done", "no rule matched"

    usage = CliRunner().invoke(main, ["--env-file", str(env_file), "replay"])
    assert usage.exit_code == 2 and "say which events" in usage.output
    dry = invoke(env_file, "replay", "--record", "sandbox:deal:D-1", "--dry-run")
    assert "would replay event 1 sandbox:deal:D-1" in dry.output and "done: no rule matched" in dry.output
    with responses.RequestsMock() as rsps:
        batch = rsps.post(BATCH, json={"results": [{"id": "D-1", "ok": True}]})
        real = invoke(env_file, "replay", "--record", "sandbox:deal:D-1")
        assert "event 1: done: big-deal: opened" in real.output, real.output
        assert json.loads(batch.calls[0].request.body)["records"][0]["fields"] == {
            "approval_status": "Pending"
        }
        again = invoke(env_file, "replay", "--since", "1h")
        assert "left as it is" in again.output
    assert batch.call_count == 1
    bad = CliRunner().invoke(main, ["--env-file", str(env_file), "replay", "--since", "last week"])
    assert bad.exit_code == 2 and "is not an ISO date or time" in bad.output
