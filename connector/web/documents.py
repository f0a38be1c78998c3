"""A request's documents in the web app: the approval sheet and generated documents as PDF
(shown in the browser) and HTML, for whoever may see the request."""

from __future__ import annotations

from flask.typing import ResponseReturnValue
from werkzeug.exceptions import NotFound

from connector.documents.models import RequestDocument
from connector.documents.responses import html_response, pdf_response
from connector.documents.service import documents_of
from connector.web.blueprint import blueprint, login_required, runtime
from connector.web.pages import load_visible


def visible_document(request_id: str, name: str) -> RequestDocument:
    if "\x00" in request_id or "\x00" in name:  # no such request (and PostgreSQL refuses NUL)
        raise NotFound()
    with runtime().sessions() as session:
        load_visible(session, request_id)  # 404 for whoever may not see the request
        for document in documents_of(session, request_id):
            if document.name == name:
                session.expunge(document)
                return document
    raise NotFound()


@blueprint.get("/requests/<request_id>/documents/<name>.pdf")
@login_required
def document_pdf(request_id: str, name: str) -> ResponseReturnValue:
    return pdf_response(visible_document(request_id, name))


@blueprint.get("/requests/<request_id>/documents/<name>.html")
@login_required
def document_html(request_id: str, name: str) -> ResponseReturnValue:
    return html_response(visible_document(request_id, name))
