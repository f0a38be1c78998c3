"""Import every module that defines tables, so Base.metadata knows them all (for Alembic)."""

from connector.directory import models as directory_models  # noqa: F401  (issue 10: people)
from connector.notify import models as notify_models  # noqa: F401  (issue 10: notifications)
from connector.storage import models  # noqa: F401
