"""The admin's Reports page: tables and SVG charts from the stored history, filters, bad
input as a message (never a 500), admin only."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from connector.config import Settings
from connector.runtime import Runtime
from tests.web.helpers import ADMIN, signed_in, text, web_world
from tests.webhooks.test_api import World


@pytest.fixture
def world(
    tmp_path: Path, settings_factory: Callable[..., Settings], runtime_factory: Callable[[Settings], Runtime]
) -> World:
    world = web_world(tmp_path, settings_factory, runtime_factory)
    approved = world.submit("D-1")
    world.approve_steps(approved, "u-mgr", "u-gm", "u-fin-1")
    rejected = world.submit("D-2", amount=120000)
    world.vote("u-mgr", rejected, "reject", comment="too much")
    world.submit("D-3", amount=60000)
    return world


def test_reports_show_rates_steps_and_approvers_with_charts(world: World) -> None:
    html = signed_in(world, ADMIN).get("/app/reports").get_data(as_text=True)
    rules = re.search(r'<table id="table-rules">.*?</table>', html, re.S)
    assert rules is not None
    assert re.search(
        r"<td>big-deal</td><td class=\"num\">2</td><td class=\"num\">1</td><td class=\"num\">1</td>",
        rules.group(0),
    )
    assert "50%" in rules.group(0)
    steps = re.search(r'<figure class="chart" id="chart-steps">.*?</figure>', html, re.S)
    assert steps is not None
    assert steps.group(0).count('<g class="bar"') == 3  # manager, general-manager, finance; board is open
    pass_chart = re.search(r'<figure class="chart" id="chart-pass">.*?</figure>', html, re.S)
    assert pass_chart is not None and "big-deal: 50%" in pass_chart.group(0)
    page = text(signed_in(world, ADMIN).get("/app/reports"))
    assert "Waiting time per approver" in page and "u-board-1" in page


def test_filters_narrow_the_report(world: World) -> None:
    page = text(signed_in(world, ADMIN).get("/app/reports?rule=board-review"))
    assert "board-review" in page and "general-manager" not in page
    empty = text(signed_in(world, ADMIN).get("/app/reports?since=2000-01-01&until=2000-02-01"))
    assert "Nothing in this period and scope." in empty


def test_a_bad_filter_is_a_message_not_a_500(world: World) -> None:
    response = signed_in(world, ADMIN).get("/app/reports?since=soonish&until=%00")
    assert response.status_code == 400
    assert "since: expected a duration such as" in text(response)


def test_reports_are_for_admins_only(world: World) -> None:
    assert signed_in(world, "u-mgr").get("/app/reports").status_code == 404
    assert 'href="/app/reports"' not in signed_in(world, "u-mgr").get("/app/inbox").get_data(as_text=True)
    assert 'href="/app/reports"' in signed_in(world, ADMIN).get("/app/inbox").get_data(as_text=True)
