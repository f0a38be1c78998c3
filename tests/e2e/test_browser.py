"""The web app in a real browser (Debian's chromium + chromium-driver, through selenium).

A rep edits a sandbox deal -> the worker opens an approval request and e-mails the approver
through a real local SMTP server (aiosmtpd) -> the approver asks for a magic link on the
sign-in page with the address the directory knows, opens it from the e-mail -> sees the
request with what changed -> approves -> the sandbox shows "Approved" with the expiry. The same
again with the one-click links of the "approval needed" e-mails. Everything runs in this process
on 127.0.0.1: our app and the sandbox CRM on real HTTP servers (werkzeug), the worker as a
thread. The suite saves screenshots of the inbox, the request page and an e-mail (its HTML part
in Chromium) to docs/screenshots/ (linked from the README).

Skips with the reason when Chromium is absent, except under CI=true, where it must run.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from werkzeug.serving import BaseWSGIServer, make_server

from connector.directory import Directory
from connector.rules import MappingSet
from connector.runtime import Runtime
from connector.sandbox.app import SandboxConfig, create_sandbox_app
from connector.service.request_query import ids_pending_for
from connector.storage.inbox import process_pending
from connector.storage.models import ApprovalRequestRow
from connector.storage.outbox import flush
from connector.wiring import attach_pipeline
from tests.notify.test_notifications import Inbox, notify_settings, smtp  # noqa: F401 (the SMTP fixture)
from tests.web.helpers import SECRET, email_of_user

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "docs" / "screenshots"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
APPROVERS = ("u-mgr-boris", "u-gm-carla", "u-fin-dmitri", "u-legal-eva")  # D-1002 at 150,000 needs all four
WAIT_SECONDS = 20

pytestmark = [pytest.mark.browser, pytest.mark.xdist_group("browser")]


def require_chromium() -> None:
    if CHROMIUM and CHROMEDRIVER:
        return
    reason = "Chromium is absent (install Debian's chromium and chromium-driver; `make test` does as root)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; under CI=true the browser tests must run")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Served:
    """A WSGI app on a real port, in a thread."""

    def __init__(self, app: Any, port: int) -> None:
        self.server: BaseWSGIServer = make_server("127.0.0.1", port, app, threaded=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(10)


@dataclass
class Stack:
    runtime: Runtime
    base: str
    sandbox_url: str
    driver: Any
    mail: Inbox  # what the local SMTP server received


def mails_to(stack: Stack, user_id: str) -> list[Any]:
    return stack.mail.to(email_of_user(stack.runtime, user_id))


def text_of(mail: Any) -> str:
    return str(mail.get_body(preferencelist=("plain",)).get_content())


def link_in(mail: Any, path: str) -> str | None:
    found = re.search(
        rf"https?://[^\s<>]*/app/{path}[^\s<>]*", text_of(mail)
    )  # Chinese has no space after ：
    return found.group(0) if found else None


def wait_for(what: str, check: Callable[[], Any], seconds: float = WAIT_SECONDS) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out after {seconds}s waiting for {what}")


@pytest.fixture
def stack(
    tmp_path: Path,
    settings_factory: Callable[..., Any],
    runtime_factory: Callable[[Any], Runtime],
    app_factory: Callable[[Runtime], Any],
    smtp: tuple[Inbox, int],  # noqa: F811
) -> Iterator[Stack]:
    yield from make_stack(
        tmp_path, settings_factory, runtime_factory, app_factory, smtp, ("sandbox-deals.yaml",)
    )


def make_stack(
    tmp_path: Path,
    settings_factory: Callable[..., Any],
    runtime_factory: Callable[[Any], Runtime],
    app_factory: Callable[[Runtime], Any],
    mail: tuple[Inbox, int],
    example_files: tuple[str, ...],
) -> Iterator[Stack]:
    """Our server, the sandbox and a worker thread on real ports, serving these example files."""
    require_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    mappings = tmp_path / "mappings"
    mappings.mkdir()
    for name in example_files:
        shutil.copy(ROOT / "mappings/examples" / name, mappings)
    ours_port, sandbox_port = free_port(), free_port()
    token = "sbx-browser-token"
    settings = settings_factory(
        env={"SANDBOX_API_TOKEN": token, "SANDBOX_DB_PATH": str(tmp_path / "sandbox.db")},
        mappings_dir=str(mappings),
        public_base_url=f"http://127.0.0.1:{ours_port}",
        sandbox_url=f"http://127.0.0.1:{sandbox_port}",
        secret_key=SECRET,
        notify=notify_settings(mail[1]),
        # what a check step's ${SANDBOX_URL} and ${SANDBOX_API_TOKEN} read, as from .env
        variables={"SANDBOX_URL": f"http://127.0.0.1:{sandbox_port}", "SANDBOX_API_TOKEN": token},
    )
    runtime = runtime_factory(settings)
    pipeline = attach_pipeline(runtime, MappingSet.load(mappings))
    ours = Served(app_factory(runtime), ours_port)
    sandbox = Served(create_sandbox_app(SandboxConfig.from_settings(settings)), sandbox_port)
    assert Directory.from_runtime(runtime).refresh("sandbox").ok  # the worker's directory sweep
    stop = threading.Event()

    def worker() -> None:  # what `crm-approvals worker` does, polled
        while not stop.is_set():
            process_pending(runtime.sessions, pipeline)
            flush(runtime.sessions, runtime.adapter)
            for job in runtime.flush_jobs:  # queued notifications go out
                job.run(runtime)
            stop.wait(0.2)

    working = threading.Thread(target=worker, daemon=True)
    working.start()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # type: ignore[assignment]
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1280,1000",
        "--lang=en-US",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.implicitly_wait(5)
    try:
        yield Stack(runtime, settings.public_base_url, settings.sandbox_url, driver, mail[0])
    finally:
        driver.quit()
        stop.set()
        working.join(10)
        sandbox.stop()
        ours.stop()


# --- steps as a person takes them ---------------------------------------------------------------


def edit_amount_in_sandbox(stack: Stack, deal: str, amount: str) -> None:
    from selenium.webdriver.common.by import By

    driver = stack.driver
    driver.get(f"{stack.sandbox_url}/deals/{deal}")
    field = driver.find_element(By.ID, "f-amount")
    field.clear()
    field.send_keys(amount)
    driver.find_element(By.CSS_SELECTOR, "form.record button[type=submit]").click()
    wait_for("the sandbox to save", lambda: "saved=" in driver.current_url)


def raise_amount_in_sandbox(stack: Stack, deal: str) -> str:
    """The rep first sets 120,000 (the request opens), then 150,000: a restart_on_change field,
    so the request restarts and shows the change as before -> after."""

    def request_of(amount: int) -> str | None:
        with stack.runtime.sessions() as session:
            row = session.scalar(select(ApprovalRequestRow).where(ApprovalRequestRow.record_id == deal))
            return row.id if row is not None and row.record.get("amount") == amount else None

    edit_amount_in_sandbox(stack, deal, "120000")
    first = wait_for("the approval request to open", lambda: request_of(120000))
    edit_amount_in_sandbox(stack, deal, "150000")
    assert wait_for("the request to restart", lambda: request_of(150000)) == first
    return str(first)


def sign_in(stack: Stack, user_id: str) -> None:
    from selenium.webdriver.common.by import By

    driver = stack.driver

    def signed_out() -> bool:
        # Again until it holds: a navigation still in flight from the last step can set the
        # session cookie again after it was cleared.
        driver.delete_all_cookies()
        driver.get(f"{stack.base}/")
        return "/app/sign-in" in driver.current_url

    wait_for("the sign-in page once the cookies are cleared", signed_out)
    email = email_of_user(stack.runtime, user_id)
    before = len(mails_to(stack, user_id))
    driver.find_element(By.ID, "email").send_keys(email)
    driver.find_element(By.CSS_SELECTOR, "button.primary").click()
    wait_for("the page saying a link is on its way", lambda: "Check your e-mail" in driver.page_source)
    mail = wait_for(
        "the sign-in e-mail", lambda: [m for m in mails_to(stack, user_id)[before:] if link_in(m, "sign-in")]
    )
    driver.get(link_in(mail[-1], "sign-in"))
    driver.find_element(By.ID, "sign-in-button").click()
    wait_for("the inbox", lambda: driver.current_url.endswith("/app/inbox"))


def approve_on_page(stack: Stack, request_id: str, approver: str, screenshot: str | None = None) -> None:
    """Pages are in the approver's CRM language (English for Boris and Dmitri); the words are
    checked in English, the others' decisions by where the request waits afterwards."""
    from selenium.webdriver.common.by import By

    driver = stack.driver
    if driver.find_element(By.TAG_NAME, "html").get_attribute("lang") != "en":
        driver.find_element(By.CSS_SELECTOR, f'a[href="/app/requests/{request_id}"]').click()
        driver.find_element(By.CSS_SELECTOR, "table.values tr.changed")  # what changed is shown
        driver.find_element(By.CSS_SELECTOR, "button.primary[hx-post]").click()
        wait_for("the decision", partial(_decided, stack, request_id, approver))
        driver.implicitly_wait(0)
        try:  # the page has the answer (and the browser its cookie) once the buttons are gone
            wait_for(
                "the page to update", lambda: not driver.find_elements(By.CSS_SELECTOR, "button[hx-post]")
            )
        finally:
            driver.implicitly_wait(5)
        return
    link = driver.find_element(By.CSS_SELECTOR, f'a[href="/app/requests/{request_id}"]')
    link.click()
    wait_for("the request page", lambda: f"/app/requests/{request_id}" in driver.current_url)
    changed = driver.find_element(By.CSS_SELECTOR, "table.values tr.changed")
    assert changed.find_element(By.TAG_NAME, "th").text == "Amount"
    assert changed.find_element(By.CSS_SELECTOR, ".before").text.endswith("£120,000.00")  # before -> after
    assert changed.find_element(By.CSS_SELECTOR, ".value").text == "£150,000.00"
    why = driver.find_element(By.ID, "why-h").find_element(By.XPATH, "..").text
    assert "Amount is more than 100,000" in why
    if screenshot:
        save(driver, screenshot, height=1500)
    driver.find_element(By.ID, "comment").send_keys("Fine by me")
    driver.find_element(By.CSS_SELECTOR, "button.primary[hx-post]").click()
    wait_for(
        "the decision",
        lambda: "You approved this request." in driver.find_element(By.ID, "request-main").text,
    )


def sandbox_row(stack: Stack, deal: str) -> str:
    from selenium.webdriver.common.by import By

    stack.driver.get(stack.sandbox_url)
    link = stack.driver.find_element(By.CSS_SELECTOR, f'a[href="/deals/{deal}"]')
    return str(link.find_element(By.XPATH, "ancestor::tr").text)


def assert_sandbox_shows_approved(stack: Stack, deal: str) -> None:
    expiry = (datetime.now(UTC).date() + timedelta(days=180)).isoformat()
    row = wait_for(
        "the sandbox to show Approved", lambda: (r := sandbox_row(stack, deal)) and "Approved" in r and r
    )
    assert expiry in row, row


def save_email(stack: Stack, mail: Any, name: str) -> None:
    """The e-mail's HTML part as a mail program shows it: opened in Chromium from a file."""
    html = mail.get_body(preferencelist=("html",)).get_content()
    page = SCREENSHOTS.parent.parent / "var" / "email-screenshot.html"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(html, encoding="utf-8")
    stack.driver.get(page.as_uri())
    save(stack.driver, name, width=800, height=900)
    page.unlink()
    stack.driver.get(f"{stack.base}/app/sign-in")  # back on our site (cookies belong to it)


def save(driver: Any, name: str, width: int = 1280, height: int = 1000) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    driver.set_window_size(width, height)
    driver.save_screenshot(str(SCREENSHOTS / name))
    driver.set_window_size(1280, 1000)


# --- the stories -------------------------------------------------------------------------------------


def test_rep_edits_a_deal_and_approvers_approve_in_the_web_app(stack: Stack) -> None:
    from selenium.webdriver.common.by import By

    request_id = raise_amount_in_sandbox(stack, "D-1002")
    assert "Pending" in wait_for(
        "Pending in the sandbox", lambda: (r := sandbox_row(stack, "D-1002")) and "Pending" in r and r
    )
    for n, approver in enumerate(APPROVERS):
        sign_in(stack, approver)
        inbox = stack.driver.find_element(By.ID, "inbox-items").text
        assert "Contoso POS refresh" in inbox and "150" in inbox, inbox
        if n == 0:
            save(stack.driver, "inbox.png", height=700)
        approve_on_page(stack, request_id, approver, screenshot="request.png" if n == 2 else None)
        if n == 2:
            stack.driver.get(f"{stack.base}/app/requests/{request_id}")
            save(stack.driver, "request-mobile.png", width=390, height=1400)
    assert_sandbox_shows_approved(stack, "D-1002")


def test_the_same_with_one_click_links(stack: Stack) -> None:
    from selenium.webdriver.common.by import By

    request_id = raise_amount_in_sandbox(stack, "D-1002")
    for n, approver in enumerate(APPROVERS):
        wait_for(f"{approver}'s step", partial(_waits_for, stack, request_id, approver))
        # The restart after 120,000 -> 150,000 e-mails the manager again: the newest e-mail counts.
        mail = wait_for(f"{approver}'s e-mail", partial(_decision_mails, stack, approver))
        link = link_in(mail[-1], "decide")  # the first one is Approve
        assert link is not None and link.startswith(f"{stack.base}/app/decide?token="), text_of(mail[-1])
        if n == 0:
            save_email(stack, mail[-1], "email.png")
        stack.driver.delete_all_cookies()  # no session: the link alone is enough
        stack.driver.get(link)
        english = stack.driver.find_element(By.TAG_NAME, "html").get_attribute("lang") == "en"
        if english:
            assert "Approve Contoso POS refresh?" in stack.driver.find_element(By.TAG_NAME, "h1").text
        if n == 0:
            save(stack.driver, "decide.png", height=800)
        stack.driver.find_element(By.ID, "confirm-button").click()
        wait_for("the decision", partial(_decided, stack, request_id, approver))
        if english:
            assert "You approved the request." in stack.driver.find_element(By.TAG_NAME, "main").text
            stack.driver.get(link)  # single use
            assert "already been used" in stack.driver.find_element(By.TAG_NAME, "main").text
    assert_sandbox_shows_approved(stack, "D-1002")


def _waits_for(stack: Stack, request_id: str, user_id: str) -> bool:

    with stack.runtime.sessions() as session:
        return request_id in ids_pending_for(session, user_id)


def _decided(stack: Stack, request_id: str, user_id: str) -> bool:
    return not _waits_for(stack, request_id, user_id)


def _decision_mails(stack: Stack, user_id: str) -> list[Any]:
    return [m for m in mails_to(stack, user_id) if link_in(m, "decide")]
