"""/api/v1/dead-letters: admins list (filters, pages), show, retry and discard dead letters;
everyone else and every bad request gets a JSON 4xx."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select

from connector.runtime import Runtime
from connector.storage.db import transaction
from connector.storage.models import DeadLetter
from connector.storage.outbox import enqueue_update, flush
from connector.storage.tokens import create_token
from tests.fakes import MemoryCRM


@dataclass
class Ops:
    runtime: Runtime
    client: FlaskClient
    crm: MemoryCRM
    admin: str
    user: str

    def get(self, path: str, token: str | None = None) -> Any:
        return self.client.get(f"/api/v1/dead-letters{path}", headers=self._auth(token))

    def post(self, path: str, body: Any = None, token: str | None = None, **kwargs: Any) -> Any:
        if body is not None:
            kwargs["json"] = body
        return self.client.post(f"/api/v1/dead-letters{path}", headers=self._auth(token), **kwargs)

    def _auth(self, token: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.admin}"}

    def refuse(self, *record_ids: str, code: str = "FIELD_CUSTOM_VALIDATION_EXCEPTION") -> list[int]:
        for record_id in record_ids:
            self.crm.reject[record_id] = code
            with transaction(self.runtime.sessions) as session:
                enqueue_update(session, "sandbox", "deal", record_id, {"approval_status": "Approved"})
        flush(self.runtime.sessions, self.runtime.adapter)
        with self.runtime.sessions() as session:
            return list(session.scalars(select(DeadLetter.id).order_by(DeadLetter.id)))


@pytest.fixture
def ops(runtime: Runtime, client: FlaskClient) -> Ops:
    crm = MemoryCRM()
    runtime.set_adapter("sandbox", crm)
    with transaction(runtime.sessions) as session:
        admin = create_token(session, "u-admin", "ops", is_admin=True)[1]
        user = create_token(session, "u-rep", "rep")[1]
    return Ops(runtime, client, crm, admin, user)


def test_only_admins_see_dead_letters(ops: Ops) -> None:
    anonymous = ops.client.get("/api/v1/dead-letters")
    assert anonymous.status_code == 401 and anonymous.get_json()["error"]["code"] == "missing_token"
    refused = ops.get("", token=ops.user)
    assert refused.status_code == 403 and refused.get_json()["error"]["code"] == "admin_only"
    assert ops.post("/retry", {"all": True}, token=ops.user).status_code == 403


def test_list_filters_and_pages(ops: Ops) -> None:
    first, second, third = ops.refuse("D-1", "D-2", "D-3")
    ops.refuse("D-4", code="INVALID_FIELD")
    body = ops.get("?limit=2").get_json()
    assert [x["id"] for x in body["dead_letters"]] == [first, second]
    assert (body["count"], body["total"], body["next_offset"]) == (2, 4, 2)
    rest = ops.get("?limit=2&offset=2").get_json()
    assert [x["id"] for x in rest["dead_letters"]] == [third, 4] and rest["next_offset"] is None
    letter = body["dead_letters"][0]
    assert letter["record"]["ref"] == "sandbox:deal:D-1" and letter["state"] == "open"
    assert letter["error"] == {
        "code": "FIELD_CUSTOM_VALIDATION_EXCEPTION",
        "message": "FIELD_CUSTOM_VALIDATION_EXCEPTION on D-1",
        "fields": ["Status"],
    }
    assert ops.get("?code=invalid_field").get_json()["total"] == 1
    assert ops.get("?connection=other").get_json()["total"] == 0
    assert ops.get("?object=DEAL&kind=outbox&newer_than=1h").get_json()["total"] == 4
    assert ops.get("?older_than=1h").get_json()["total"] == 0


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("?limit=0", "invalid_limit"),
        ("?limit=abc", "invalid_limit"),
        ("?offset=-1", "invalid_offset"),
        ("?state=closed", "invalid_state"),
        ("?kind=webhook", "invalid_kind"),
        ("?older_than=soon", "invalid_older_than"),
        ("?conection=sandbox", "unknown_query_parameter"),
    ],
)
def test_bad_list_arguments_get_a_400_saying_what_is_wrong(ops: Ops, query: str, code: str) -> None:
    response = ops.get(query)
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == code


def test_show_one_and_a_missing_one(ops: Ops) -> None:
    [letter_id] = ops.refuse("D-1")
    shown = ops.get(f"/{letter_id}").get_json()
    assert shown["payload"] == {"fields": {"approval_status": "Approved"}, "reason": None}
    missing = ops.get("/999")
    assert missing.status_code == 404 and missing.get_json()["error"]["code"] == "dead_letter_not_found"


def test_retry_one_sends_it_once_after_the_fix(ops: Ops) -> None:
    [letter_id] = ops.refuse("D-1")
    ops.crm.reject.clear()
    dry = ops.post(f"/{letter_id}/retry", {"dry_run": True}).get_json()
    assert dry["dry_run"] is True and dry["results"][0]["action"] == "requeued"
    assert ops.get("").get_json()["total"] == 1  # still open

    result = ops.post(f"/{letter_id}/retry").get_json()["results"][0]
    assert (result["action"], result["record"]) == ("requeued", "sandbox:deal:D-1")
    assert ops.post(f"/{letter_id}/retry").get_json()["results"][0]["action"] == "skipped"
    calls = len(ops.crm.update_calls)
    flush(ops.runtime.sessions, ops.runtime.adapter)  # what the nudged worker does
    flush(ops.runtime.sessions, ops.runtime.adapter)
    assert [[u.record_id for u in call] for call in ops.crm.update_calls[calls:]] == [["D-1"]]
    resolved = ops.get("?state=resolved").get_json()["dead_letters"][0]
    assert (resolved["resolution"], resolved["state"]) == ("retried", "resolved")


def test_retry_many_by_filter_and_discard(ops: Ops) -> None:
    ops.refuse("D-1", "D-2")
    ops.refuse("D-3", code="INVALID_FIELD")
    ops.crm.reject.clear()
    results = ops.post("/retry", {"code": "FIELD_CUSTOM_VALIDATION_EXCEPTION"}).get_json()["results"]
    assert [r["record"] for r in results] == ["sandbox:deal:D-1", "sandbox:deal:D-2"]
    discarded = ops.post("/discard", {"ids": [3]}).get_json()["results"]
    assert discarded[0]["action"] == "discarded"
    assert ops.get("").get_json()["total"] == 0


@pytest.mark.parametrize(
    ("path", "kwargs", "status", "code"),
    [
        ("/retry", {"json": {}}, 400, "no_selection"),
        ("/retry", {"json": {"ids": "1"}}, 400, "invalid_ids"),
        ("/retry", {"json": {"ids": [1], "force": True}}, 400, "unknown_field"),
        ("/retry", {"json": {"all": True, "dry_run": "yes"}}, 400, "invalid_dry_run"),
        ("/retry", {"json": [1, 2]}, 400, "invalid_body"),
        ("/retry", {"data": "ids=1", "content_type": "text/plain"}, 415, "unsupported_content_type"),
        ("/retry", {"data": "{", "content_type": "application/json"}, 400, "malformed_json"),
        ("/1/frobnicate", {}, 404, "unknown_action"),
        ("/77/retry", {}, 404, "dead_letter_not_found"),
    ],
)
def test_bad_actions_get_a_json_4xx(
    ops: Ops, path: str, kwargs: dict[str, Any], status: int, code: str
) -> None:
    ops.refuse("D-1")
    response = ops.post(path, **kwargs)
    assert response.status_code == status, response.get_json()
    assert response.get_json()["error"]["code"] == code
