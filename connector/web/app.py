"""The web app's blueprint with all its pages, for webhooks/app.py to mount."""

from __future__ import annotations

from connector.web import (  # noqa: F401  (they add their routes)
    admin_tokens,
    auth,
    decide,
    delegations,
    documents,
    pages,
    reports,
)
from connector.web.blueprint import blueprint

__all__ = ["blueprint"]
