"""Steps the service runs itself (issue 12): `kind: check` asks an external HTTP service,
`kind: duplicate` asks the CRM whether another record holds the same value.

Durability is the outbox's: when such a step opens, a job row is written in the same
transaction (`queue_jobs`, an after-save hook of the approval service). The worker
(`run_due`, a flush and sweep job) claims due jobs with a lease in a short transaction,
makes the call with NO transaction open (never while holding SQLite's write lock), then saves
the verdict with the request in one short transaction. A failing call (time-out, 429, 5xx,
connection error) is tried again with exponential back-off honouring Retry-After, up to the
step's `retries`; then the step's `on_failure` route is taken. An `answer: callback` check
waits for a signed POST on /api/v1/checks/<callback id> (`accept_callback`) until `wait`
has passed, then takes `on_failure`.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import requests
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from connector.approvals.errors import ApprovalError
from connector.approvals.lifecycle import ApprovalRequest, Outcome, current_step_state, route_step
from connector.approvals.spec import (
    DuplicateCheck,
    EvalContext,
    HttpCheck,
    MappingSpec,
    Route,
    RuleSpec,
)
from connector.clock import utcnow
from connector.config import ConfigError
from connector.errors import CrmApprovalsError, FatalError
from connector.rules.templating import TemplateRenderError
from connector.storage.approval_store import StoredRequest
from connector.storage.company_models import JOB_AWAITING, JOB_DONE, JOB_DUE, ServiceStepJob
from connector.storage.db import transaction

if TYPE_CHECKING:
    from connector.runtime import Runtime
    from connector.service.approval_service import ApprovalService

log = logging.getLogger(__name__)
LEASE = timedelta(minutes=5)  # a worker that dies mid-call leaves the job to another after this
BACKOFF_BASE = 2.0  # seconds: 2, 4, 8, ... between attempts
BACKOFF_MAX = 3600.0
DUPLICATE_RETRIES = 4  # a CRM that cannot be asked: 5 attempts in all, then on_failure
MAX_ANSWER_BYTES = 256 * 1024


class CallbackRefused(FatalError):
    """A callback for an unknown, finished or mismatched check."""

    code = "callback_refused"


@dataclass(frozen=True)
class Verdict:
    route: Route
    message: str | None
    note: str  # what happened, for the job row and the history


@dataclass(frozen=True)
class RetryLater:
    error: str
    retry_after: float | None


# --- queueing (after-save hook, in the request's transaction) -----------------------------


def queue_jobs(
    session: Session, stored: StoredRequest, spec: MappingSpec, rule: RuleSpec, outcome: Outcome
) -> None:
    """A service step that just opened gets its job row, in the same transaction."""
    added = False
    for row in outcome.steps:
        if row.status != "pending" or row.index >= len(rule.steps):
            continue
        step = rule.steps[row.index]
        if step.service is None:
            continue
        added = True
        now = utcnow()
        session.add(
            ServiceStepJob(
                request_id=row.request_id,
                step_index=row.index,
                round=row.round,
                kind=step.service.kind,
                status=JOB_DUE,
                attempts=0,
                due_at=now,
                callback_id=secrets.token_urlsafe(24),
                created_at=now,
                updated_at=now,
            )
        )
    if added:  # no flush for nothing: it would write a batch's buffered rows early
        session.flush()


# --- running (worker) -------------------------------------------------------------------------


def run_due(runtime: Runtime, limit: int = 20) -> dict[str, int]:
    """Run every due job once; safe in any number of workers (each job is leased)."""
    approvals = runtime.approvals
    if approvals is None:
        return {}
    done = 0
    for job_id in _claim(runtime.sessions, limit):
        try:
            _run_one(runtime, approvals, job_id)
            done += 1
        except Exception as exc:  # one broken job must not stop the others; its lease lapses, it runs again
            log.exception("service step job %s failed", job_id)
            _note_error(runtime.sessions, job_id, exc)
    return {"ran": done}


def _claim(sessions: sessionmaker[Session], limit: int) -> list[int]:
    now = utcnow()
    with transaction(sessions) as session:
        ids = list(
            session.scalars(
                select(ServiceStepJob.id)
                .where(
                    or_(
                        (ServiceStepJob.status == JOB_DUE) & (ServiceStepJob.due_at <= now),
                        (ServiceStepJob.status == JOB_AWAITING) & (ServiceStepJob.deadline_at <= now),
                    )
                )
                .where(or_(ServiceStepJob.lease_until.is_(None), ServiceStepJob.lease_until <= now))
                .order_by(ServiceStepJob.due_at)
                .limit(limit)
            )
        )
        claimed = []
        for job_id in ids:  # the lease is a conditional update: a second worker gets rowcount 0
            result = session.execute(
                update(ServiceStepJob)
                .where(ServiceStepJob.id == job_id)
                .where(or_(ServiceStepJob.lease_until.is_(None), ServiceStepJob.lease_until <= now))
                .values(lease_until=now + LEASE)
            )
            if result.rowcount == 1:  # type: ignore[attr-defined]
                claimed.append(job_id)
    return claimed


def _run_one(runtime: Runtime, approvals: ApprovalService, job_id: int) -> None:
    with runtime.sessions() as session:
        job = session.get(ServiceStepJob, job_id)
        assert job is not None
        request_id, index, round_, status = job.request_id, job.step_index, job.round, job.status
        attempts, callback_id = job.attempts, job.callback_id
        stored, spec, rule = approvals.load(session, request_id)
    if not _is_open(stored.request, index, round_):
        _finish(runtime.sessions, job_id, "the step was decided meanwhile; answer not needed")
        return
    step = rule.steps[index].service
    verdict: Verdict | None
    if status == JOB_AWAITING:  # the callback never came
        assert isinstance(step, HttpCheck)
        note = "no answer before the deadline"
        verdict = Verdict(step.on_failure, _message(step.on_failure, stored.request, {}), note)
    elif isinstance(step, DuplicateCheck):
        found = check_duplicate(runtime, stored, spec, step)
        verdict = _settle(
            runtime, job_id, found, attempts, DUPLICATE_RETRIES, step.on_failure, stored.request
        )
    else:
        assert isinstance(step, HttpCheck)
        callback_url = _callback_url(runtime, callback_id)
        answer = call_service(step, stored.request, runtime.settings.variables, callback_url=callback_url)
        if isinstance(answer, RetryLater):
            verdict = _settle(
                runtime, job_id, answer, attempts, step.retries, step.on_failure, stored.request
            )
        elif step.answer == "callback" and answer["status"] < 400:  # accepted; the verdict comes later
            _await(runtime.sessions, job_id, step.wait)
            return
        else:
            verdict = classify(step, answer, stored.request)
    if verdict is None:
        return
    apply_verdict(approvals, runtime.sessions, job_id, request_id, index, round_, verdict)


def _settle(
    runtime: Runtime,
    job_id: int,
    result: Verdict | RetryLater,
    attempts: int,
    retries: int,
    on_failure: Route,
    request: ApprovalRequest,
) -> Verdict | None:
    """A verdict as it is; a failure retried later (None) or, out of retries, on_failure."""
    if isinstance(result, Verdict):
        return result
    if attempts < retries:
        delay = backoff(attempts, result.retry_after)
        with transaction(runtime.sessions) as session:
            session.execute(
                update(ServiceStepJob)
                .where(ServiceStepJob.id == job_id)
                .values(
                    attempts=attempts + 1,
                    due_at=utcnow() + timedelta(seconds=delay),
                    lease_until=None,
                    last_error=result.error[:2000],
                    updated_at=utcnow(),
                )
            )
        return None
    note = f"failed after {attempts + 1} attempt(s): {result.error}"
    return Verdict(on_failure, _message(on_failure, request, {}) or note, note)


def backoff(attempts: int, retry_after: float | None) -> float:
    """Seconds before the next attempt: the service's Retry-After when it sent one, else 2^n."""
    if retry_after is not None:
        return min(max(retry_after, 0.0), BACKOFF_MAX)
    return min(BACKOFF_BASE * (2**attempts), BACKOFF_MAX)


def apply_verdict(
    approvals: ApprovalService,
    sessions: sessionmaker[Session],
    job_id: int,
    request_id: str,
    index: int,
    round_: int,
    verdict: Verdict,
    answer: Mapping[str, Any] | None = None,
) -> None:
    """Save the verdict with the request (and the job's end) in one short transaction."""
    step_name = ""

    def decide(request: ApprovalRequest, spec: MappingSpec, rule: RuleSpec) -> Outcome:
        nonlocal step_name
        step_name = rule.steps[index].name
        return route_step(
            request,
            rule,
            spec.roles,
            step_index=index,
            step_round=round_,
            route=verdict.route,
            message=verdict.message,
            actor=f"service:{step_name}",
            now=approvals.clock(),
        )

    def also(session: Session) -> None:
        _mark_done(session, job_id, verdict.note, answer)

    try:
        approvals.decide_and_save(sessions, request_id, decide, also)
    except ApprovalError as exc:  # decided meanwhile (an admin's override): the answer is moot
        _finish(sessions, job_id, f"not applied: {exc}")


def _is_open(request: ApprovalRequest, index: int, round_: int) -> bool:
    row = current_step_state(request)
    return request.status == "pending" and row is not None and row.index == index and row.round == round_


def _note_error(sessions: sessionmaker[Session], job_id: int, exc: Exception) -> None:
    """Keep why the job is stuck on its row (e.g. a variable not set), for people to read."""
    text = f"{type(exc).__name__}: {exc}" if isinstance(exc, CrmApprovalsError) else type(exc).__name__
    try:
        with transaction(sessions) as session:
            session.execute(
                update(ServiceStepJob).where(ServiceStepJob.id == job_id).values(last_error=text[:2000])
            )
    except Exception:  # the database itself is down: the log line above is what remains
        log.exception("could not record the error of service step job %s", job_id)


def _finish(sessions: sessionmaker[Session], job_id: int, note: str) -> None:
    with transaction(sessions) as session:
        _mark_done(session, job_id, note, None)


def _mark_done(session: Session, job_id: int, note: str, answer: Mapping[str, Any] | None) -> None:
    values: dict[str, Any] = {
        "status": JOB_DONE,
        "outcome": note[:2000],
        "lease_until": None,
        "updated_at": utcnow(),
    }
    if answer is not None:
        values["answer"] = dict(answer)
    session.execute(update(ServiceStepJob).where(ServiceStepJob.id == job_id).values(**values))


def _await(sessions: sessionmaker[Session], job_id: int, wait: timedelta) -> None:
    with transaction(sessions) as session:
        session.execute(
            update(ServiceStepJob)
            .where(ServiceStepJob.id == job_id)
            .values(status=JOB_AWAITING, deadline_at=utcnow() + wait, lease_until=None, updated_at=utcnow())
        )


def _callback_url(runtime: Runtime, callback_id: str) -> str:
    base = runtime.settings.public_base_url.rstrip("/")
    return f"{base}/webhooks/checks/{callback_id}"


# --- the external call --------------------------------------------------------------------------


def call_service(
    step: HttpCheck, request: ApprovalRequest, variables: Mapping[str, str], *, callback_url: str = ""
) -> dict[str, Any] | RetryLater:
    """One call: the answer (JSON object + `status`), or RetryLater for a failure worth retrying.
    A 4xx other than 408/429 is the service's final word: it is classified like any answer."""
    url = expand(step.url, variables)
    headers = {"Accept": "application/json", **{n: expand(v, variables) for n, v in step.headers.items()}}
    body: bytes | None = None
    if step.body is not None:
        rendered = step.body(
            {"record": dict(request.record), "request": {"id": request.id, "record_ref": request.record_ref}}
        )
        text = rendered if isinstance(rendered, str) else json.dumps(rendered, default=str)
        body = text.encode()
        headers["Content-Type"] = "application/json"
    if step.answer == "callback" and callback_url:
        headers["X-Callback-Url"] = callback_url
    try:
        response = requests.request(
            step.method,
            url,
            data=body,
            headers=headers,
            timeout=step.timeout.total_seconds(),
            allow_redirects=False,
        )
    except requests.Timeout:
        return RetryLater(f"no answer from {_host(url)} within {step.timeout.total_seconds():g} s", None)
    except requests.RequestException as exc:
        return RetryLater(f"could not reach {_host(url)}: {type(exc).__name__}", None)
    if response.status_code in (408, 429) or response.status_code >= 500:
        return RetryLater(f"{_host(url)} answered HTTP {response.status_code}", _retry_after(response))
    return {"status": response.status_code, **_json_object(response)}


def classify(step: HttpCheck, answer: Mapping[str, Any], request: ApprovalRequest) -> Verdict:
    """The first route whose criteria match the answer; none matches -> on_failure."""
    values = {name: _dig(answer, spec.api_name) for name, spec in step.response.items()}
    now = utcnow()
    ctx = EvalContext(values=values, previous=None, changed_fields=frozenset(), today=now.date(), now=now)
    for rule in step.routes:
        if rule.when(ctx):
            return Verdict(rule.route, _message(rule.route, request, values), _describe(rule.route, values))
    note = f"no route matched the answer {json.dumps(values, default=str)[:300]}"
    return Verdict(step.on_failure, _message(step.on_failure, request, values) or note, note)


def _describe(route: Route, values: Mapping[str, Any]) -> str:
    where = f" to {route.to}" if route.to else ""
    return f"{route.action}{where} (answer {json.dumps(values, default=str)[:300]})"


def _message(
    route: Route,
    request: ApprovalRequest,
    answer: Mapping[str, Any],
    duplicate: Mapping[str, Any] | None = None,
) -> str | None:
    if route.message is None:
        return None
    try:
        value = route.message(
            {"record": dict(request.record), "answer": dict(answer), "duplicate": dict(duplicate or {})}
        )
    except TemplateRenderError as exc:
        # e.g. an answer without a field the admin's message reads: the verdict still stands
        return f"{route.action}: the route's message could not be written ({exc})"
    return None if value is None else str(value)


def _dig(answer: Mapping[str, Any], path: str) -> Any:
    value: Any = answer
    for part in path.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _json_object(response: requests.Response) -> dict[str, Any]:
    if len(response.content) > MAX_ANSWER_BYTES:
        return {}
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _retry_after(response: requests.Response) -> float | None:
    raw = response.headers.get("Retry-After")
    if not raw:
        return None
    if raw.strip().isdigit():
        return float(raw.strip())
    try:
        return max((parsedate_to_datetime(raw) - utcnow()).total_seconds(), 0.0)
    except (TypeError, ValueError):
        return None


def expand(text: str, variables: Mapping[str, str]) -> str:
    """`${NAME}` -> the variable's value (Settings.variables: the environment over .env), so
    secrets live in env/.env, never in mapping files."""

    def value(match: re.Match[str]) -> str:
        found = variables.get(match.group(1))
        if not found:
            raise ConfigError(
                f"environment variable {match.group(1)} is not set; a check step's mapping uses it "
                "(set it in the environment or .env)"
            )
        return found

    return ENV_REFERENCE.sub(value, text)


ENV_REFERENCE = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")


def _host(url: str) -> str:
    return urlsplit(url).netloc or "the service"


# --- duplicates ---------------------------------------------------------------------------------


def check_duplicate(
    runtime: Runtime, stored: StoredRequest, spec: MappingSpec, step: DuplicateCheck
) -> Verdict | RetryLater:
    value = stored.request.record.get(step.field)
    if value in (None, ""):
        return Verdict(Route("continue"), None, f"`{step.field}` is empty; nothing to compare")
    api_name = spec.fields[step.field].api_name
    adapter = runtime.adapter(stored.record.connection)
    try:
        others = adapter.find_duplicates(
            stored.record.object_type, api_name, value, exclude_id=stored.record.record_id
        )
    except FatalError:
        raise
    except Exception as exc:
        return RetryLater(f"the CRM could not be asked for duplicates: {exc}", None)
    if not others:
        return Verdict(
            Route("continue"), None, f"no other {stored.record.object_type} has {step.field} {value}"
        )
    other = others[0]
    details = {
        "value": value,
        "field": step.field,
        "other": other.record_id,
        "other_name": other.name or other.record_id,
    }
    default = (
        f"{step.field} {value} is already used by {stored.record.object_type} "
        f"{other.name + ' ' if other.name else ''}({other.record_id})"
    )
    route = Route("reject", None, step.message)
    message = _message(route, stored.request, {}, details) or default
    return Verdict(route, message, default)


# --- asynchronous answers (the signed callback endpoint, webhooks/checks.py) -----------------


@dataclass(frozen=True)
class PendingCallback:
    """What the endpoint needs to verify a callback before reading it."""

    job_id: int
    request_id: str
    step_index: int
    round: int
    secret_env: str
    step: HttpCheck
    done: bool = False  # answered (or timed out) already: a verified redelivery changes nothing


CALLBACK_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def pending_callback(runtime: Runtime, callback_id: str) -> PendingCallback:
    """The job this callback answers; CallbackRefused when there is none."""
    approvals = runtime.approvals
    if approvals is None:
        raise CallbackRefused("this server does not run approvals")
    # ids are secrets.token_urlsafe(24); anything else (a NUL, which PostgreSQL refuses in a
    # query, or an over-long id) names no check, and must not reach the database
    if not CALLBACK_ID.fullmatch(callback_id):
        raise CallbackRefused("no check has this callback id")
    with runtime.sessions() as session:
        job = session.scalar(select(ServiceStepJob).where(ServiceStepJob.callback_id == callback_id))
        if job is None:
            raise CallbackRefused("no check has this callback id")
        stored, _spec, rule = approvals.load(session, job.request_id)
    step = rule.steps[job.step_index].service if job.step_index < len(rule.steps) else None
    if not isinstance(step, HttpCheck) or step.answer != "callback" or step.callback_secret_env is None:
        raise CallbackRefused("this check does not take answers by callback")
    return PendingCallback(
        job.id,
        job.request_id,
        job.step_index,
        job.round,
        step.callback_secret_env,
        step,
        job.status == JOB_DONE,
    )


def accept_callback(runtime: Runtime, pending: PendingCallback, answer: Mapping[str, Any]) -> str:
    """Classify a verified answer and apply it; returns what happened."""
    approvals = runtime.approvals
    assert approvals is not None
    with runtime.sessions() as session:
        stored, _spec, _rule = approvals.load(session, pending.request_id)
    if not _is_open(stored.request, pending.step_index, pending.round):
        _finish(runtime.sessions, pending.job_id, "the step was decided meanwhile; answer not needed")
        return "the step was already decided; answer recorded as not needed"
    verdict = classify(pending.step, {"status": 200, **answer}, stored.request)
    apply_verdict(
        approvals,
        runtime.sessions,
        pending.job_id,
        pending.request_id,
        pending.step_index,
        pending.round,
        verdict,
        answer,
    )
    return verdict.note
