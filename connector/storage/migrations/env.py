"""Alembic environment: the URL comes from the caller (crm-approvals db upgrade), never a file."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

import connector.storage.all_models  # noqa: F401  registers every table on Base.metadata
from connector.storage.db import Base, make_engine

config = context.config


def run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite cannot ALTER most things
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    run(connection)
else:
    engine = make_engine(config.get_main_option("sqlalchemy.url") or "")
    with engine.connect() as conn:
        run(conn)
    engine.dispose()
