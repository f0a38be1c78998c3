"""The Reports page in a real browser: an admin signs in, sees the charts and tables, and
narrows them with the filter form. Saves docs/screenshots/reports.png.

Skips with the reason when Chromium is absent, except under CI=true, where it must run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from connector.config import Settings
from connector.runtime import Runtime
from tests.e2e.test_browser import CHROMEDRIVER, CHROMIUM, Served, free_port, require_chromium, save, wait_for
from tests.web.helpers import ADMIN, address, path_of, sign_in_links, web_world

pytestmark = [pytest.mark.browser, pytest.mark.xdist_group("browser")]


@pytest.fixture
def browser_on_reports(
    tmp_path: Path, settings_factory: Callable[..., Settings], runtime_factory: Callable[[Settings], Runtime]
) -> Iterator[tuple[Any, str]]:
    require_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    port = free_port()
    world = web_world(tmp_path, settings_factory, runtime_factory, public_base_url=f"http://127.0.0.1:{port}")
    approved = world.submit("D-1")
    world.approve_steps(approved, "u-mgr", "u-gm", "u-fin-1")
    rejected = world.submit("D-2", amount=120000)
    world.vote("u-mgr", rejected, "reject", comment="too much")
    world.approve_steps(world.submit("D-3", amount=60000), "u-board-1", "u-board-2")
    world.submit("D-4", amount=60000)
    spread_over_days(world.runtime)
    served = Served(world.app, port)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # type: ignore[assignment]
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,1000", "--lang=en-US"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.implicitly_wait(5)
    base = f"http://127.0.0.1:{port}"
    try:
        sign_in_as_admin(driver, base, world.runtime)
        yield driver, base
    finally:
        driver.quit()
        served.stop()


HOURS_IN_STEP = {"manager": 5, "general-manager": 30, "finance": 12, "board": 52}


def spread_over_days(runtime: Runtime) -> None:
    """The history made in a second, moved onto days: each step takes HOURS_IN_STEP (times the
    request's number), so the screenshot shows figures like a real month's."""
    from sqlalchemy import select

    from connector.storage.db import transaction
    from connector.storage.models import ApprovalRequestRow, ApprovalStepRow, ApprovalVoteRow

    start = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
    with transaction(runtime.sessions) as session:
        requests = session.scalars(select(ApprovalRequestRow).order_by(ApprovalRequestRow.submitted_at)).all()
        for n, request in enumerate(requests, 1):
            at = request.submitted_at = start + timedelta(days=3 * n)
            steps = session.scalars(
                select(ApprovalStepRow)
                .where(ApprovalStepRow.request_id == request.id)
                .order_by(ApprovalStepRow.index, ApprovalStepRow.round)
            ).all()
            for step in steps:
                step.entered_at = at
                if step.left_at is not None:
                    at = step.left_at = at + timedelta(hours=HOURS_IN_STEP[step.name] * n)
                    for vote in session.scalars(
                        select(ApprovalVoteRow).where(
                            ApprovalVoteRow.request_id == request.id, ApprovalVoteRow.step_index == step.index
                        )
                    ):
                        vote.at = at
            if request.closed_at is not None:
                request.closed_at = at


def sign_in_as_admin(driver: Any, base: str, runtime: Runtime) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{base}/app/sign-in")
    driver.find_element(By.ID, "email").send_keys(address(ADMIN))
    driver.find_element(By.CSS_SELECTOR, "button.primary").click()
    links = wait_for("the sign-in link", lambda: sign_in_links(runtime, address(ADMIN)))
    driver.get(base + path_of(links[-1]))
    driver.find_element(By.ID, "sign-in-button").click()
    wait_for("the inbox", lambda: driver.current_url.endswith("/app/inbox"))


def test_admin_reads_the_reports_and_filters_them(browser_on_reports: tuple[Any, str]) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver, base = browser_on_reports
    driver.find_element(By.LINK_TEXT, "Reports").click()
    wait_for("the reports page", lambda: driver.current_url.endswith("/app/reports"))
    pass_bars = driver.find_elements(By.CSS_SELECTOR, "#chart-pass g.bar")
    assert len(pass_bars) == 2  # big-deal 50%, board-review 100%
    widths = {
        bar.find_element(By.TAG_NAME, "title").get_attribute("textContent"): float(
            bar.find_element(By.CSS_SELECTOR, "rect.outer").get_attribute("width")
        )
        for bar in pass_bars
    }
    assert widths["board-review: 100%"] == pytest.approx(2 * widths["big-deal: 50%"], rel=0.01)
    svg = driver.find_element(By.CSS_SELECTOR, "#chart-steps svg")
    assert svg.size["width"] > 300 and svg.size["height"] > 50  # drawn, not an empty box
    rules = driver.find_element(By.ID, "table-rules").text
    assert "big-deal 2 1 1 0 50% 50%" in rules, rules
    save(driver, "reports.png", height=1500)

    Select(driver.find_element(By.ID, "r-rule")).select_by_visible_text("board-review")
    driver.find_element(By.CSS_SELECTOR, "form.filters button[type=submit]").click()
    wait_for("the filtered page", lambda: "rule=board-review" in driver.current_url)
    assert "big-deal" not in driver.find_element(By.ID, "table-rules").text
    assert "board-review 2 1 0 1 100% 0%" in driver.find_element(By.ID, "table-rules").text
    approvers = driver.find_element(By.ID, "table-approvers").text
    assert "u-board-1" in approvers and "u-mgr" not in approvers
