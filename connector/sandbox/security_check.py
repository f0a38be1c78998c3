"""The sandbox's security-check service (issue 12, seed 001): the outside verification a
`kind: check` step calls, so the shipped example runs with no third party.

POST /security-check with a JSON body naming the company (`company_id`) answers
`{"verdict": ..., "reason": ...}`. Verdicts are configurable per company: POST
/security-check/verdicts `{"company_id": "C-100", "verdicts": ["more_documents", "clear"]}`
queues answers, used in order (the last one repeats); a company with none queued is "clear".
SANDBOX_SECURITY_VERDICTS="C-100=more_documents,clear;C-200=reject" sets them at start-up.
Requests must carry the bearer token the sandbox API uses (SANDBOX_TOKEN).
"""

from __future__ import annotations

import hmac
import os
import threading
from typing import Any

from flask import Blueprint, abort, current_app, jsonify, request
from flask.typing import ResponseReturnValue

VERDICTS = ("clear", "more_documents", "reject")
REASONS = {
    "clear": "no findings",
    "more_documents": "send the current registry extract and the signed beneficial-owner declaration",
    "reject": "the company is on a sanctions list",
}

security = Blueprint("security_check", __name__)


class VerdictBook:
    """Queued verdicts per company; thread-safe (the sandbox serves threads)."""

    def __init__(self, spec: str = "") -> None:
        self._lock = threading.Lock()
        self._queued: dict[str, list[str]] = {}
        self.calls: list[dict[str, Any]] = []
        for part in filter(None, (p.strip() for p in spec.split(";"))):
            company, _, verdicts = part.partition("=")
            self.set(company.strip(), [v.strip() for v in verdicts.split(",") if v.strip()])

    def set(self, company_id: str, verdicts: list[str]) -> None:
        unknown = [v for v in verdicts if v not in VERDICTS]
        if unknown or not company_id:
            raise ValueError(f"verdicts must be among {', '.join(VERDICTS)}; got {unknown or 'no company'}")
        with self._lock:
            self._queued[company_id] = list(verdicts)

    def next(self, company_id: str) -> str:
        with self._lock:
            queued = self._queued.get(company_id) or []
            if len(queued) > 1:
                return queued.pop(0)
            return queued[0] if queued else "clear"


def book() -> VerdictBook:
    found = current_app.extensions.get("security_check")
    if found is None:
        found = current_app.extensions["security_check"] = VerdictBook(
            os.environ.get("SANDBOX_SECURITY_VERDICTS", "")
        )
    return found


def _authorised() -> None:
    token = current_app.extensions["sandbox"].config.api_token
    given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    if not token or not hmac.compare_digest(given.encode(), token.encode()):
        abort(401, "send the sandbox token: Authorization: Bearer <SANDBOX_TOKEN>")


@security.post("/security-check")
def check() -> ResponseReturnValue:
    _authorised()
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or not str(body.get("company_id") or "").strip():
        return jsonify(error="bad_request", message="send a JSON object with company_id"), 400
    company_id = str(body["company_id"]).strip()
    verdict = book().next(company_id)
    book().calls.append({"company_id": company_id, "verdict": verdict})
    return jsonify(company_id=company_id, verdict=verdict, reason=REASONS[verdict])


@security.post("/security-check/verdicts")
def set_verdicts() -> ResponseReturnValue:
    _authorised()
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or not isinstance(body.get("verdicts"), list):
        return jsonify(error="bad_request", message='send {"company_id": ..., "verdicts": [...]}'), 400
    try:
        book().set(str(body.get("company_id") or "").strip(), [str(v) for v in body["verdicts"]])
    except ValueError as exc:
        return jsonify(error="bad_request", message=str(exc)), 400
    return jsonify(ok=True)
