"""Import every module that defines tables, so Base.metadata knows them all (for Alembic)."""

from connector.storage import models, sync_state  # noqa: F401
