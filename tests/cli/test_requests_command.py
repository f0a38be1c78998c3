"""`crm-approvals requests list|show`: the same query and JSON as the API, a table on a
terminal, tab-separated text when piped."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from connector.cli import main
from connector.config import Settings
from connector.runtime import Runtime
from tests.webhooks.test_api import World, build_world

Cli = Callable[..., Result]


@pytest.fixture
def world(
    tmp_path: Path, settings_factory: Callable[..., Settings], runtime_factory: Callable[[Settings], Runtime]
) -> World:
    world = build_world(tmp_path, settings_factory, runtime_factory)
    first = world.submit("D-1")
    world.vote("u-mgr", first, comment="fine\tby me")
    board = world.submit("D-2", amount=60000)
    world.approve_steps(board, "u-board-1")
    rejected = world.submit("D-3")
    world.vote("u-mgr", rejected, "reject", comment="too much")
    world.submit("D-4")
    return world


@pytest.fixture
def cli(world: World, tmp_path: Path) -> Cli:
    env = tmp_path / ".env"
    env.write_text(f"DATABASE_URL={world.runtime.settings.database_url}\nQUEUE_URL=memory://\n")

    def run(*args: str, env_vars: dict[str, str] | None = None) -> Result:
        return CliRunner().invoke(main, ["--env-file", str(env), *args], env=env_vars, catch_exceptions=False)

    return run


def api_json(world: World, path: str) -> Any:
    response = world.get("u-admin", path)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def test_list_piped_is_tab_separated_with_a_header(world: World, cli: Cli) -> None:
    result = cli("requests", "list")
    assert result.exit_code == 0, result.output
    header, *rows = result.stdout.splitlines()
    assert header.split("\t") == [
        "ID",
        "STATUS",
        "RULE",
        "RECORD",
        "SUBMITTER",
        "SUBMITTED",
        "OPEN STEP",
        "WAITING ON",
    ]
    table = [row.split("\t") for row in rows]
    assert [(r[1], r[2], r[3]) for r in table] == [
        ("pending", "big-deal", "sandbox:deal:D-4"),
        ("rejected", "big-deal", "sandbox:deal:D-3"),
        ("pending", "board-review", "sandbox:deal:D-2"),
        ("pending", "big-deal", "sandbox:deal:D-1"),
    ]
    assert (table[0][6], table[0][7]) == ("1 manager", "u-mgr")
    assert (table[1][6], table[1][7]) == ("-", "")
    assert (table[2][6], table[2][7]) == ("1 board", "u-board-2")  # u-board-1 has voted
    assert (table[3][6], table[3][7]) == ("2 general-manager", "u-gm")
    assert result.stderr.strip() == "4 of 4 shown"


def test_list_filters_are_the_apis(world: World, cli: Cli) -> None:
    def records(*args: str) -> list[str]:
        result = cli("requests", "list", *args)
        assert result.exit_code == 0, result.output
        return [row.split("\t")[3] for row in result.stdout.splitlines()[1:]]

    assert records("--status", "rejected", "--status", "approved") == ["sandbox:deal:D-3"]
    assert records("--rule", "board-review") == ["sandbox:deal:D-2"]
    assert records("--pending-for", "u-mgr") == ["sandbox:deal:D-4"]
    assert records("--pending-for", "u-gm", "--object", "DEAL", "--connection", "sandbox") == [
        "sandbox:deal:D-1"
    ]
    assert records("--record", "sandbox:deal:D-2", "--newer-than", "1h") == ["sandbox:deal:D-2"]
    assert records("--older-than", "1h") == []
    for query, args in (
        ("all=true", ()),
        ("status=pending&pending_for=u-board-2", ("--status", "pending", "--pending-for", "u-board-2")),
    ):
        result = cli("requests", "list", "--json", "--limit", "100", *args)
        assert json.loads(result.stdout) == api_json(world, f"/requests?{query}&limit=100")


def test_list_pages_with_the_cursor_it_prints(cli: Cli) -> None:
    seen: list[str] = []
    args: list[str] = ["requests", "list", "--limit", "3"]
    for _ in range(5):
        result = cli(*args)
        seen += [row.split("\t")[0] for row in result.stdout.splitlines()[1:]]
        if "next page" not in result.stderr:
            break
        assert result.stderr.startswith("3 of 4 shown; next page: add --cursor ")
        args = ["requests", "list", "--limit", "3", "--cursor", result.stderr.split("--cursor ")[1].strip()]
    assert len(seen) == len(set(seen)) == 4


def test_list_on_a_terminal_is_a_table(cli: Cli) -> None:
    result = cli("requests", "list", env_vars={"TTY_COMPATIBLE": "1", "COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    header = next(line for line in lines if "WAITING ON" in line)
    assert "\t" not in header and "STATUS" in header
    assert any(set(line.strip()) == {"─"} or "───" in line for line in lines)  # the rule under the header
    assert "\x1b[" in result.stdout  # coloured statuses
    assert "sandbox:deal:D-2" in result.stdout


@pytest.mark.parametrize(
    ("args", "option", "words"),
    [
        (("--older-than", "yesterday"), "--older-than", "12h"),
        (("--limit", "0"), "--limit", "greater than or equal to 1"),
        (("--record", "D-1"), "--record", "CONNECTION:OBJECT:ID"),
        (("--cursor", "nope"), "--cursor", "next_cursor"),
        (("--status", "done"), "--status", "pending"),
    ],
)
def test_list_bad_options_say_which_and_why(cli: Cli, args: tuple[str, ...], option: str, words: str) -> None:
    result = cli("requests", "list", *args)
    assert result.exit_code == 2
    assert option in result.output and words in result.output


def test_show_prints_the_chain_votes_and_history(world: World, cli: Cli) -> None:
    request_id = api_json(world, "/requests?record=sandbox:deal:D-1")["requests"][0]["id"]
    result = cli("requests", "show", request_id)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"request\t{request_id}" in out and "status\tpending" in out and "waiting on\tu-gm" in out
    chain = out.split("# Chain\n")[1].split("\n\n")[0].splitlines()
    assert [row.split("\t")[:5] for row in chain[1:]] == [
        ["1", "1", "manager", "one", "approved"],
        ["2", "1", "general-manager", "one", "pending"],
    ]
    assert chain[1].split("\t")[5:7] == ["1/1", "u-mgr"]
    votes = out.split("# Votes\n")[1].split("\n\n")[0].splitlines()
    assert votes[1].split("\t")[1:] == ["1", "1", "u-mgr", "approve", "fine by me"]  # tab flattened
    history = out.split("# History\n")[1].splitlines()
    assert [row.split("\t")[2] for row in history[1:]] == ["submitted", "entered", "step_approved", "entered"]
    assert history[1].split("\t")[3:6] == ["- -> submitted", "", "u-rep"]
    assert history[2].split("\t")[5] == "(engine)"

    as_json = cli("requests", "show", request_id, "--json")
    assert json.loads(as_json.stdout) == api_json(world, f"/requests/{request_id}")
    on_terminal = cli("requests", "show", request_id, env_vars={"TTY_COMPATIBLE": "1", "COLUMNS": "200"})
    assert "Chain" in on_terminal.stdout and "general-manager" in on_terminal.stdout
    assert "\t" not in on_terminal.stdout


def test_show_an_unknown_id_says_how_to_find_one(cli: Cli) -> None:
    result = cli("requests", "show", "no-such-id")
    assert result.exit_code == 1
    assert "no request 'no-such-id'" in result.output and "requests list" in result.output


def test_before_db_upgrade_it_says_what_to_run(tmp_path: Path) -> None:
    env = tmp_path / "empty.env"
    env.write_text(f"DATABASE_URL=sqlite:///{tmp_path}/empty.db\nQUEUE_URL=memory://\n")
    result = CliRunner().invoke(main, ["--env-file", str(env), "requests", "list"])
    assert result.exit_code == 1
    assert "crm-approvals db upgrade" in result.output


def test_text_from_users_is_shown_as_written_on_a_terminal(world: World, cli: Cli) -> None:
    request_id = world.submit("D-8")
    world.vote("u-mgr", request_id, "reject", comment="[red]not[/red] now")
    result = cli("requests", "show", request_id, env_vars={"TTY_COMPATIBLE": "1", "COLUMNS": "200"})
    assert "[red]not[/red] now" in result.stdout  # rich markup in a comment is not interpreted
