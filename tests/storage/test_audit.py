"""The hash-chained audit log on SQLite and real PostgreSQL: the database refuses rewrites,
and `verify` (and `crm-approvals audit verify`) names the first bad row of whatever someone
who dropped the triggers changed, deleted, inserted or cut off."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime
from decimal import Decimal
from enum import IntEnum, StrEnum
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import insert, select, text
from sqlalchemy.exc import DatabaseError

from connector.cli import main
from connector.config import Settings
from connector.runtime import Runtime
from connector.storage import audit
from connector.storage.audit import GENESIS_HASH, ChainHead, chain_head, row_hash, verify
from connector.storage.db import transaction
from connector.storage.migrate import upgrade
from connector.storage.models import AuditEntry

SQLITE_TRIGGERS = (
    "audit_log_no_update",
    "audit_log_no_delete",
    "audit_log_extends_chain",  # checks, refuses a replace and advances the head (migration 0022)
    "audit_chain_head_no_insert",
    "audit_chain_head_no_delete",
    "audit_chain_head_forward",
)
POSTGRES_TRIGGERS = {
    "audit_log_append_only": "audit_log",
    "audit_log_no_truncate": "audit_log",
    "audit_log_extend_chain": "audit_log",
    "audit_chain_head_guard": "audit_chain_head",
    "audit_chain_head_no_truncate": "audit_chain_head",
}


def history(runtime: Runtime) -> None:
    """Six entries in three transactions, with the values JSON and the backends round differently."""
    with transaction(runtime.sessions) as session:
        audit.record(session, "webhook_received", connection="sandbox", object_type="deal", record_id="D-1")
        audit.record(
            session,
            "rule_matched",
            connection="sandbox",
            object_type="deal",
            record_id="D-1",
            mapping_hash="ab" * 32,
            rule="deal-approval",
            amount=Decimal("150000.50"),
            whole=1.0,
            big=1e20,
            small=1.5e-7,
            nested={"list": [1, 2.5, None, True], "text": "Ünïcode ✓"},
            when=date(2026, 12, 31),
        )
    with transaction(runtime.sessions) as session:
        audit.record(session, "vote", request_id="R-1", actor="u-mgr-boris", decision="approve")
        audit.record(session, "transition", request_id="R-1", from_status="pending", to_status="approved")
    with transaction(runtime.sessions) as session:
        audit.record(session, "action_queued", request_id="R-1", fields={"Status": "Approved"})
        audit.record(session, "writeback_result", ok=True, nan=float("nan"))


def drop_triggers(runtime: Runtime) -> None:
    with runtime.engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            for name, table in POSTGRES_TRIGGERS.items():
                conn.execute(text(f"DROP TRIGGER {name} ON {table}"))
        else:
            for name in SQLITE_TRIGGERS:
                conn.execute(text(f"DROP TRIGGER {name}"))


def execute(runtime: Runtime, sql: str, **params: Any) -> None:
    with runtime.engine.begin() as conn:
        conn.execute(text(sql), params)


def row(runtime: Runtime, row_id: int) -> dict[str, Any]:
    with runtime.sessions() as session:
        found = session.execute(select(AuditEntry.__table__).where(AuditEntry.id == row_id)).one()
        return dict(found._mapping)


def forged(runtime: Runtime, row_id: int, prev_hash: str, **changes: Any) -> dict[str, Any]:
    """A row an attacker who knows the algorithm builds: consistent with its own hash."""
    values = {**row(runtime, 1), "id": row_id, "prev_hash": prev_hash, **changes}
    values["row_hash"] = row_hash(values)
    return values


def add_raw(runtime: Runtime, values: dict[str, Any], conflict: str | None = None) -> None:
    """INSERT, or SQLite's INSERT OR <conflict> (e.g. REPLACE), around the application."""
    stmt = insert(AuditEntry.__table__)
    with runtime.engine.begin() as conn:
        conn.execute(stmt.prefix_with(f"OR {conflict}") if conflict else stmt, values)


# --- an honest history verifies ---------------------------------------------------------


def test_a_normal_history_verifies_and_the_head_names_the_last_row(either: Runtime) -> None:
    history(either)
    result = verify(either.sessions)
    assert result.ok, result.problem
    assert result.rows == 6
    with either.sessions() as session:
        ids = list(session.scalars(select(AuditEntry.id).order_by(AuditEntry.id)))
        head = chain_head(session)
    assert ids == [1, 2, 3, 4, 5, 6]  # consecutive: each row is the head id + 1
    assert head == ChainHead(6, row(either, 6)["row_hash"])
    assert row(either, 1)["prev_hash"] == GENESIS_HASH
    assert all(row(either, n)["prev_hash"] == row(either, n - 1)["row_hash"] for n in range(2, 7))
    assert verify(either.sessions, [head, ChainHead(3, row(either, 3)["row_hash"])]).ok  # type: ignore[list-item]


def test_verify_reads_in_pages(either: Runtime) -> None:
    history(either)
    assert verify(either.sessions, page_size=2).rows == 6
    execute(
        either,
        "DROP TRIGGER audit_log_append_only ON audit_log"
        if _pg(either)
        else "DROP TRIGGER audit_log_no_delete",
    )
    execute(either, "DELETE FROM audit_log WHERE id = 5")
    result = verify(either.sessions, page_size=2)
    assert (result.bad_id, result.rows) == (5, 4)


def test_entries_of_a_rolled_back_transaction_or_savepoint_are_not_written(either: Runtime) -> None:
    with pytest.raises(RuntimeError), transaction(either.sessions) as session:
        audit.record(session, "vote", actor="u-1")
        raise RuntimeError("the vote failed")
    with transaction(either.sessions) as session:
        audit.record(session, "vote", actor="kept-before")
        savepoint = session.begin_nested()
        audit.record(session, "vote", actor="rolled-back")
        savepoint.rollback()
        with session.begin_nested():
            audit.record(session, "vote", actor="kept-in-savepoint")
    with either.sessions() as session:
        actors = list(session.scalars(select(AuditEntry.actor).order_by(AuditEntry.id)))
    assert actors == ["kept-before", "kept-in-savepoint"]
    assert verify(either.sessions).ok


def test_concurrent_writers_do_not_fork_the_chain(either: Runtime) -> None:
    errors: list[BaseException] = []

    def write(worker: int) -> None:
        try:
            for n in range(15):
                with transaction(either.sessions) as session:
                    audit.record(session, "vote", actor=f"w{worker}", n=n)
                    audit.record(session, "transition", actor=f"w{worker}", n=n)
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    result = verify(either.sessions)
    assert result.ok, result.problem
    assert result.rows == 120 and result.head is not None and result.head.id == 120


# --- the database refuses rewrites ------------------------------------------------------


def test_update_delete_and_replace_by_id_are_refused(either: Runtime) -> None:
    history(either)
    refused = [
        "UPDATE audit_log SET actor = 'someone else' WHERE id = 3",
        "DELETE FROM audit_log WHERE id = 3",
    ]
    for sql in refused:
        with pytest.raises(DatabaseError, match="append-only"):
            execute(either, sql)
    replacement = {**row(either, 3), "actor": "someone else"}
    with pytest.raises(DatabaseError, match="append-only"):
        if _pg(either):
            with either.engine.begin() as conn:
                from sqlalchemy.dialects.postgresql import insert as pg_insert

                stmt = pg_insert(AuditEntry.__table__).values(replacement)
                conn.execute(
                    stmt.on_conflict_do_update(index_elements=["id"], set_={"actor": "someone else"})
                )
        else:
            add_raw(either, replacement, "REPLACE")
    if not _pg(either):
        for conflict in ("REPLACE", "IGNORE"):
            with pytest.raises(DatabaseError, match="may not replace"):
                add_raw(either, replacement, conflict)
    assert row(either, 3)["actor"] == "u-mgr-boris"
    assert verify(either.sessions).ok


def test_inserts_that_do_not_extend_the_head_are_refused(either: Runtime) -> None:
    history(either)
    head = ChainHead(6, row(either, 6)["row_hash"])
    for values in (
        forged(either, 7, "f" * 64),  # wrong link
        forged(either, 9, head.hash),  # skips ids
    ):
        with pytest.raises(DatabaseError, match="append-only"):
            add_raw(either, values)
    with pytest.raises(DatabaseError, match="append-only"):
        execute(either, "UPDATE audit_chain_head SET last_id = 2")
    with pytest.raises(DatabaseError, match="append-only"):
        execute(either, "DELETE FROM audit_chain_head")
    assert verify(either.sessions).ok


def test_a_multi_row_insert_with_one_row_out_of_chain_lands_no_row(either: Runtime) -> None:
    """SQLite checks each row as it goes in, PostgreSQL the statement's rows at its end
    (migration 0022): either way one bad row in the middle refuses the whole statement and
    leaves the head where it was; the same rows properly chained move it to the last."""
    history(either)
    head = current_head(either)
    assert head is not None
    first = forged(either, 7, head.hash)
    bad = forged(either, 8, "f" * 64)
    after_bad = forged(either, 9, bad["row_hash"])
    with pytest.raises(DatabaseError, match="append-only"), either.engine.begin() as conn:
        conn.execute(insert(AuditEntry.__table__).values([first, bad, after_bad]))
    assert current_head(either) == head
    assert verify(either.sessions).rows == 6
    second = forged(either, 8, first["row_hash"])
    third = forged(either, 9, second["row_hash"])
    with either.engine.begin() as conn:
        conn.execute(insert(AuditEntry.__table__).values([first, second, third]))
    assert current_head(either) == ChainHead(9, third["row_hash"])
    result = verify(either.sessions)
    assert result.ok and result.rows == 9


def current_head(runtime: Runtime) -> ChainHead | None:
    with runtime.sessions() as session:
        return chain_head(session)


@pytest.mark.xdist_group("services")
def test_truncate_is_refused_on_postgres(pg_url: str, runtime_factory: Callable[[Settings], Runtime]) -> None:
    runtime = runtime_factory(Settings(database_url=pg_url))
    history(runtime)
    for table in ("audit_log", "audit_chain_head", "audit_log, audit_chain_head"):
        with pytest.raises(DatabaseError, match="append-only"):
            execute(runtime, f"TRUNCATE {table}")
    assert verify(runtime.sessions).rows == 6


# --- what someone who dropped the triggers did, verify finds ----------------------------


def test_an_update_is_found(either: Runtime) -> None:
    history(either)
    drop_triggers(either)
    execute(either, "UPDATE audit_log SET actor = 'u-gm-carla' WHERE id = 3")
    result = verify(either.sessions)
    assert not result.ok and result.bad_id == 3 and "changed" in (result.problem or "")
    assert result.rows == 2


def test_an_update_with_a_recomputed_hash_is_found(either: Runtime) -> None:
    history(either)
    drop_triggers(either)
    rewritten = {**row(either, 3), "actor": "u-gm-carla"}
    execute(
        either, "UPDATE audit_log SET actor = 'u-gm-carla', row_hash = :h WHERE id = 3", h=row_hash(rewritten)
    )
    result = verify(either.sessions)
    assert result.bad_id == 3 and "rewritten" in (result.problem or "")


def test_a_replace_by_id_is_found(either: Runtime) -> None:
    history(either)
    drop_triggers(either)
    replacement = {**row(either, 3), "detail": {"decision": "reject"}}
    if _pg(either):
        execute(either, "DELETE FROM audit_log WHERE id = 3")
        add_raw(either, replacement)
    else:
        add_raw(either, replacement, "REPLACE")
    assert row(either, 3)["detail"] == {"decision": "reject"}
    result = verify(either.sessions)
    assert result.bad_id == 3 and "changed" in (result.problem or "")


def test_a_delete_is_found(either: Runtime) -> None:
    history(either)
    drop_triggers(either)
    execute(either, "DELETE FROM audit_log WHERE id IN (3, 4)")
    result = verify(either.sessions)
    assert result.bad_id == 3 and "3-4 deleted" in (result.problem or "")
    assert result.rows == 2


def test_deleting_the_first_row_is_found(either: Runtime) -> None:
    history(either)
    drop_triggers(either)
    execute(either, "DELETE FROM audit_log WHERE id = 1")
    assert verify(either.sessions).bad_id == 2


def test_deleting_the_tail_is_found_against_the_recorded_head(either: Runtime) -> None:
    history(either)
    drop_triggers(either)
    execute(either, "DELETE FROM audit_log WHERE id > 4")
    result = verify(either.sessions)
    assert result.bad_id == 6 and "ends at row 4" in (result.problem or "")


def test_emptying_the_log_is_found(either: Runtime) -> None:
    history(either)
    drop_triggers(either)
    if _pg(either):
        execute(either, "TRUNCATE audit_log")
    else:
        execute(either, "DELETE FROM audit_log")
    result = verify(either.sessions)
    assert result.bad_id == 6 and "is empty" in (result.problem or "")


def test_cutting_the_tail_and_rewinding_the_head_is_found_only_against_an_external_anchor(
    either: Runtime,
) -> None:
    history(either)
    anchor = ChainHead(6, row(either, 6)["row_hash"])  # what `audit head` printed to the WORM log
    drop_triggers(either)
    execute(either, "DELETE FROM audit_log WHERE id > 4")
    execute(either, "UPDATE audit_chain_head SET last_id = 4, last_hash = :h", h=row(either, 4)["row_hash"])
    assert verify(either.sessions).ok  # consistent in itself: hence the anchor outside the database
    result = verify(either.sessions, [anchor])
    assert result.bad_id == 6 and "external anchor" in (result.problem or "")


def test_a_rewritten_chain_is_found_against_an_external_anchor(either: Runtime) -> None:
    history(either)
    anchor = ChainHead(6, row(either, 6)["row_hash"])
    drop_triggers(either)
    previous = GENESIS_HASH
    for n in range(1, 7):  # change row 2 and recompute every hash after it, head included
        values = row(either, n)
        if n == 2:
            values["actor"] = "forger"
        values["prev_hash"] = previous
        values["row_hash"] = previous = row_hash(values)
        execute(
            either,
            "UPDATE audit_log SET actor = :actor, prev_hash = :p, row_hash = :h WHERE id = :id",
            actor=values["actor"],
            p=values["prev_hash"],
            h=values["row_hash"],
            id=n,
        )
    execute(either, "UPDATE audit_chain_head SET last_hash = :h", h=previous)
    assert verify(either.sessions).ok
    result = verify(either.sessions, [anchor])
    assert result.bad_id == 6 and "rewritten" in (result.problem or "")


def test_a_row_inserted_at_the_end_is_found(either: Runtime) -> None:
    history(either)
    drop_triggers(either)
    add_raw(
        either, forged(either, 7, row(either, 6)["row_hash"], actor="forger")
    )  # links and hashes correctly
    result = verify(either.sessions)
    assert result.bad_id == 7 and "beyond the chain head" in (result.problem or "")


def test_a_row_inserted_with_a_made_up_hash_is_found(either: Runtime) -> None:
    history(either)
    drop_triggers(either)
    add_raw(either, {**forged(either, 7, row(either, 6)["row_hash"]), "row_hash": "e" * 64})
    assert verify(either.sessions).bad_id == 7


def test_a_row_inserted_into_a_gap_of_old_rows_is_found(tmp_path: Path) -> None:
    """Rows from before the chain keep their ids, gaps included; they are chained by the
    migration, and a row slipped into a gap is named."""
    url = f"sqlite:///{tmp_path}/old.db"
    upgrade(url, "0001")
    runtime = Runtime.from_settings(Settings(database_url=url))
    try:
        at = datetime(2026, 1, 1, 12, 0, 0, 123456, tzinfo=UTC)
        execute(
            runtime,
            "INSERT INTO audit_log (id, at, kind, detail) VALUES (1, :at, 'vote', '{\"n\": 1.0}'), "
            "(3, :at, 'vote', '{}'), (4, :at, 'vote', '{}')",
            at=at.replace(tzinfo=None),
        )
        upgrade(url)
        assert verify(runtime.sessions).rows == 3
        with transaction(runtime.sessions) as session:
            audit.record(session, "vote", actor="after the migration")
        assert row(runtime, 5)["prev_hash"] == row(runtime, 4)["row_hash"]
        assert verify(runtime.sessions).ok
        drop_triggers(runtime)
        add_raw(runtime, forged(runtime, 2, row(runtime, 1)["row_hash"], actor="forger"))
        result = verify(runtime.sessions)
        assert result.bad_id == 2 and "inserted" in (result.problem or "")
    finally:
        runtime.close()


def test_a_deleted_head_row_is_found(either: Runtime) -> None:
    history(either)
    drop_triggers(either)
    execute(either, "DELETE FROM audit_chain_head")
    result = verify(either.sessions)
    assert not result.ok and "chain head" in (result.problem or "")
    with (
        pytest.raises(RuntimeError, match="chain head row is missing"),
        transaction(either.sessions) as session,
    ):
        audit.record(session, "vote")


# --- the commands ------------------------------------------------------------------------


@pytest.fixture
def env_file(tmp_path: Path, runtime: Runtime) -> Iterator[Path]:
    env = tmp_path / "cli.env"
    env.write_text(f"DATABASE_URL={runtime.settings.database_url}\nQUEUE_URL=memory://\n")
    yield env


def cli(env_file: Path, *args: str) -> Any:
    return CliRunner().invoke(main, ["--env-file", str(env_file), "audit", *args])


def test_audit_head_and_verify_commands(runtime: Runtime, env_file: Path) -> None:
    history(runtime)
    head = cli(env_file, "head")
    assert head.exit_code == 0
    anchor = head.stdout.strip()
    assert anchor == f"6:{row(runtime, 6)['row_hash']}"
    ok = cli(env_file, "verify", "--expect-head", anchor)
    assert ok.exit_code == 0 and "intact: 6 rows" in ok.stdout and "1 external anchor" in ok.stdout
    drop_triggers(runtime)
    execute(runtime, "UPDATE audit_log SET actor = 'x' WHERE id = 4")
    bad = cli(env_file, "verify")
    assert bad.exit_code == 1
    assert "TAMPERED at row 4" in bad.stderr and "3 rows before it are intact" in bad.stderr


def test_audit_verify_refuses_a_malformed_anchor(runtime: Runtime, env_file: Path) -> None:
    result = cli(env_file, "verify", "--expect-head", "6:not-a-hash")
    assert result.exit_code == 2 and "ID:HASH" in result.output


def test_audit_commands_on_an_unmigrated_database_say_what_to_run(tmp_path: Path) -> None:
    env = tmp_path / "empty.env"
    env.write_text(f"DATABASE_URL=sqlite:///{tmp_path}/empty.db\n")
    result = CliRunner().invoke(main, ["--env-file", str(env), "audit", "verify"])
    assert result.exit_code == 2 and "crm-approvals db upgrade" in result.output


def _pg(runtime: Runtime) -> bool:
    return runtime.engine.dialect.name == "postgresql"


def test_the_migration_downgrades_to_plain_append_only_and_upgrades_again(either: Runtime) -> None:
    from alembic import command

    from connector.storage.migrate import alembic_config

    history(either)
    url = either.settings.database_url
    command.downgrade(alembic_config(url), "0001")
    with pytest.raises(DatabaseError, match="append-only"):
        execute(either, "DELETE FROM audit_log")
    upgrade(url)
    result = verify(either.sessions)
    assert result.ok and result.rows == 6


def test_an_unknown_entry_kind_is_refused(runtime: Runtime) -> None:
    from connector.storage import audit
    from connector.storage.db import transaction

    with (
        pytest.raises(ValueError, match="unknown audit entry kind 'vote_cast'"),
        transaction(runtime.sessions) as session,
    ):
        audit.record(session, "vote_cast", request_id="r-1")


class _Kind(StrEnum):
    ONE = "one"


class _Level(IntEnum):
    TWO = 2


@pytest.mark.parametrize(
    "detail",
    [
        # plain: written by json.dumps directly
        {"timer": "remind", "step_index": 0, "reason": None, "added": [], "waiting": ("u-1", "żółw")},
        {"b": True, "a": 'quote " back\\slash \x01 中文', "c": ["€", "x"]},
        # not plain: the general path (floats, nested values, non-str keys)
        {"amount": 1.0, "waiting": ["u-1"]},
        {"fields": {"b": 1.0, "a": [1.5, None, "ü"]}},
        {"ids": [1, 2]},
        {3: "three"},
        # plain at any depth: a write-back's fields, outbox ids, an event's changed fields
        {"fields": {"approval_status": "Pending", "n": 3}, "outbox_ids": [1, 2], "ok": True},
        {"changed_fields": ("amount",), "nested": [{"b": [None, ["x"]], "a": {}}]},
        # not plain below the top: dates, sets, subclasses, non-str keys, floats deep down
        {"at": {"received_at": datetime(2026, 12, 1, 4, 5, 6, 7, tzinfo=UTC)}},
        {"who": [{"u-2", "u-1"}]},
        {"kind": [_Kind.ONE], "n": [_Level.TWO, True]},
        {"fields": {1: "one"}},
        {"deep": [[{"x": float("nan")}, {"y": 2.0}]]},
    ],
)
def test_a_plain_detail_gets_the_canonical_text_the_row_hash_uses(detail: dict[Any, Any]) -> None:
    assert audit._canonical_detail(detail) == audit._canonical_text(audit._jsonable(detail))


_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.text(max_size=5), st.floats(allow_nan=True),
    st.datetimes(timezones=st.just(UTC)), st.sampled_from([_Kind.ONE, _Level.TWO]),
)  # fmt: skip
_DETAIL_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(inner, max_size=3).map(tuple),
        st.frozensets(st.text(max_size=3), max_size=3),
        st.dictionaries(st.one_of(st.text(max_size=3), st.integers()), inner, max_size=3),
    ),
    max_leaves=12,
)


@given(st.dictionaries(st.text(max_size=5), _DETAIL_VALUES, max_size=4))
def test_any_detail_gets_the_canonical_text_of_its_jsonable_copy(detail: dict[str, Any]) -> None:
    """`_canonical_detail` skips the copies only where they change nothing, and `_jsonable`
    (run when an entry is recorded) is as idempotent as the commit's second pass assumes."""
    once = audit._jsonable(detail)
    assert audit._jsonable(once) == once  # NaN and infinities are text by now
    assert audit._canonical_detail(once) == audit._canonical_text(audit._jsonable(once))
    assert audit._canonical_detail(detail) == audit._canonical_text(audit._jsonable(detail))


def test_jsonable_copies_containers_and_writes_other_values_as_text() -> None:
    inner = {"a": [1, ("b", None)]}
    detail = {"inner": inner, 2: {"x"}, "at": date(2026, 12, 1), "inf": float("inf"), "k": _Kind.ONE}
    out = audit._jsonable(detail)
    expected = {"inner": {"a": [1, ["b", None]]}, "2": ["x"], "at": "2026-12-01"}
    expected |= {"inf": "inf", "k": _Kind.ONE}
    assert out == expected
    assert out["inner"] is not inner and out["inner"]["a"] is not inner["a"]  # later changes stay out
