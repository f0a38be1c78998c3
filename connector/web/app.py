"""The web app's blueprint with all its pages, for webhooks/app.py to mount."""

from __future__ import annotations

from connector.web import admin_tokens, auth, decide, documents, pages, reports  # noqa: F401  (they add their routes)
from connector.web.blueprint import blueprint

__all__ = ["blueprint"]
