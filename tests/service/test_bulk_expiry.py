"""Set-based expiry (connector/service/bulk_expiry.py) on SQLite and PostgreSQL: chunks of
many approvals per statement write what expiring one request at a time wrote (transition,
version, outbox row and key, notification, audit entries), the audit chain still verifies,
and templates that read the request are rendered per request."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from connector.config import Settings
from connector.notify.models import Notification
from connector.rules import MappingSet
from connector.runtime import Runtime
from connector.service.bulk_expiry import Expired, expire_due
from connector.service.pipeline import Pipeline
from connector.storage import audit
from connector.storage.db import transaction
from connector.storage.migrate import upgrade
from connector.storage.models import ApprovalRequestRow, ApprovalTransitionRow, AuditEntry, OutboxUpdate

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/app.db"
    return str(request.getfixturevalue("pg_url"))


def make_runtime(tmp_path: Path, database_url: str, expire_set: str | None = None) -> Runtime:
    mappings = tmp_path / "mappings"
    mappings.mkdir(exist_ok=True)
    text = (ROOT / "mappings/examples/sandbox-deals.yaml").read_text()
    if expire_set is not None:
        text = text.replace("          status: Expired\n          expires_on: null\n", expire_set)
    (mappings / "sandbox-deals.yaml").write_text(text)
    upgrade(database_url)
    env = {
        "DATABASE_URL": database_url,
        "QUEUE_URL": "memory://",
        "MAPPINGS_DIR": str(mappings),
        "CRM_CONNECTIONS": "sandbox",
        "SANDBOX_API_TOKEN": "t0ken",
        "SANDBOX_URL": "http://sandbox.test",
    }
    return Runtime.from_settings(Settings.from_env(env, dotenv_path=str(tmp_path / "none.env")))


@pytest.fixture
def runtime(tmp_path: Path, database_url: str) -> Iterator[Runtime]:
    runtime = make_runtime(tmp_path, database_url)
    yield runtime
    runtime.close()


def add_approved(
    runtime: Runtime, count: int, expires_at: datetime, prefix: str, **extra: object
) -> list[str]:
    ids = [f"{prefix}-{n:04d}" for n in range(count)]
    with transaction(runtime.sessions) as session:
        for n, request_id in enumerate(ids):
            approved_at = expires_at - timedelta(days=180)
            session.add(
                ApprovalRequestRow(
                    id=request_id,
                    connection="sandbox",
                    object_type="deal",
                    record_id=f"D-{prefix}-{n}",
                    rule_name="deal-approval",
                    mapping_path="sandbox-deals.yaml",
                    mapping_hash="0" * 64,
                    submitter=f"u-rep-{n % 3}",
                    status="approved",
                    current_step=None,
                    record={"amount": 1000 + n},
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
            for seq, (kind, to) in enumerate((("submitted", "pending"), ("approved", "approved")), 1):
                session.add(
                    ApprovalTransitionRow(
                        request_id=request_id,
                        seq=seq,
                        kind=kind,
                        from_status=None,
                        to_status=to,
                        at=approved_at,
                    )
                )
    return ids


def pipeline_of(runtime: Runtime, clock: datetime = NOW) -> Pipeline:
    pipeline = Pipeline(runtime, MappingSet.load(runtime.settings.mappings_dir))
    pipeline.approvals.clock = lambda: clock
    return pipeline


def test_chunks_expire_every_due_approval_once_with_its_transition_outbox_row_notification_and_audit(
    runtime: Runtime,
) -> None:
    due = add_approved(runtime, 25, NOW - timedelta(hours=1), "due")
    later = add_approved(runtime, 3, NOW + timedelta(days=1), "later")
    superseded = add_approved(runtime, 1, NOW - timedelta(days=2), "old", superseded_by="later-0000")
    heard: list[Expired] = []
    service = pipeline_of(runtime).approvals

    report = expire_due(service, runtime.sessions, chunk=10, on_expired=heard.append)

    assert report.expired == 25 and report.by_rule == {"deal-approval": 25}
    assert sorted(e.request_id for e in heard) == due
    assert heard[0].ref.startswith("sandbox:deal:D-due-")
    with runtime.sessions() as session:
        rows = {r.id: r for r in session.scalars(select(ApprovalRequestRow))}
        assert {i for i, r in rows.items() if r.status == "expired"} == set(due)
        assert all(rows[i].status == "approved" for i in later + superseded)
        assert {rows[i].version for i in due} == {4}
        assert {rows[i].expired_at for i in due} == {NOW}
        transitions = session.execute(
            select(
                ApprovalTransitionRow.request_id, ApprovalTransitionRow.seq, ApprovalTransitionRow.from_status
            )
            .where(ApprovalTransitionRow.kind == "expired")
            .order_by(ApprovalTransitionRow.request_id)
        ).all()
        assert transitions == [(i, 3, "approved") for i in due]
        outbox = session.scalars(select(OutboxUpdate).order_by(OutboxUpdate.record_id)).all()
        assert len(outbox) == 25
        assert {(o.idempotency_key, o.reason) for o in outbox} == {
            (f"{i}:v4:0:expire", f"request {i}: expire") for i in due
        }
        # canonical status/expires_on -> the sandbox's API names
        assert all(o.fields == {"approval_status": "Expired", "approval_expires_on": None} for o in outbox)
        assert all(o.status == "pending" for o in outbox)
        notes = session.scalars(select(Notification).where(Notification.event == "expired")).all()
        assert sorted(n.request_id for n in notes) == due  # e-mail to each submitter
        assert {n.dedupe_key for n in notes} == {f"{i}:expired:3:user:{rows[i].submitter}:email" for i in due}
        assert all(n.context["step_count"] >= 1 and n.context["at"] == NOW.isoformat() for n in notes)
        details = session.scalars(select(AuditEntry.detail).where(AuditEntry.request_id.in_(due))).all()
        assert {d.get("to_status") or d["event"] for d in details} == {"expired", "expire"}  # JSON, not text
        kinds = session.execute(
            select(AuditEntry.kind, func.count())
            .where(AuditEntry.request_id.in_(due))
            .group_by(AuditEntry.kind)
        ).all()
        assert dict(kinds) == {"transition": 25, "action_queued": 25}
    assert audit.verify(runtime.sessions).ok

    assert expire_due(service, runtime.sessions, chunk=10).expired == 0  # idempotent
    with runtime.sessions() as session:
        assert session.scalar(select(func.count()).select_from(OutboxUpdate)) == 25


def test_a_template_reading_the_request_is_rendered_per_request(tmp_path: Path, database_url: str) -> None:
    runtime = make_runtime(
        tmp_path,
        database_url,
        expire_set='          status: "Expired {{ request.expires_at.date() }} ({{ record.amount }})"\n',
    )
    try:
        ids = add_approved(runtime, 12, NOW - timedelta(days=1), "tpl")
        assert expire_due(pipeline_of(runtime).approvals, runtime.sessions, chunk=5).expired == 12
        day = (NOW - timedelta(days=1)).date().isoformat()
        with runtime.sessions() as session:
            fields = dict(session.execute(select(OutboxUpdate.record_id, OutboxUpdate.fields)).all())
            queued = session.scalars(
                select(AuditEntry.detail).where(AuditEntry.kind == "action_queued")
            ).all()
        assert fields == {f"D-tpl-{n}": {"approval_status": f"Expired {day} ({1000 + n})"} for n in range(12)}
        assert sorted(d["fields"]["approval_status"] for d in queued) == sorted(
            f"Expired {day} ({1000 + n})" for n in range(12)
        )
        assert audit.verify(runtime.sessions).ok
        with runtime.sessions() as session:
            assert set(session.scalars(select(ApprovalRequestRow.status))) == {"expired"}
            assert len(ids) == 12
    finally:
        runtime.close()


def test_approvals_of_a_rule_gone_from_the_mappings_are_left_alone(runtime: Runtime) -> None:
    add_approved(runtime, 2, NOW - timedelta(days=1), "due")
    with transaction(runtime.sessions) as session:
        session.execute(
            ApprovalRequestRow.__table__.update()
            .where(ApprovalRequestRow.id == "due-0001")
            .values(rule_name="renamed-away")
        )
    assert expire_due(pipeline_of(runtime).approvals, runtime.sessions).expired == 1
    with runtime.sessions() as session:
        assert dict(session.execute(select(ApprovalRequestRow.id, ApprovalRequestRow.status)).all()) == {
            "due-0000": "expired",
            "due-0001": "approved",
        }


def test_the_bulk_audit_append_extends_the_chain_that_single_entries_continue(runtime: Runtime) -> None:
    with transaction(runtime.sessions) as session:
        audit.record(session, "expired", request_id="before")
    entries = (
        {"at": NOW, "kind": "expired", "request_id": f"r-{n}", "detail": {"n": n}} for n in range(2500)
    )
    with transaction(runtime.sessions) as session:
        assert audit.append_many(session, entries, batch=1000) == 2500
    with transaction(runtime.sessions) as session:
        audit.record(session, "expired", request_id="after")
    result = audit.verify(runtime.sessions)
    assert result.ok and result.rows == 2502
    with (
        pytest.raises(ValueError, match="unknown audit entry kind"),
        transaction(runtime.sessions) as session,
    ):
        audit.append_many(session, [{"at": NOW, "kind": "nonsense"}])


def test_on_sqlite_chunks_checkpoint_the_wal_less_often_and_the_setting_is_put_back(tmp_path: Path) -> None:
    from sqlalchemy import event

    from connector.storage.db import SWEEP_CACHE_KB, SWEEP_CHECKPOINT_PAGES

    runtime = make_runtime(tmp_path, f"sqlite:///{tmp_path}/app.db")
    add_approved(runtime, 5, NOW - timedelta(hours=1), "due")

    def setting(dbapi_connection: Any) -> tuple[int, int]:
        pages = dbapi_connection.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
        return int(pages), int(dbapi_connection.execute("PRAGMA cache_size").fetchone()[0])

    at_commit: list[int] = []
    event.listen(
        runtime.engine, "commit", lambda conn: at_commit.append(setting(conn.connection.driver_connection))
    )
    assert expire_due(pipeline_of(runtime).approvals, runtime.sessions, chunk=2).expired == 5
    assert at_commit == [(SWEEP_CHECKPOINT_PAGES, -SWEEP_CACHE_KB)] * 3
    pooled = [runtime.engine.raw_connection() for _ in range(max(runtime.engine.pool.checkedin(), 1))]  # type: ignore[attr-defined]
    # SQLite's defaults: 1,000 pages, a 2,000 KiB cache
    assert [setting(c.driver_connection) for c in pooled] == [(1000, -2000)] * len(pooled)
    for connection in pooled:
        connection.close()
    assert audit.verify(runtime.sessions).ok
    runtime.close()


def test_the_cli_prints_each_expired_approval_from_the_bulk_path(tmp_path: Path) -> None:
    """`sync expire` still names every approval it expired (tests/cli/test_sync_expire.py covers
    the rest of the command); here with more than one chunk's worth."""
    from click.testing import CliRunner

    from connector.cli import main
    from connector.service import bulk_expiry

    runtime = make_runtime(tmp_path, f"sqlite:///{tmp_path}/app.db")
    add_approved(runtime, 7, datetime.now(UTC) - timedelta(days=1), "cli")
    runtime.close()
    env = tmp_path / ".env"
    env.write_text(
        f"DATABASE_URL=sqlite:///{tmp_path}/app.db\nQUEUE_URL=memory://\n"
        f"MAPPINGS_DIR={tmp_path / 'mappings'}\n"
        "CRM_CONNECTIONS=sandbox\nSANDBOX_API_TOKEN=t0ken\nSANDBOX_URL=http://sandbox.test\n"
    )
    chunk = bulk_expiry.CHUNK
    bulk_expiry.CHUNK = 3
    try:
        import responses

        with responses.RequestsMock(assert_all_requests_are_fired=False) as crm:
            crm.add(
                responses.POST,
                "http://sandbox.test/api/v1/objects/deal/batch-update",
                json={"results": [{"id": f"D-cli-{n}", "ok": True} for n in range(7)]},
            )
            result = CliRunner().invoke(main, ["--env-file", str(env), "sync", "expire"])
    finally:
        bulk_expiry.CHUNK = chunk
    assert result.exit_code == 0, result.output
    assert sum(line.startswith("expired sandbox:deal:D-cli-") for line in result.output.splitlines()) == 7
    assert "7 approval(s) expired; write-back: 7 sent" in result.output


@pytest.mark.parametrize(
    "values",
    [
        ("u-1", "sandbox", "a" * 64, "deal", "D-1", "req-1"),
        (None, None, None, None, None, None),
        ('quote " back\\slash', "żółw 中文", None, "obj\n", "\x01ctl", "€"),
    ],
)
def test_the_bulk_hash_is_the_row_hash_that_verify_recomputes(values: tuple[str | None, ...]) -> None:
    actor, connection, mapping_hash, object_type, record_id, request_id = values
    detail = {"fields": {"b": 1.0, "a": [1.5, None, "ü"]}, "event": "expire"}
    row = {
        "id": 7,
        "at": NOW,
        "kind": "action_queued",
        "connection": connection,
        "object_type": object_type,
        "record_id": record_id,
        "request_id": request_id,
        "actor": actor,
        "mapping_hash": mapping_hash,
        "detail": detail,
        "prev_hash": "f" * 64,
    }
    fast = audit._fast_hash(
        7,
        NOW.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "action_queued",
        audit._canonical_text(detail),
        "f" * 64,
        values,
    )
    assert fast == audit.row_hash(row)


def test_lock_records_takes_the_per_record_lock_that_single_outbox_writers_take(pg_url: str) -> None:
    """One statement for many records, and the same advisory lock as `lock_record`: a
    writer of one of those records waits until the bulk transaction ends."""
    from sqlalchemy import text

    from connector.storage.db import make_engine, make_session_factory
    from connector.storage.outbox import _lock_id, lock_records

    engine = make_engine(pg_url)
    sessions = make_session_factory(engine)
    keys = [("sandbox", "deal", f"D-{n}") for n in range(50)]
    try:
        with sessions() as bulk, sessions() as other:
            lock_records(bulk, reversed(keys))
            taken = other.scalar(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": _lock_id(keys[7])})
            free = other.scalar(
                text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": _lock_id(("sandbox", "deal", "D-other"))}
            )
            assert taken is False and free is True
            bulk.rollback()  # the transaction ends: the lock goes with it
            other.rollback()
            assert (
                other.scalar(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": _lock_id(keys[7])}) is True
            )
    finally:
        engine.dispose()
