"""/api/v1/requests/<id>/documents: a request's approval sheet and generated documents.

    GET /api/v1/requests/<id>/documents              the list: name, title, version, CRM state
    GET /api/v1/requests/<id>/documents/<name>.pdf   the latest version as PDF
    GET /api/v1/requests/<id>/documents/<name>.html  the same as HTML (as the template rendered it)

Anyone who may see the request (its submitter, its approvers, admins) may read its documents;
others get 404 as for the request itself. Docs: docs/documents.md.
"""

from __future__ import annotations

from flask import Blueprint, jsonify, request
from flask.typing import ResponseReturnValue

from connector.documents.models import RequestDocument
from connector.documents.responses import html_response, pdf_response
from connector.documents.service import documents_of
from connector.service.request_query import Viewer, find_request
from webhooks.api import authenticate, caller, on_api_error
from webhooks.errors import WebhookError, bad_request
from webhooks.intake import intake

blueprint = Blueprint("documents_api", __name__, url_prefix="/api/v1/requests/<request_id>/documents")
blueprint.register_error_handler(WebhookError, on_api_error)


@blueprint.before_request
def signed_in() -> None:
    authenticate()
    # No database takes NUL in text (PostgreSQL refuses it): refused as the other routes do.
    for name, value in (request.view_args or {}).items():
        if "\x00" in str(value):
            raise bad_request(f"invalid_{name}", f"`{name}` contains a NUL character")


@blueprint.get("")
def list_documents(request_id: str) -> ResponseReturnValue:
    return jsonify(documents=[_summary(request_id, d) for d in _documents(request_id)])


@blueprint.get("/<name>.pdf")
def document_pdf(request_id: str, name: str) -> ResponseReturnValue:
    return pdf_response(_one(request_id, name))


@blueprint.get("/<name>.html")
def document_html(request_id: str, name: str) -> ResponseReturnValue:
    return html_response(_one(request_id, name))


def _documents(request_id: str) -> list[RequestDocument]:
    token = caller()
    with intake().runtime.sessions() as session:
        if find_request(session, request_id, Viewer(token.user_id, token.is_admin)) is None:
            raise WebhookError(404, "request_not_found", f"no request {request_id!r}, or one you may not see")
        found = documents_of(session, request_id)
        for row in found:
            session.expunge(row)
        return found


def _one(request_id: str, name: str) -> RequestDocument:
    for document in _documents(request_id):
        if document.name == name:
            return document
    raise WebhookError(
        404,
        "document_not_found",
        f"request {request_id!r} has no document {name!r} (yet)",
        f"GET /api/v1/requests/{request_id}/documents lists what it has",
    )


def _summary(request_id: str, document: RequestDocument) -> dict[str, object]:
    base = f"/api/v1/requests/{request_id}/documents/{document.name}"
    return {
        "name": document.name,
        "title": document.title,
        "version": document.version,
        "filename": document.filename,
        "rendered_at": document.rendered_at.isoformat(),
        "crm": {
            "status": document.crm_status,
            "version": document.crm_version,
            "reference": document.crm_ref,
            "error": document.crm_error,
            "attached_at": document.attached_at.isoformat() if document.attached_at else None,
        },
        "pdf": f"{base}.pdf",
        "html": f"{base}.html",
    }
