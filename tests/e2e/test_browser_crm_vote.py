"""Issue 11 items 4 and 5 in a real browser: on the sandbox CRM's own page, someone who is not
the approver sets the decision field (reverted and flagged), the approver sets it (the vote is
cast as them), the rep edits a locked field (written back); the next approver sees both on the
web request page under "Changed while pending". Same stack as test_browser.py (the shipped
sandbox example, the worker as a thread, Chromium through selenium)."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from connector.storage import approval_store as store
from connector.storage.models import ApprovalRequestRow
from tests.e2e.test_browser import Stack, sign_in, stack, wait_for  # noqa: F401 (the stack fixture)
from tests.notify.test_notifications import smtp  # noqa: F401 (the SMTP fixture)

pytestmark = [pytest.mark.browser, pytest.mark.xdist_group("browser")]
DEAL = "D-1002"  # Felix's; at 150,000 the manager (Boris) decides first


def edit_in_sandbox(served: Stack, as_user: str, **fields: str) -> None:
    """Open the deal on the sandbox page, pick who edits, set picklists / boxes, save."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver = served.driver
    driver.get(f"{served.sandbox_url}/deals/{DEAL}")
    Select(driver.find_element(By.ID, "f-edited_by")).select_by_value(as_user)
    for name, value in fields.items():
        element = driver.find_element(By.ID, f"f-{name}")
        if element.tag_name == "select":
            Select(element).select_by_visible_text(value)
        else:
            element.clear()
            element.send_keys(value)
    driver.find_element(By.CSS_SELECTOR, "form.record button[type=submit]").click()
    wait_for("the sandbox to save", lambda: "saved=" in driver.current_url)


def sandbox_value(served: Stack, name: str) -> Any:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    served.driver.get(f"{served.sandbox_url}/deals/{DEAL}")
    element = served.driver.find_element(By.ID, f"f-{name}")
    if element.tag_name == "select":
        return Select(element).first_selected_option.text
    return element.get_attribute("value")


def request_state(served: Stack) -> Any:
    with served.runtime.sessions() as session:
        row = session.scalar(select(ApprovalRequestRow).where(ApprovalRequestRow.record_id == DEAL))
        return None if row is None else store.load(session, row.id)


def kinds(served: Stack) -> list[str]:
    stored = request_state(served)
    return [t.kind for t in stored.request.transitions] if stored else []


def test_votes_and_locked_fields_on_the_crms_own_page(stack: Stack) -> None:  # noqa: F811
    from selenium.webdriver.common.by import By

    edit_in_sandbox(stack, "u-rep-felix", amount="150000")
    wait_for(
        "the request to open at the manager",
        lambda: (s := request_state(stack)) and s.request.current_step == 0,
    )

    # Dmitri (finance, not the manager's step) sets the decision: no vote, the field goes back.
    edit_in_sandbox(stack, "u-fin-dmitri", approval_decision="Approve")
    wait_for("the refusal in the history", lambda: "crm_vote_refused" in kinds(stack))
    wait_for("the decision field to be reverted", lambda: sandbox_value(stack, "approval_decision") == "-")
    assert request_state(stack).request.votes == []

    # Boris, the manager, sets it: the vote is his, the chain moves on, the field is cleared.
    edit_in_sandbox(stack, "u-mgr-boris", approval_decision="Approve")
    stored = wait_for("Boris's vote", lambda: (s := request_state(stack)) and s.request.votes and s)
    assert [(v.approver, v.decision) for v in stored.request.votes] == [("u-mgr-boris", "approve")]
    assert stored.request.current_step == 1  # the general manager's step
    wait_for("the decision field to be cleared", lambda: sandbox_value(stack, "approval_decision") == "-")

    # Felix moves the locked currency: written back to what the request was opened with.
    edit_in_sandbox(stack, "u-rep-felix", currency="EUR")
    wait_for("the lock to revert", lambda: "lock_reverted" in kinds(stack))
    wait_for("the currency to be back", lambda: sandbox_value(stack, "currency") == "GBP")

    # The approvers see both on the request page (Boris reads English; Carla, next, Chinese).
    sign_in(stack, "u-mgr-boris")
    stack.driver.get(f"{stack.base}/app/requests/{stored.request.id}")
    card = stack.driver.find_element(By.ID, "flags").text
    assert "Changed while pending" in card
    assert "A decision set in the CRM was not taken as a vote" in card and "u-fin-dmitri" in card
    assert "Locked field edited; the edit was undone" in card and "'GBP' -> 'EUR'" in card
