"""The mail catcher `make run` starts: a real SMTP server that files what it gets, and its page."""

from __future__ import annotations

import smtplib
import socket
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from connector.config import Settings
from connector.notify.catcher import Mailbox, create_catcher_app, smtp_server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_caught_mail_is_listed_and_shown_with_its_links(tmp_path: Path) -> None:
    mailbox = Mailbox(tmp_path / "mail")
    port = free_port()
    controller = smtp_server(mailbox, "127.0.0.1", port)
    controller.start()
    try:
        message = EmailMessage()
        message["From"], message["To"], message["Subject"] = (
            "a@x.example",
            "boris@x.example",
            "Approval <needed>",
        )
        message.set_content("Open the request: http://127.0.0.1:8000/app/requests/abc\n")
        message.add_alternative(
            '<p><a href="http://127.0.0.1:8000/app/requests/abc">Open</a> <b>x</b></p>', subtype="html"
        )
        message["Content-Language"] = "pl"
        with smtplib.SMTP("127.0.0.1", port, timeout=5) as smtp:
            smtp.send_message(message)
    finally:
        controller.stop()

    web = create_catcher_app(mailbox, f"127.0.0.1:{port}").test_client()
    page = web.get("/").get_data(as_text=True)
    assert "Approval &lt;needed&gt;" in page and "boris@x.example" in page
    [caught] = web.get("/api/messages").get_json()["messages"]
    assert (caught["to"], caught["subject"], caught["language"]) == (
        ["boris@x.example"],
        "Approval <needed>",
        "pl",
    )
    assert caught["links"] == ["http://127.0.0.1:8000/app/requests/abc"]
    shown = web.get(f"/messages/{caught['id']}")
    html = shown.get_data(as_text=True)
    assert '<a href="http://127.0.0.1:8000/app/requests/abc" target="_blank" rel="noopener">' in html
    assert 'sandbox srcdoc="&lt;p&gt;&lt;a href=&#34;http://127.0.0.1:8000' in html  # escaped once, not run
    assert "script-src" not in shown.headers["Content-Security-Policy"]  # default-src 'none': no scripts
    assert b"Subject: Approval <needed>" in web.get(f"/messages/{caught['id']}.eml").data
    assert web.get("/messages/../../etc/passwd").status_code == 404
    assert web.post("/clear").status_code == 303 and mailbox.ids() == []


def test_run_starts_the_mail_catcher_only_without_an_smtp_host(monkeypatch: Any, tmp_path: Path) -> None:
    default = Settings.from_env({}, dotenv_path=None)
    assert default.notify.uses_mail_catcher and default.notify.smtp_address == ("127.0.0.1", 1025)
    configured = Settings.from_env({"SMTP_HOST": "smtp.acme.example"}, dotenv_path=None)
    assert not configured.notify.uses_mail_catcher
    assert configured.notify.smtp_address == ("smtp.acme.example", 587)
    ssl = Settings.from_env({"SMTP_HOST": "smtp.acme.example", "SMTP_SECURITY": "ssl"}, dotenv_path=None)
    assert ssl.notify.smtp_address == ("smtp.acme.example", 465)

    from connector.cli import plan_children

    [catcher] = [c for c in plan_children(default, with_sandbox=True) if c.name == "mailcatcher"]
    assert catcher.command == "mailcatcher"
    assert catcher.banner == "Mail catcher:    http://127.0.0.1:8025/   (e-mail sent)"
    assert {variable for _h, _p, variable in catcher.listens} == {
        "MAIL_CATCHER_SMTP_PORT",
        "MAIL_CATCHER_PORT",
    }
    assert "mailcatcher" not in [c.name for c in plan_children(configured, with_sandbox=True)]
