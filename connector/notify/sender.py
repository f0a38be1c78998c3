"""Sending queued notifications, from the worker only: claim -> send -> settle.

1. Claim: due `pending` rows become `sending` with a claim id and a lease, committed before
   anything is sent, so no other worker sends them meanwhile.
2. Send: render in the recipient's language, then one SMTP or Apprise call per row.
3. Settle: `done`; or `pending` again with a back-off for a failure that may pass; or `dead`
   (plus a dead letter) for one that will not, or after NOTIFY_MAX_ATTEMPTS.

Never twice: a row still `sending` after its lease ran out means the worker stopped between
claiming and settling. SMTP and chat services offer no way to ask "did this arrive?", so the
row is NOT sent again: it becomes a dead letter marked in doubt, for a person to resend
(`crm-approvals notifications retry ID`). The price is that a message can be lost in that
window (between the server's acceptance and our commit, normally milliseconds), never doubled.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session, sessionmaker

from connector.approvals.lifecycle import current_step_state, step_votes
from connector.clock import utcnow
from connector.config import Settings
from connector.directory import Directory, Person
from connector.notify.channels import (
    AppriseTransport,
    ChatTransport,
    EmailTransport,
    RetryLater,
    SmtpTransport,
    Undeliverable,
    build_email,
)
from connector.notify.models import DEAD, DONE, PENDING, SENDING, SKIPPED, Notification
from connector.notify.queue import WAITING_EVENTS, NotificationQueue
from connector.notify.render import LinkProvider, RenderedMessage, TemplateProblem, Templates
from connector.storage import approval_store
from connector.storage.approval_store import StoredRequest
from connector.storage.db import transaction
from connector.storage.inbox import backoff_seconds
from connector.storage.models import DeadLetter

if TYPE_CHECKING:
    from connector.runtime import Runtime

log = logging.getLogger(__name__)


@dataclass
class SendReport:
    sent: int = 0
    retried: int = 0
    dead: int = 0
    skipped: int = 0
    in_doubt: int = 0


class Skip(Exception):
    """Nothing to send (no address, the step closed meanwhile): settled as `skipped`."""


class NotificationSender:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        settings: Settings,
        directory: Directory,
        *,
        email: EmailTransport | None = None,
        chat: ChatTransport | None = None,
        clock: Any = utcnow,
        link_providers: Sequence[LinkProvider] = (),
    ) -> None:
        self.sessions = sessions
        self.settings = settings
        self.notify = settings.notify
        self.directory = directory
        self.templates = Templates(settings.notify.templates_dir)
        self.queue = NotificationQueue(settings)
        self.email = email or SmtpTransport(settings.notify)
        self.chat = chat or AppriseTransport()
        self.clock = clock
        self.link_providers = tuple(link_providers)

    @classmethod
    def from_runtime(cls, runtime: Runtime) -> NotificationSender:
        return cls(
            runtime.sessions,
            runtime.settings,
            Directory.from_runtime(runtime),
            link_providers=runtime.link_providers,
        )

    def send_due(self, limit: int = 100) -> SendReport:
        report = SendReport()
        self.settle_in_doubt(report)
        claim_id, rows = self._claim(limit)
        for row in rows:
            self._deliver(row, claim_id, report)
        return report

    # --- the three phases -----------------------------------------------------------------

    def _claim(self, limit: int) -> tuple[str, list[Notification]]:
        claim_id, now = uuid.uuid4().hex, self.clock()
        with transaction(self.sessions) as session:
            rows = session.scalars(
                select(Notification)
                .where(Notification.status == PENDING)
                .where(or_(Notification.next_attempt_at.is_(None), Notification.next_attempt_at <= now))
                .order_by(Notification.id)
                .limit(limit)
                .with_for_update(skip_locked=True)
            ).all()
            for row in rows:
                row.status, row.claim_id, row.sent_at = SENDING, claim_id, now
                row.lease_expires_at = now + timedelta(seconds=self.notify.lease_seconds)
        return claim_id, list(rows)

    def _deliver(self, row: Notification, claim_id: str, report: SendReport) -> None:
        try:
            self._send(row)
        except Skip as why:
            self._settle(row, claim_id, SKIPPED, str(why), report)
        except RetryLater as exc:
            self._settle(row, claim_id, PENDING, str(exc), report)
        except (Undeliverable, TemplateProblem) as exc:
            self._settle(row, claim_id, DEAD, str(exc), report, code=type(exc).__name__)
        except Exception as exc:  # a bug must not leave the row leased until it looks in doubt
            log.exception("notification %s failed unexpectedly", row.id)
            self._settle(row, claim_id, PENDING, f"{type(exc).__name__}: {exc}", report)
        else:
            self._settle(row, claim_id, DONE, None, report)

    def _settle(
        self,
        claimed: Notification,
        claim_id: str,
        status: str,
        error: str | None,
        report: SendReport,
        code: str | None = None,
    ) -> None:
        now = self.clock()
        with transaction(self.sessions) as session:
            row = session.get(Notification, claimed.id)
            if row is None or row.status != SENDING or row.claim_id != claim_id:
                return  # settled as in doubt meanwhile: leave it so
            row.lease_expires_at, row.last_error = None, (error or None) and error[:2000]
            if status == PENDING:
                row.attempts += 1
                if row.attempts >= self.notify.max_attempts:
                    status, code = DEAD, "too_many_attempts"
                    error = f"gave up after {row.attempts} attempts: {error}"
                    row.last_error = error[:2000]
                else:
                    row.next_attempt_at = now + timedelta(seconds=backoff_seconds(row.attempts))
                    report.retried += 1
                    log.warning("notification %s will be retried: %s", row.id, error)
            elif status == DONE:
                row.attempts += 1
                row.done_at = now
                report.sent += 1
            elif status == SKIPPED:
                row.done_at = now
                report.skipped += 1
            if status == DEAD:
                row.attempts += 0 if code == "too_many_attempts" else 1
                report.dead += 1
                session.add(dead_letter(row, code or "undeliverable", error or "not delivered"))
                log.error("notification %s is a dead letter: %s", row.id, error)
            row.status = status

    def settle_in_doubt(self, report: SendReport) -> None:
        """Rows whose worker stopped mid-send: dead letters in doubt, never sent again."""
        now = self.clock()
        with transaction(self.sessions) as session:
            rows = session.scalars(
                select(Notification)
                .where(Notification.status == SENDING, Notification.lease_expires_at < now)
                .with_for_update(skip_locked=True)
            ).all()
            for row in rows:
                message = (
                    f"in doubt: the worker stopped while sending (claimed {row.sent_at}); it may or may "
                    f"not have arrived, so it is not sent again. Resend with `crm-approvals notifications "
                    f"retry {row.id}`"
                )
                row.status, row.lease_expires_at, row.last_error = DEAD, None, message
                session.add(dead_letter(row, "in_doubt", message))
                report.in_doubt += 1
                log.error("notification %s: %s", row.id, message)

    # --- rendering and sending one row -----------------------------------------------------

    def _send(self, row: Notification) -> None:
        stored = self._request(row)
        person = self.directory.get(row.connection, row.user_id) if row.connection and row.user_id else None
        if row.user_id and person is not None and not person.active and row.target is None:
            raise Skip(f"{row.user_id} is inactive in the CRM")
        if row.event in WAITING_EVENTS and stored is not None:
            self._check_still_waiting(row, stored)
        rendered = self.render(row, stored, person)
        if row.channel == "email":
            address = row.email or (person.email if person is not None else None)
            if not address:
                who = f"{row.user_id} ({row.connection})" if row.user_id else "the recipient"
                raise Skip(f"no e-mail address for {who} in the directory")
            self.email.send(build_email(self.notify, address, rendered, row.dedupe_key))
        else:
            target = row.target or ""
            urls = self.queue.chat_urls(target)
            if not urls:
                raise Skip(f"no chat URLs are configured for {target} any more")
            self.chat.send(urls, rendered.subject, rendered.text, target)

    def render(
        self, row: Notification, stored: StoredRequest | None, person: Person | None
    ) -> RenderedMessage:
        connection_locale = None
        if row.connection and row.connection in self.settings.connections:
            connection_locale = self.settings.connections[row.connection].get("LOCALE")
        shared = row.target is not None and not row.target.startswith("user:")
        reader = None if shared else person
        language = self.templates.language_for(
            reader.locale if reader is not None else row.context.get("locale"),
            connection_locale,
            self.notify.default_locale,
        )
        return self.templates.render(row.template, language, self.context(row, stored, reader))

    def context(
        self, row: Notification, stored: StoredRequest | None, reader: Person | None
    ) -> dict[str, Any]:
        """The template variables (docs/notifications.md lists them)."""
        facts = dict(row.context)
        connection = row.connection or ""

        def name(user_id: str | None) -> str | None:
            return self.directory.display_name(connection, user_id) if user_id else None

        variables: dict[str, Any] = {
            **facts,
            "event": row.event,
            "base_url": self.settings.public_base_url,
            "recipient": _person_variables(reader, row),
            "links": dict(facts.get("links") or {}),
            "actor": {"id": facts.get("actor"), "name": name(facts.get("actor"))}
            if facts.get("actor")
            else None,
            "comment": facts.get("comment"),
        }
        if stored is not None:
            variables["request"] = self._request_variables(stored, facts, name)
            variables["record"] = dict(stored.request.record)
            if (
                row.event in WAITING_EVENTS
                and row.user_id
                and row.target in (None, f"user:{_env(row.user_id)}")
            ):
                step_index = facts.get("step_index")
                for provider in self.link_providers:
                    variables["links"].update(provider(stored.request.id, row.user_id, step_index))
        return variables

    def _request_variables(
        self, stored: StoredRequest, facts: Mapping[str, Any], name: Any
    ) -> dict[str, Any]:
        request = stored.request
        current = current_step_state(request)
        waiting: list[str] = []
        if current is not None and current.status == "pending":
            voted = {v.approver for v in step_votes(request, current)}
            waiting = [a for a in current.approvers if a not in voted]
        index = facts.get("step_index")
        record = request.record
        return {
            "id": request.id,
            "url": f"{self.settings.public_base_url}/app/requests/{request.id}",
            "rule": request.rule_name,
            "status": request.status,
            "title": record.get("name") or stored.record.record_id,
            "amount": record.get("amount"),
            "currency": record.get("currency"),
            "connection": stored.record.connection,
            "object_type": stored.record.object_type,
            "record_id": stored.record.record_id,
            "submitter": request.submitter,
            "submitter_name": name(request.submitter),
            "submitted_at": request.submitted_at,
            "approved_at": request.approved_at,
            "expires_at": request.expires_at,
            "step_label": facts.get("step_label") or (current.name if current is not None else None),
            "step_since": current.entered_at if current is not None else None,
            "step_number": index + 1 if isinstance(index, int) else None,
            "step_count": facts.get("step_count"),
            "waiting_for": [name(user) for user in waiting],
            "changed_fields": list(request.changed_fields),
        }

    def _request(self, row: Notification) -> StoredRequest | None:
        if row.request_id is None:
            return None
        with self.sessions() as session:
            stored = approval_store.load(session, row.request_id)
        if stored is None:
            raise Skip(f"request {row.request_id} no longer exists")
        return stored

    def _check_still_waiting(self, row: Notification, stored: StoredRequest) -> None:
        request, facts = stored.request, row.context
        current = current_step_state(request)
        if (
            current is None
            or current.status != "pending"
            or (current.index, current.round) != (facts.get("step_index"), facts.get("round"))
        ):
            raise Skip("the step closed before this message went out")
        personal = row.user_id and row.target in (None, f"user:{_env(row.user_id)}")
        if personal and any(v.approver == row.user_id for v in step_votes(request, current)):
            raise Skip(f"{row.user_id} already voted on this step")


def _env(text: str) -> str:
    from connector.config import env_name

    return env_name(text)


def _person_variables(person: Person | None, row: Notification) -> dict[str, Any] | None:
    if person is not None:
        return {"id": person.id, "name": person.name, "email": person.email, "locale": person.locale}
    if row.email or row.user_id:
        return {"id": row.user_id, "name": row.context.get("name") or row.user_id or row.email,
                "email": row.email, "locale": row.context.get("locale")}  # fmt: skip
    return None


def dead_letter(row: Notification, code: str, message: str) -> DeadLetter:
    return DeadLetter(
        kind="notification",
        ref_id=row.id,
        connection=row.connection or "-",
        object_type="notification",
        record_id=row.request_id or "-",
        payload={
            "event": row.event,
            "template": row.template,
            "channel": row.channel,
            "user_id": row.user_id,
            "target": row.target,
            "dedupe_key": row.dedupe_key,
        },
        error_code=code,
        error_message=message[:4000],
        error_fields=[],
    )


def sender_of(runtime: Runtime) -> NotificationSender:
    """One sender per runtime, so compiled templates are reused."""
    sender = runtime.__dict__.get("_notification_sender")
    if sender is None:
        sender = runtime.__dict__["_notification_sender"] = NotificationSender.from_runtime(runtime)
    return sender


def sweep(runtime: Runtime) -> dict[str, Any]:
    """The worker's periodic people job: refresh due directories, queue expiry warnings, send."""
    sender = sender_of(runtime)
    refreshed = sender.directory.refresh_due()
    warnings = sender.queue.queue_expiry_warnings(runtime.sessions)
    report = sender.send_due()
    return {"directory": refreshed, "expiry_warnings": warnings, "notifications": vars(report)}


def send_now(runtime: Runtime) -> dict[str, int]:
    """Send what is due (run after every outbox flush: an event or a vote may have queued some)."""
    return vars(sender_of(runtime).send_due())


def requeue(
    sessions: sessionmaker[Session], notification_id: int, now: datetime | None = None
) -> Notification | None:
    """Put a dead (or skipped) notification back in the queue: a person decided to resend it."""
    with transaction(sessions) as session:
        row = session.get(Notification, notification_id)
        if row is None:
            return None
        if row.status in (DEAD, SKIPPED):
            row.status, row.next_attempt_at, row.attempts = PENDING, now or utcnow(), 0
            row.claim_id = row.lease_expires_at = None
            for letter in session.scalars(
                select(DeadLetter).where(DeadLetter.kind == "notification", DeadLetter.ref_id == row.id)
            ):
                letter.resolved_at = now or utcnow()
        return row
