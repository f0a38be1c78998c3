"""Votes render their write-back templates with no database transaction open, and a request
changed while a vote was being decided is decided again (connector/service/approval_service.py)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from connector.config import Settings
from connector.events import RecordChangeEvent
from connector.runtime import Runtime
from connector.storage.inbox import accept
from tests.webhooks.test_api import World, build_world, error_of, outbox_for


def probe_render(
    world: World, rule_name: str, event: str, field: str, during: Callable[[], Any]
) -> list[Any]:
    """Run `during()` once, while the rule's `event` action renders `field`; returns its result."""
    (spec,) = world.pipeline.mappings.for_object("sandbox", "deal")
    rule = next(r for r in spec.rules if r.name == rule_name)
    renderers = cast(dict[str, Any], rule.actions[event].set)  # type: ignore[index]
    original = renderers[field]
    results: list[Any] = []
    started = threading.Event()

    def probe(variables: Any) -> Any:
        if not started.is_set():  # once: `during` may itself render this action
            started.set()
            results.append(during())
        return original(variables)

    renderers[field] = probe
    return results


def in_another_thread(work: Callable[[], Any], timeout: float = 10) -> Callable[[], Any]:
    """`work` run by another thread; what it returned, or "still blocked" after `timeout`."""

    def run() -> Any:
        done: list[Any] = []
        thread = threading.Thread(target=lambda: done.append(work()), daemon=True)
        thread.start()
        thread.join(timeout)
        return done[0] if done else "still blocked"

    return run


def webhook(n: int) -> RecordChangeEvent:
    return RecordChangeEvent(
        source="sandbox",
        connection="sandbox",
        object_type="deal",
        record_id="D-9",
        event_id=f"probe-{n}",
        occurred_at=datetime.now(UTC),
        dedupe_key=f"sandbox:probe:{n}",
        changed_fields=("amount",),
        values={"amount": 5},
    )


def test_a_vote_renders_its_write_back_while_webhooks_can_still_be_stored(
    tmp_path: Path, settings_factory: Callable[..., Settings], runtime_factory: Callable[[Settings], Runtime]
) -> None:
    """On SQLite every transaction holds the write lock from its start: a webhook stored while
    the vote's template renders proves no transaction is open then."""
    world = build_world(tmp_path, settings_factory, runtime_factory)
    request_id = world.submit()
    world.approve_steps(request_id, "u-mgr", "u-gm")
    stored = probe_render(
        world,
        "big-deal",
        "approve",
        "status",
        in_another_thread(lambda: accept(world.runtime.sessions, [webhook(1)]).accepted, timeout=5),
    )
    response = world.vote("u-fin-1", request_id)
    assert response.status_code == 200, response.get_json()
    assert stored == [1]  # the webhook was stored while the template rendered
    assert [event for event, _ in outbox_for(world.runtime, request_id)] == ["submit", "approve"]


def test_a_request_decided_by_someone_else_while_a_vote_rendered_is_decided_again(
    tmp_path: Path, settings_factory: Callable[..., Settings], runtime_factory: Callable[[Settings], Runtime]
) -> None:
    """u-fin-1's vote approves the request; while its template renders, u-fin-2's vote approves
    it first. u-fin-1's save finds the request changed, decides again on what is there now,
    and is refused as for a closed request, not with a bare version conflict."""
    world = build_world(tmp_path, settings_factory, runtime_factory)
    request_id = world.submit()
    world.approve_steps(request_id, "u-mgr", "u-gm")
    other_vote = probe_render(
        world,
        "big-deal",
        "approve",
        "status",
        in_another_thread(lambda: world.vote("u-fin-2", request_id).status_code),
    )
    error = error_of(world.vote("u-fin-1", request_id), 409, "request_closed")
    assert error["code"] == "request_closed"
    assert other_vote == [200]
    detail = world.get("u-admin", f"/requests/{request_id}").get_json()
    assert detail["status"] == "approved"
    assert [v["approver"] for v in detail["votes"] if v["step_index"] == 2] == ["u-fin-2"]
    assert [event for event, _ in outbox_for(world.runtime, request_id)] == ["submit", "approve"]
