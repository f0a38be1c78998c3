"""Documents need WeasyPrint, which needs pango (Debian: libpango-1.0-0, `make pdf-deps`)."""

from __future__ import annotations

import os

import pytest


def require_weasyprint() -> None:
    try:
        from weasyprint import HTML

        HTML(string="<p>probe</p>").write_pdf()
    except (ImportError, OSError) as exc:
        reason = f"WeasyPrint cannot render here ({exc}); install pango: `make pdf-deps` (root)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; under CI=true the document tests must run")
        pytest.skip(reason)


@pytest.fixture(autouse=True)
def _weasyprint() -> None:
    require_weasyprint()
