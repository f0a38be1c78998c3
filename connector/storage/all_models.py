"""Import every module that defines tables, so Base.metadata knows them all (for Alembic)."""

from connector.storage import models  # noqa: F401
from connector.web import models as web_models  # noqa: F401
