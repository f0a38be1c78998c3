"""Steps the service runs (issue 12): the external check's call (headers from the environment,
rendered body, time-out), its classification into routes, retries with back-off honouring
Retry-After, the on_failure route, the signed callback, and duplicate checks. HTTP is mocked
with `responses`; our own code runs for real (database, worker job, approval service)."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
import responses
from sqlalchemy import select, update

from connector.clock import utcnow
from connector.notify.models import Notification
from connector.rules import MappingSet
from connector.service import service_steps
from connector.service.pipeline import build_context
from connector.storage import approval_store as store
from connector.storage.approval_store import RecordKey
from connector.storage.company_models import ServiceStepJob
from connector.storage.db import transaction
from connector.wiring import attach_pipeline
from webhooks.checks import sign_callback

VERIFY = "https://verify.example/v1/check"
COMPANY = RecordKey("sandbox", "company", "C-1")

MAPPING = """\
connection: sandbox
object: company
fields:
  name: name
  tax_id: tax_id
  owner: {api: owner_id, type: user}
roles:
  cfo: [u-cfo]
rules:
  - name: company-approval
    steps:
      - name: security-check
        kind: check
        check:
          url: https://verify.example/v1/check
          headers: {Authorization: "Bearer ${VERIFY_TOKEN}"}
          body: '{"name": {{ record.name | tojson }}, "tax_id": {{ record.tax_id | tojson }}}'
          timeout: 5s
          retries: 2
          answer: ANSWER
          callback_secret_env: VERIFY_CALLBACK_SECRET
          wait: 1h
          response:
            verdict: verdict
            reason: result.reason
          routes:
            - when: {verdict: clear}
              then: continue
            - when: {verdict: more_documents}
              then: {back: security-check, message: "More documents: {{ answer.reason }}"}
            - when: {verdict: reject}
              then: {reject: "Security check: {{ answer.reason }}"}
          on_failure: {reject: "The security check could not be completed"}
      - name: cfo
        mode: one
        approvers: [{role: cfo}]
"""


@pytest.fixture
def world(
    tmp_path: Path, settings_factory: Any, runtime_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> Any:
    return make_world(tmp_path, settings_factory, runtime_factory, monkeypatch, "sync")


def make_world(
    tmp_path: Path,
    settings_factory: Any,
    runtime_factory: Any,
    monkeypatch: Any,
    answer: str,
    variables: dict[str, str] | None = None,
    replace_in_mapping: dict[str, str] | None = None,
    **overrides: Any,
) -> Any:
    if variables is None:
        variables = {"VERIFY_TOKEN": "tok-123", "VERIFY_CALLBACK_SECRET": "cb-secret"}
    mappings = tmp_path / "mappings"
    mappings.mkdir()
    text = MAPPING.replace("ANSWER", answer)
    for old, new in (replace_in_mapping or {}).items():
        text = text.replace(old, new)
    (mappings / "company.yaml").write_text(text)
    runtime = runtime_factory(settings_factory(mappings_dir=str(mappings), variables=variables, **overrides))
    loaded = MappingSet.load(mappings)
    assert not loaded.errors, loaded.errors
    attach_pipeline(runtime, loaded)
    return runtime


def submit(runtime: Any) -> str:
    [spec] = runtime.mappings.for_object("sandbox", "company")
    values = {"name": "Acme", "tax_id": "PL123", "owner_id": "u-rep"}
    with transaction(runtime.sessions) as session:
        stored = runtime.approvals.open_for(
            session, COMPANY, spec, spec.rules[0], build_context(spec, values, None, set(values))
        )
    return stored.request.id  # type: ignore[no-any-return]


def load(runtime: Any, request_id: str) -> Any:
    with runtime.sessions() as session:
        return store.load(session, request_id).request


def jobs(runtime: Any) -> list[ServiceStepJob]:
    with runtime.sessions() as session:
        return list(session.scalars(select(ServiceStepJob).order_by(ServiceStepJob.id)))


def make_due(runtime: Any) -> None:
    with transaction(runtime.sessions) as session:
        session.execute(update(ServiceStepJob).values(due_at=utcnow() - timedelta(seconds=1)))


def test_opening_a_check_step_queues_one_job_in_the_same_transaction(world: Any) -> None:
    request_id = submit(world)
    [job] = jobs(world)
    assert (job.request_id, job.step_index, job.round, job.kind, job.status) == (
        request_id,
        0,
        1,
        "check",
        "due",
    )
    assert load(world, request_id).current_step == 0


@responses.activate
def test_clear_answer_continues_to_the_next_step_with_env_headers_and_the_rendered_body(world: Any) -> None:
    responses.post(VERIFY, json={"verdict": "clear", "result": {"reason": "no findings"}})
    request_id = submit(world)
    assert service_steps.run_due(world) == {"ran": 1}
    [call] = responses.calls
    assert call.request.headers["Authorization"] == "Bearer tok-123"
    assert json.loads(call.request.body) == {"name": "Acme", "tax_id": "PL123"}
    request = load(world, request_id)
    assert (request.status, request.current_step) == ("pending", 1)
    approved = [t for t in request.transitions if t.kind == "step_approved"]
    assert approved[0].actor == "service:security-check"
    [job] = jobs(world)
    assert job.status == "done" and "continue" in (job.outcome or "")


@responses.activate
def test_more_documents_sends_back_with_the_message_and_reruns_the_check(world: Any) -> None:
    responses.post(VERIFY, json={"verdict": "more_documents", "result": {"reason": "registry extract"}})
    responses.post(VERIFY, json={"verdict": "clear"})
    request_id = submit(world)
    service_steps.run_due(world)
    request = load(world, request_id)
    sent_back = [t for t in request.transitions if t.kind == "sent_back"]
    assert sent_back[0].comment == "More documents: registry extract"
    assert (request.current_step, request.steps[-1].round) == (0, 2)
    with world.sessions() as session:  # the submitter is told, with the message
        [told] = session.scalars(select(Notification).where(Notification.event == "sent_back")).all()
    assert (told.user_id, told.context["comment"]) == ("u-rep", "More documents: registry extract")
    service_steps.run_due(world)  # the re-opened round has its own job
    assert load(world, request_id).current_step == 1
    assert [(j.round, j.status) for j in jobs(world)] == [(1, "done"), (2, "done")]


@responses.activate
def test_reject_answer_rejects_with_the_reason(world: Any) -> None:
    responses.post(VERIFY, json={"verdict": "reject", "result": {"reason": "sanctions list"}})
    request_id = submit(world)
    service_steps.run_due(world)
    request = load(world, request_id)
    assert request.status == "rejected"
    assert request.transitions[-1].comment == "Security check: sanctions list"


@responses.activate
def test_an_unclassified_answer_takes_on_failure(world: Any) -> None:
    responses.post(VERIFY, json={"verdict": "maybe"})
    request_id = submit(world)
    service_steps.run_due(world)
    assert load(world, request_id).transitions[-1].comment == "The security check could not be completed"


@responses.activate
def test_503_is_retried_after_retry_after_then_the_answer_is_used(world: Any) -> None:
    responses.post(VERIFY, status=503, headers={"Retry-After": "120"})
    responses.post(VERIFY, json={"verdict": "clear"})
    request_id = submit(world)
    before = utcnow()
    service_steps.run_due(world)
    [job] = jobs(world)
    assert (job.status, job.attempts) == ("due", 1)
    assert timedelta(seconds=115) < job.due_at - before < timedelta(seconds=125)
    assert "HTTP 503" in (job.last_error or "")
    assert service_steps.run_due(world) == {"ran": 0}  # not due yet: nothing is called
    assert len(responses.calls) == 1
    make_due(world)
    service_steps.run_due(world)
    assert load(world, request_id).current_step == 1


@responses.activate
def test_time_outs_are_retried_with_back_off_then_on_failure(world: Any) -> None:
    responses.post(VERIFY, body=requests.Timeout("slow"))
    request_id = submit(world)
    delays = []
    for _ in range(3):  # retries: 2 -> three attempts in all
        make_due(world)
        before = utcnow()
        service_steps.run_due(world)
        job = jobs(world)[0]
        if job.status == "due":
            delays.append(round((job.due_at - before).total_seconds()))
    assert delays == [2, 4]
    request = load(world, request_id)
    assert request.status == "rejected"
    assert request.transitions[-1].comment == "The security check could not be completed"
    assert "no answer from verify.example within 5 s" in (jobs(world)[0].outcome or "")


def test_backoff_honours_retry_after_and_caps() -> None:
    assert service_steps.backoff(0, None) == 2 and service_steps.backoff(3, None) == 16
    assert service_steps.backoff(0, 30) == 30 and service_steps.backoff(20, None) == 3600


def test_a_missing_secret_names_the_variable_and_never_calls(
    tmp_path: Path,
    settings_factory: Any,
    runtime_factory: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    world = make_world(tmp_path, settings_factory, runtime_factory, monkeypatch, "sync", variables={})
    submit(world)
    with responses.RequestsMock() as rsps:  # any call would fail the test: none is registered
        service_steps.run_due(world)
        assert len(rsps.calls) == 0
    [job] = jobs(world)
    assert job.status == "due" and job.lease_until is not None  # left for the sweep after its lease
    assert "environment variable VERIFY_TOKEN is not set" in caplog.text
    assert "ConfigError: environment variable VERIFY_TOKEN is not set" in (job.last_error or "")


@responses.activate
def test_callback_answer_is_verified_and_applied(
    tmp_path: Path,
    settings_factory: Any,
    runtime_factory: Any,
    app_factory: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runtime = make_world(tmp_path, settings_factory, runtime_factory, monkeypatch, "callback")
    responses.post(VERIFY, status=202, json={"queued": True})
    request_id = submit(runtime)
    service_steps.run_due(runtime)
    [job] = jobs(runtime)
    assert job.status == "awaiting" and job.deadline_at is not None
    assert (
        responses.calls[0].request.headers["X-Callback-Url"].endswith(f"/webhooks/checks/{job.callback_id}")
    )
    client = app_factory(runtime).test_client()
    body = json.dumps({"verdict": "clear"}).encode()
    now = int(time.time())
    url = f"/webhooks/checks/{job.callback_id}"

    def post(signature: str, timestamp: int = now, data: bytes = body) -> Any:
        headers = {"X-Check-Timestamp": str(timestamp), "X-Check-Signature": signature}
        return client.post(url, data=data, headers=headers, content_type="application/json")

    assert post(sign_callback("wrong", now, body)).status_code == 401
    assert post(sign_callback("cb-secret", now - 3600, body), now - 3600).status_code == 401
    assert post(sign_callback("cb-secret", now, b'{"verdict": "reject"}')).status_code == 401
    assert load(runtime, request_id).current_step == 0
    answer = post(sign_callback("cb-secret", now, body))
    assert answer.status_code == 202, answer.get_json()
    assert load(runtime, request_id).current_step == 1
    reject = b'{"verdict": "reject"}'
    again = post(sign_callback("cb-secret", now, reject), data=reject)  # a redelivery decides nothing
    assert (again.status_code, again.get_json().get("accepted")) == (200, False), again.get_json()
    assert load(runtime, request_id).status == "pending"
    assert post(sign_callback("wrong", now, body)).status_code == 401  # still verified first
    assert client.post("/webhooks/checks/nope", data=body).status_code == 404


@responses.activate
def test_a_silent_callback_takes_on_failure_after_the_wait(
    tmp_path: Path, settings_factory: Any, runtime_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = make_world(tmp_path, settings_factory, runtime_factory, monkeypatch, "callback")
    responses.post(VERIFY, status=202)
    request_id = submit(runtime)
    service_steps.run_due(runtime)
    assert service_steps.run_due(runtime) == {"ran": 0}  # waiting, deadline not reached
    with transaction(runtime.sessions) as session:
        session.execute(update(ServiceStepJob).values(deadline_at=utcnow() - timedelta(seconds=1)))
    service_steps.run_due(runtime)
    request = load(runtime, request_id)
    assert request.status == "rejected"
    assert jobs(runtime)[0].outcome == "no answer before the deadline"


def test_check_variables_come_from_the_environment_over_dotenv(tmp_path: Path) -> None:
    from connector.config import Settings

    dotenv = tmp_path / ".env"
    dotenv.write_text("VERIFY_TOKEN=from-dotenv\nVERIFY_URL=https://verify.example\n")
    settings = Settings.from_env(environ={"VERIFY_TOKEN": "from-env"}, dotenv_path=str(dotenv))
    assert service_steps.expand("${VERIFY_URL}/v1 ${VERIFY_TOKEN}", settings.variables) == (
        "https://verify.example/v1 from-env"
    )
    assert "from-env" not in repr(settings)  # never in logs or error pages
    with pytest.raises(Exception, match="environment variable NOPE is not set"):
        service_steps.expand("${NOPE}", settings.variables)


@responses.activate
def test_a_message_template_the_answer_cannot_fill_still_applies_the_verdict(
    tmp_path: Path, settings_factory: Any, runtime_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the fuzz test: a verified answer without a field the route's message reads was a
    500 on the callback endpoint (and an exception in the worker's sync path)."""
    runtime = make_world(
        tmp_path,
        settings_factory,
        runtime_factory,
        monkeypatch,
        "sync",
        replace_in_mapping={"{{ answer.reason }}": "{{ answer.undeclared_field }}"},
    )
    responses.post(VERIFY, json={"verdict": "reject"})
    request_id = submit(runtime)
    service_steps.run_due(runtime)
    request = load(runtime, request_id)
    assert request.status == "rejected"
    with runtime.sessions() as session:
        comments = [t.comment or "" for t in store.load(session, request_id).request.transitions]
    assert any("the route's message could not be written" in c and "undeclared_field" in c for c in comments)
