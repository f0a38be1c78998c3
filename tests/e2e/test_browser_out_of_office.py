"""Out of office in a real browser (Chromium through selenium), on the stack of test_browser.py:
Boris sets Anna as his deputy on the out-of-office page; a deal's manager step then goes to
Anna, who approves it in Polish; the request page shows her vote as made for Boris. Saves
docs/screenshots/out-of-office.png (docs/web.md)."""

from __future__ import annotations

from functools import partial

import pytest

from tests.e2e.test_browser import (  # noqa: F401 (fixtures: stack, smtp)
    Stack,
    _decided,
    _waits_for,
    approve_on_page,
    raise_amount_in_sandbox,
    save,
    sign_in,
    smtp,
    stack,
    wait_for,
)

pytestmark = [pytest.mark.browser, pytest.mark.xdist_group("browser")]


def test_a_deputy_set_in_the_web_app_approves_on_behalf_of_the_manager(stack: Stack) -> None:  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select

    driver = stack.driver
    sign_in(stack, "u-mgr-boris")
    driver.find_element(By.LINK_TEXT, "Out of office").click()
    wait_for("the out-of-office page", lambda: driver.current_url.endswith("/app/out-of-office"))
    Select(driver.find_element(By.ID, "d-deputy")).select_by_value("u-rep-anna")
    driver.find_element(By.ID, "d-note").send_keys("Holiday")
    driver.find_element(By.ID, "deputy-button").click()
    # page_source, not an element: the form's redirect replaces the page under a held element
    wait_for("the confirmation", lambda: "Anna Kowalski acts for you" in driver.page_source)
    row = driver.find_element(By.CSS_SELECTOR, "#delegations tbody tr").text
    assert "Boris Novak" in row and "Anna Kowalski" in row and "in force" in row, row
    save(driver, "out-of-office.png", height=800)

    request_id = raise_amount_in_sandbox(stack, "D-1002")
    wait_for("Anna's step", partial(_waits_for, stack, request_id, "u-rep-anna"))
    assert not _waits_for(stack, request_id, "u-mgr-boris")

    sign_in(stack, "u-rep-anna")  # her CRM language is Polish
    assert driver.find_element(By.TAG_NAME, "html").get_attribute("lang") == "pl"
    approve_on_page(stack, request_id, "u-rep-anna")
    wait_for("the decision", partial(_decided, stack, request_id, "u-rep-anna"))
    driver.get(f"{stack.base}/app/requests/{request_id}")
    behalf = driver.find_element(By.CSS_SELECTOR, ".chain .on-behalf").text
    assert behalf == "zastępca: Boris Novak", behalf
    history = driver.find_element(By.CSS_SELECTOR, "ol.history").text
    assert "Przekazano zastępcy" in history, history
