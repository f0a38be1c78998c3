"""The local mail catcher: an SMTP server (aiosmtpd) that keeps every message it receives as
an .eml file, and a small page to read them in the browser. `crm-approvals run` starts it
when no SMTP_HOST is configured, so trying the service needs no real mail server.

    SMTP  127.0.0.1:MAIL_CATCHER_SMTP_PORT (1025)   where the worker sends mail by default
    page  http://127.0.0.1:MAIL_CATCHER_PORT (8025) newest first; /api/messages as JSON

Nothing leaves the machine: every recipient is accepted and nothing is relayed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from flask import Flask, Response, abort, jsonify, redirect, render_template, url_for
from flask.typing import ResponseReturnValue

log = logging.getLogger("mailcatcher")

TEMPLATES = Path(__file__).resolve().parent / "templates"
MESSAGE_ID = re.compile(r"^[0-9]{8}T[0-9]{6}-[0-9a-f]{32}$")
LINK = re.compile(r"https?://[^\s<>\"')]+")
MAX_SHOWN = 200


@dataclass(frozen=True)
class CaughtMessage:
    id: str
    received_at: datetime
    sender: str
    recipients: tuple[str, ...]
    subject: str
    date: str
    language: str | None
    text: str
    html: str | None

    @property
    def links(self) -> list[str]:
        return list(dict.fromkeys(LINK.findall(self.text)))

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "received_at": self.received_at.isoformat(),
            "from": self.sender,
            "to": list(self.recipients),
            "subject": self.subject,
            "language": self.language,
            "text": self.text,
            "html": self.html,
            "links": self.links,
        }


class Mailbox:
    """The caught messages: one .eml file each in a directory (shared by the SMTP side and the page)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def save(self, raw: bytes) -> str:
        message_id = f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex}"
        temporary = self.directory / f".{message_id}.tmp"
        temporary.write_bytes(raw)
        os.replace(temporary, self.directory / f"{message_id}.eml")  # readers never see half a file
        return message_id

    def ids(self) -> list[str]:
        names = [p.stem for p in self.directory.glob("*.eml") if MESSAGE_ID.match(p.stem)]
        return sorted(names, reverse=True)

    def raw(self, message_id: str) -> bytes | None:
        if not MESSAGE_ID.match(message_id):
            return None
        path = self.directory / f"{message_id}.eml"
        return path.read_bytes() if path.is_file() else None

    def get(self, message_id: str) -> CaughtMessage | None:
        raw = self.raw(message_id)
        return parse_message(message_id, raw) if raw is not None else None

    def messages(self, limit: int = MAX_SHOWN) -> list[CaughtMessage]:
        found = (self.get(i) for i in self.ids()[:limit])
        return [m for m in found if m is not None]

    def clear(self) -> int:
        ids = self.ids()
        for message_id in ids:
            (self.directory / f"{message_id}.eml").unlink(missing_ok=True)
        return len(ids)


def parse_message(message_id: str, raw: bytes) -> CaughtMessage:
    message = BytesParser(policy=policy.default).parsebytes(raw)
    assert isinstance(message, EmailMessage)
    text_part = message.get_body(preferencelist=("plain",))
    html_part = message.get_body(preferencelist=("html",))
    try:
        received = datetime.strptime(message_id[:15], "%Y%m%dT%H%M%S").replace(tzinfo=UTC)
    except ValueError:
        received = datetime.now(UTC)
    date = str(message.get("Date") or "")
    with contextlib.suppress(TypeError, ValueError):
        date = parsedate_to_datetime(date).isoformat() if date else ""
    return CaughtMessage(
        id=message_id,
        received_at=received,
        sender=str(message.get("From") or ""),
        recipients=tuple(str(a) for a in message.get_all("To") or ()),
        subject=str(message.get("Subject") or ""),
        date=date,
        language=str(message.get("Content-Language")) if message.get("Content-Language") else None,
        text=text_part.get_content() if text_part is not None else "",
        html=html_part.get_content() if html_part is not None else None,
    )


class _Handler:
    def __init__(self, mailbox: Mailbox) -> None:
        self.mailbox = mailbox

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or envelope.content or b""
        raw = content if isinstance(content, bytes) else content.encode()
        message_id = self.mailbox.save(raw)
        log.info("caught a message for %s (%s)", ", ".join(envelope.rcpt_tos), message_id)
        return "250 Message accepted for delivery"


def smtp_server(mailbox: Mailbox, host: str, port: int) -> Controller:
    """An SMTP server on host:port that files every message in the mailbox; call .start()."""
    return Controller(_Handler(mailbox), hostname=host, port=port, ready_timeout=10)


def create_catcher_app(mailbox: Mailbox, smtp_address: str = "") -> Flask:
    app = Flask("crm_approvals_mailcatcher", template_folder=str(TEMPLATES))

    @app.get("/")
    def index() -> ResponseReturnValue:
        return render_template("mail_index.html", messages=mailbox.messages(), smtp_address=smtp_address)

    @app.get("/messages/<message_id>")
    def show(message_id: str) -> ResponseReturnValue:
        message = mailbox.get(message_id)
        if message is None:
            abort(404, f"no message {message_id!r}")
        return render_template("mail_message.html", message=message)

    @app.get("/messages/<message_id>.eml")
    def raw(message_id: str) -> ResponseReturnValue:
        content = mailbox.raw(message_id)
        if content is None:
            abort(404, f"no message {message_id!r}")
        return Response(content, mimetype="message/rfc822")

    @app.get("/api/messages")
    def api_messages() -> ResponseReturnValue:
        return jsonify(messages=[m.to_json() for m in mailbox.messages()])

    @app.post("/clear")
    def clear() -> ResponseReturnValue:
        mailbox.clear()
        return redirect(url_for("index"), 303)

    @app.after_request
    def headers(response: Response) -> Response:
        # The HTML parts are shown in a sandboxed iframe; nothing here runs scripts.
        response.headers["Content-Security-Policy"] = (
            "default-src 'none'; style-src 'unsafe-inline'; frame-src 'self'; img-src data:"
        )
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    return app
