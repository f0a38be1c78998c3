"""Import every module that defines tables, so Base.metadata knows them all (for Alembic)."""

from connector.directory import models as directory_models  # noqa: F401
from connector.documents import models as document_models  # noqa: F401
from connector.notify import models as notify_models  # noqa: F401
from connector.storage import (  # noqa: F401
    company_models,
    models,
    sync_state,
    timers,
)
from connector.web import models as web_models  # noqa: F401
