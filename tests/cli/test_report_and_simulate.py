"""`crm-approvals report` and `simulate` against a history made through the real pipeline
and API (tests/webhooks/test_api.py's world)."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import func, select

from connector.cli import main
from connector.config import Settings
from connector.runtime import Runtime
from connector.storage.db import Base
from tests.webhooks.test_api import BIG_DEAL_RULE, BOARD_RULE, World, build_world, write_mapping

Cli = Callable[..., Result]


@pytest.fixture
def world(
    tmp_path: Path, settings_factory: Callable[..., Settings], runtime_factory: Callable[[Settings], Runtime]
) -> World:
    world = build_world(tmp_path, settings_factory, runtime_factory)
    approved = world.submit("D-1")  # 150000: big-deal
    world.approve_steps(approved, "u-mgr", "u-gm", "u-fin-1")
    rejected = world.submit("D-2", amount=120000)
    world.vote("u-mgr", rejected, "reject", comment="too much")
    world.submit("D-3", amount=60000)  # board-review, open
    return world


@pytest.fixture
def cli(world: World, tmp_path: Path) -> Cli:
    env = tmp_path / ".env"
    env.write_text(f"DATABASE_URL={world.runtime.settings.database_url}\nQUEUE_URL=memory://\n")

    def run(*args: str) -> Result:
        return CliRunner().invoke(main, ["--env-file", str(env), *args], catch_exceptions=False)

    return run


def csv_sections(text: str) -> dict[str, list[dict[str, str]]]:
    sections: dict[str, list[dict[str, str]]] = {}
    name = ""
    lines: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith("# "):
            name = line[2:]
            lines[name] = []
        else:
            lines[name].append(line)
    for name, body in lines.items():
        sections[name] = list(csv.DictReader(io.StringIO("\n".join(body))))
    return sections


def test_report_csv_has_rates_step_times_and_approvers(cli: Cli) -> None:
    result = cli("report", "--csv")
    assert result.exit_code == 0, result.output
    sections = csv_sections(result.stdout)
    assert set(sections) == {"rules", "steps", "approvers", "slowest"}
    rules = {row["RULE"]: row for row in sections["rules"]}
    assert (rules["big-deal"]["SUBMITTED"], rules["big-deal"]["APPROVED"], rules["big-deal"]["REJECTED"]) == (
        "2",
        "1",
        "1",
    )
    assert rules["big-deal"]["PASS"] == "0.5000" and rules["big-deal"]["REJECTION"] == "0.5000"
    assert rules["board-review"]["OPEN"] == "1" and rules["board-review"]["PASS"] == ""
    steps = {(row["RULE"], row["STEP"]): row for row in sections["steps"]}
    manager = steps[("big-deal", "manager")]
    assert (manager["ENTERED"], manager["APPROVED"], manager["REJECTED"]) == ("2", "1", "1")
    assert manager["P50"].isdigit() and manager["MAX"].isdigit()  # seconds
    assert steps[("board-review", "board")]["OPEN"] == "1"
    people = {row["APPROVER"]: row for row in sections["approvers"]}
    assert (people["u-mgr"]["VOTES"], people["u-mgr"]["REJECTED"]) == ("2", "1")
    assert people["u-board-1"]["WAITING NOW"] == "1" and people["u-board-1"]["VOTES"] == "0"


def test_report_filters_and_tables(cli: Cli) -> None:
    result = cli("report", "--csv", "--approver", "u-gm", "--section", "approvers")
    assert result.exit_code == 0, result.output
    assert [row["APPROVER"] for row in csv_sections(result.stdout)["approvers"]] == ["u-gm"]
    table = cli("report", "--rule", "board-review")
    assert table.exit_code == 0, table.output
    assert "# Time in each step\nRULE\tSTEP\t" in table.stdout and "board-review\tboard\t1\t0" in table.stdout
    assert "big-deal" not in table.stdout
    bad = cli("report", "--since", "yesterday-ish")
    assert bad.exit_code == 2 and "--since" in bad.output and "a duration such as" in bad.output


def row_counts(runtime: Runtime) -> dict[str, int]:
    with runtime.sessions() as session:
        return {
            table.name: session.scalar(select(func.count()).select_from(table)) or 0
            for table in Base.metadata.sorted_tables
        }


def test_simulate_compares_proposed_rules_with_what_happened_and_writes_nothing(
    world: World, cli: Cli, tmp_path: Path
) -> None:
    proposed = tmp_path / "proposed"
    proposed.mkdir()
    stricter = BIG_DEAL_RULE.replace("gt: 100000", "gt: 130000").replace(
        "      - name: finance\n        mode: any\n        approvers: [{group: finance}]\n", ""
    )
    write_mapping(proposed / "deals.yaml", stricter, BOARD_RULE)
    before = row_counts(world.runtime)
    result = cli("simulate", "--mappings", str(proposed), "--since", "1d")
    assert result.exit_code == 0, result.output
    assert row_counts(world.runtime) == before
    out = result.stdout
    assert "Replayed 3 record change(s)" in out
    big = out.split("rule big-deal")[1].split("rule board-review")[0]
    # D-1 (150000) is still sent by big-deal, now without the finance step
    assert "proposed chains: 1 x manager: u-mgr -> general-manager: u-gm" in big
    assert "actual chains: 1 x manager: u-mgr -> general-manager: u-gm -> finance: u-fin-1, u-fin-2" in big
    assert "actual chains: 1 x manager: u-mgr -> …" in big  # D-2 was rejected at the first step
    assert "were sent, would not be: 1\n    sandbox:deal:D-2" in big  # 120000 is under the new bar
    assert "sent by both, to another chain: 1\n    sandbox:deal:D-1" in big
    board = out.split("rule board-review")[1]
    assert "would be sent, were not: 1\n    sandbox:deal:D-2" in board  # match: first falls to board
    table_row = next(line for line in out.splitlines() if line.strip().startswith("big-deal"))
    assert table_row.split()[1:] == ["1", "(1)", "2", "(2)", "0", "1", "1"]


def test_simulate_refuses_a_broken_mapping_with_file_and_line(cli: Cli, tmp_path: Path) -> None:
    proposed = tmp_path / "broken"
    proposed.mkdir()
    (proposed / "deals.yaml").write_text("connection: sandbox\nobject: deal\nrules: 12\n")
    result = cli("simulate", "--mappings", str(proposed))
    assert result.exit_code == 1
    assert f"{proposed / 'deals.yaml'}:" in result.output and "fix them" in result.output
