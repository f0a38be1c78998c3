"""The database session a command works in."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import click
from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlalchemy.orm import Session

from connector.cli import Context

UNDEFINED_TABLE = "42P01"  # PostgreSQL's SQLSTATE for a missing table


@contextmanager
def command_session(ctx: Context) -> Iterator[Session]:
    """One transaction on DATABASE_URL; a database without our tables says what to run."""
    from connector.storage.db import make_engine, make_session_factory, transaction

    engine = make_engine(ctx.settings.database_url)
    try:
        with transaction(make_session_factory(engine)) as session:
            yield session
    except (OperationalError, ProgrammingError) as exc:
        if "no such table" not in str(exc) and getattr(exc.orig, "sqlstate", None) != UNDEFINED_TABLE:
            raise
        raise click.ClickException(
            "the database has no tables yet (or lacks this version's); run `crm-approvals db upgrade`"
        ) from None
    finally:
        engine.dispose()
