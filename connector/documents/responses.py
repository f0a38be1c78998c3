"""A stored document as an HTTP response, the same from the web app and the API: the PDF shown
inline under its file name, the HTML locked down (no scripts, no fetches, sandboxed), since
its values come from CRM records."""

from __future__ import annotations

from flask import Response

from connector.documents.models import RequestDocument

HTML_POLICY = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; sandbox"


def pdf_response(document: RequestDocument) -> Response:
    return Response(
        document.pdf,
        mimetype="application/pdf",
        headers={"Content-Disposition": f'inline; filename="{document.filename}"'},
    )


def html_response(document: RequestDocument) -> Response:
    return Response(document.html, mimetype="text/html", headers={"Content-Security-Policy": HTML_POLICY})
