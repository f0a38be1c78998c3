"""`db.in_keys`: a tuple IN of a batch's record keys, one array per column on PostgreSQL."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event, select

from connector.clock import utcnow
from connector.runtime import Runtime
from connector.storage.db import in_keys, transaction
from connector.storage.models import RecordSnapshot


def test_in_keys_finds_exactly_the_rows_of_the_keys_with_one_statement_text(either: Runtime) -> None:
    with transaction(either.sessions) as session:
        for connection in ("hubspot", "eu"):
            for i in range(60):
                session.add(
                    RecordSnapshot(
                        connection=connection,
                        object_type="deals",
                        record_id=str(i),
                        values={},
                        updated_at=utcnow(),
                    )
                )
    columns = (RecordSnapshot.connection, RecordSnapshot.object_type, RecordSnapshot.record_id)
    seen: list[tuple[str, Any]] = []

    def look(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_args: Any) -> None:
        if "record_snapshots" in statement:
            seen.append((statement, parameters))

    event.listen(either.engine, "before_cursor_execute", look)
    try:
        found = []
        for keys in (
            [("hubspot", "deals", str(i)) for i in range(0, 60, 2)]
            + [("eu", "deals", "7"), ("eu", "tasks", "1")],
            [("hubspot", "deals", "59"), ("nowhere", "deals", "1")],
        ):
            with either.sessions() as session:
                dialect = session.get_bind().dialect.name
                query = select(*columns).where(in_keys(columns, keys, dialect))
                found.append(sorted(tuple(row) for row in session.execute(query)))
    finally:
        event.remove(either.engine, "before_cursor_execute", look)
    expected = sorted([("hubspot", "deals", str(i)) for i in range(0, 60, 2)] + [("eu", "deals", "7")])
    assert found == [expected, [("hubspot", "deals", "59")]]
    if dialect == "postgresql":  # one text, one array per column, whatever the number of keys
        assert seen[0][0] == seen[1][0]
        assert [len(parameters) for _statement, parameters in seen] == [3, 3]
