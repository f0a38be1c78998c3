"""Seed 001 in a real browser (issue 12): the rep saves a contract in the sandbox page, the
web app shows it waiting for its company's approval, the company's approvers decide in the web
app (the security check answers in between), and the sandbox page shows both approved.
Saves docs/screenshots/seed-001-*.png for docs/seed-001-walkthrough.md."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from connector.runtime import Runtime
from connector.storage.models import ApprovalRequestRow
from tests.e2e.test_browser import SCREENSHOTS, Stack, make_stack, save, sign_in, wait_for
from tests.notify.test_notifications import Inbox, smtp  # noqa: F401 (the SMTP fixture)

pytestmark = [pytest.mark.browser, pytest.mark.xdist_group("browser")]
COMPANY_CASCADE = ("u-acc-greta", "u-legal-eva", "u-com-ivan", "u-cfo-hugo")


@pytest.fixture
def seed_stack(
    tmp_path: Path,
    settings_factory: Callable[..., Any],
    runtime_factory: Callable[[Any], Runtime],
    app_factory: Callable[[Runtime], Any],
    smtp: tuple[Inbox, int],  # noqa: F811
) -> Iterator[Stack]:
    yield from make_stack(
        tmp_path,
        settings_factory,
        runtime_factory,
        app_factory,
        smtp,
        ("sandbox-company.yaml", "sandbox-contract.yaml"),
    )


def newest(stack: Stack, record_id: str) -> tuple[str, str, int | None] | None:
    with stack.runtime.sessions() as session:
        row = session.scalar(
            select(ApprovalRequestRow)
            .where(ApprovalRequestRow.record_id == record_id)
            .order_by(ApprovalRequestRow.submitted_at.desc())
        )
        return (row.id, row.status, row.current_step) if row is not None else None


def test_a_contract_waits_for_its_company_which_is_checked_and_approved_in_the_web_app(
    seed_stack: Stack,
) -> None:
    from selenium.webdriver.common.by import By

    stack, driver = seed_stack, seed_stack.driver
    # 1. The rep saves contract K-9001 of company C-500 (no approval yet) in the sandbox.
    driver.get(f"{stack.sandbox_url}/contracts/K-9001")
    amount = driver.find_element(By.ID, "f-amount")
    amount.clear()
    amount.send_keys("125000")
    driver.find_element(By.CSS_SELECTOR, "form.record button[type=submit]").click()
    wait_for("the sandbox to save", lambda: "saved=" in driver.current_url)
    contract = wait_for(
        "the contract to wait", lambda: (r := newest(stack, "K-9001")) and r[1] == "waiting" and r
    )
    company = wait_for("the company approval", lambda: newest(stack, "C-500"))

    # 2. The rep sees it waiting, and why, in the web app.
    sign_in(stack, "u-rep-felix")
    driver.get(f"{stack.base}/app/requests/{contract[0]}")
    page = driver.find_element(By.TAG_NAME, "main").text
    assert "Waiting for a related approval" in page and "company-approval of company C-500" in page, page
    save(driver, "seed-001-waiting.png", height=900)

    # 3. Felix confirms the documents; the security check clears; the cascade approves.
    approve_here(stack, company[0])
    for approver in COMPANY_CASCADE:
        wait_for(f"the step of {approver}", lambda a=approver: _open_for(stack, "C-500", a))
        sign_in(stack, approver)
        approve_here(stack, company[0])
    assert wait_for("the company approval", lambda: (r := newest(stack, "C-500")) and r[1] == "approved")

    # 4. The contract was released: its product owner and the lawyer approve.
    for approver in ("u-mgr-boris", "u-legal-eva"):
        wait_for(f"the contract step of {approver}", lambda a=approver: _open_for(stack, "K-9001", a))
        sign_in(stack, approver)
        approve_here(stack, contract[0])
    assert wait_for("the contract approval", lambda: (r := newest(stack, "K-9001")) and r[1] == "approved")

    def sandbox_shows_both() -> bool:
        driver.get(f"{stack.sandbox_url}/")
        text = driver.find_element(By.ID, "contracts").find_element(By.XPATH, "following-sibling::table").text
        return "K-9001" in text and "Approved" in text

    wait_for("the sandbox page to show the approval", sandbox_shows_both)
    driver.get(f"{stack.sandbox_url}/")
    driver.set_window_size(1280, 700)
    # the companies (C-500 Approved) and the contracts (K-9001 Approved) in one view
    driver.execute_script("document.getElementById('contracts').scrollIntoView(); window.scrollBy(0, -330);")
    driver.save_screenshot(str(SCREENSHOTS / "seed-001-sandbox.png"))
    driver.set_window_size(1280, 1000)


def _open_for(stack: Stack, record_id: str, user: str) -> bool:
    found = newest(stack, record_id)
    if found is None or found[1] != "pending":
        return False
    with stack.runtime.sessions() as session:
        from connector.storage import approval_store as store

        stored = store.load(session, found[0])
    assert stored is not None
    step = stored.request.steps[-1]
    return step.status == "pending" and user in step.approvers


def approve_here(stack: Stack, request_id: str) -> None:
    """Open the request page and press Approve (the primary button, in any language)."""
    from selenium.webdriver.common.by import By

    driver = stack.driver
    before = newest_step(stack, request_id)
    driver.get(f"{stack.base}/app/requests/{request_id}")
    comment = driver.find_elements(By.ID, "comment")
    if comment:
        comment[0].send_keys("OK")
    driver.find_element(By.CSS_SELECTOR, "button.primary[hx-post]").click()
    wait_for("the vote to count", lambda: newest_step(stack, request_id) != before)


def newest_step(stack: Stack, request_id: str) -> tuple[str, int | None, int]:
    from connector.storage import approval_store as store

    with stack.runtime.sessions() as session:
        stored = store.load(session, request_id)
    assert stored is not None
    return stored.request.status, stored.request.current_step, len(stored.request.transitions)
