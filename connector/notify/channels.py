"""Delivery channels: e-mail over SMTP (stdlib smtplib) and chat/SMS through Apprise URLs.

A channel raises RetryLater for failures that may pass (the server is down, a 4xx SMTP
reply, Apprise could not deliver) and Undeliverable for ones that will not (a 5xx SMTP
reply, an invalid Apprise URL). Error texts never contain a URL or a password.
"""

from __future__ import annotations

import hashlib
import smtplib
import ssl
from collections.abc import Sequence
from email.message import EmailMessage
from email.utils import formatdate
from typing import Protocol

from connector.config import NotifySettings
from connector.notify.render import RenderedMessage


class SendError(Exception):
    pass


class RetryLater(SendError):
    """Not delivered this time; try again after a back-off."""


class Undeliverable(SendError):
    """Will never be delivered as configured: a dead letter for a person to look at."""


class EmailTransport(Protocol):
    def send(self, message: EmailMessage) -> None: ...


class ChatTransport(Protocol):
    def send(self, urls: Sequence[str], title: str, body: str, target: str) -> None: ...


def build_email(
    settings: NotifySettings, to: str, rendered: RenderedMessage, dedupe_key: str
) -> EmailMessage:
    """A multipart/alternative message: the text part first, the HTML part second (RFC 2046:
    the last alternative is the preferred one). The Message-ID is derived from the dedupe key,
    so a message sent again after an unknown outcome carries the same id."""
    message = EmailMessage()
    message["From"] = settings.mail_from
    message["To"] = to
    message["Subject"] = rendered.subject
    message["Date"] = formatdate(localtime=False, usegmt=True)
    digest = hashlib.sha256(dedupe_key.encode()).hexdigest()[:40]
    message["Message-ID"] = f"<{digest}@crm-approvals>"
    message["Auto-Submitted"] = "auto-generated"  # RFC 3834: no auto-replies to us
    message.set_content(rendered.text)
    message.add_alternative(rendered.html, subtype="html")
    message["Content-Language"] = rendered.language.replace("_", "-")  # after: set_content drops Content-*
    return message


class SmtpTransport:
    def __init__(self, settings: NotifySettings) -> None:
        self.settings = settings

    def send(self, message: EmailMessage) -> None:
        settings = self.settings
        host, port = settings.smtp_address
        security = "none" if settings.uses_mail_catcher else settings.smtp_security
        where = f"SMTP server {host}:{port}"
        try:
            if security == "ssl":
                smtp: smtplib.SMTP = smtplib.SMTP_SSL(
                    host, port, timeout=settings.smtp_timeout_seconds, context=ssl.create_default_context()
                )
            else:
                smtp = smtplib.SMTP(host, port, timeout=settings.smtp_timeout_seconds)
            with smtp:
                if security == "starttls":
                    smtp.starttls(context=ssl.create_default_context())
                if settings.smtp_username:
                    smtp.login(settings.smtp_username, settings.smtp_password or "")
                refused = smtp.send_message(message)
        except smtplib.SMTPAuthenticationError as exc:
            raise Undeliverable(f"{where} refused the login of SMTP_USERNAME: {exc.smtp_code}") from None
        except smtplib.SMTPRecipientsRefused as exc:
            codes = {code for code, _ in exc.recipients.values()}
            error = Undeliverable if all(code >= 500 for code in codes) else RetryLater
            raise error(f"{where} refused the recipient: {_replies(exc.recipients.values())}") from None
        except smtplib.SMTPResponseException as exc:
            error = Undeliverable if exc.smtp_code >= 500 else RetryLater
            raise error(f"{where} answered {exc.smtp_code} {_text(exc.smtp_error)}") from None
        except (smtplib.SMTPException, OSError) as exc:
            hint = (
                " (is `crm-approvals run` or `crm-approvals mailcatcher` running?)"
                if settings.uses_mail_catcher
                else ""
            )
            raise RetryLater(f"{where} could not be reached: {type(exc).__name__}: {exc}{hint}") from None
        if refused:
            raise Undeliverable(f"{where} refused the recipient: {_replies(refused.values())}")


class AppriseTransport:
    """One Apprise notify call per message to every URL of the target."""

    def send(self, urls: Sequence[str], title: str, body: str, target: str) -> None:
        import apprise  # imported here: loading its plugins takes a moment

        client = apprise.Apprise()
        for index, url in enumerate(urls, start=1):
            if not client.add(url):
                raise Undeliverable(
                    f"chat URL {index} of {target} is not a valid Apprise URL "
                    "(see https://github.com/caronc/apprise/wiki for each service's form)"
                )
        if not client.notify(title=title, body=body):
            services = ", ".join(sorted({url.split(":", 1)[0] for url in urls}))
            raise RetryLater(f"Apprise could not deliver to {target} ({services}); see the worker log")


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _replies(replies: object) -> str:
    return "; ".join(f"{code} {_text(text)}" for code, text in replies)  # type: ignore[attr-defined]
