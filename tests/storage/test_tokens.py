"""API tokens: `crm-approvals token create/list/revoke`, hashing, lookup, and no token in any log."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import select

from connector.cli import main
from connector.runtime import Runtime
from connector.storage.db import make_engine, make_session_factory, transaction
from connector.storage.models import ApiToken
from connector.storage.tokens import LAST_USED_PRECISION, create_token, find_token, hash_token, revoke_token

TOKEN_SHAPE = re.compile(r"^cra_[A-Za-z0-9_-]{43}$")

Cli = Callable[..., Result]


@pytest.fixture
def env_file(tmp_path: Path) -> Path:
    path = tmp_path / ".env"
    path.write_text(f"DATABASE_URL=sqlite:///{tmp_path}/tokens.db\nLOG_LEVEL=DEBUG\n")
    return path


@pytest.fixture
def cli(env_file: Path) -> Cli:
    def run(*args: str) -> Result:
        return CliRunner().invoke(main, ["--env-file", str(env_file), *args])

    return run


@pytest.fixture
def migrated(cli: Cli) -> Cli:
    result = cli("db", "upgrade")
    assert result.exit_code == 0, result.output
    return cli


def stored_rows(tmp_path: Path) -> list[ApiToken]:
    engine = make_engine(f"sqlite:///{tmp_path}/tokens.db")
    try:
        with make_session_factory(engine)() as session:
            return list(session.scalars(select(ApiToken).order_by(ApiToken.id)))
    finally:
        engine.dispose()


def test_create_prints_the_token_once_and_stores_only_its_sha256(migrated: Cli, tmp_path: Path) -> None:
    result = migrated("token", "create", "--user", "0055g00000AbCdE", "--label", "Ana laptop", "--admin")
    assert result.exit_code == 0, result.output
    token = result.stdout.strip()
    assert TOKEN_SHAPE.match(token), result.stdout  # stdout is the token alone: scriptable
    assert result.output.count(token) == 1
    assert "shown only now" in result.stderr
    assert token not in result.stderr  # logs and notes go to stderr; the token never does

    [row] = stored_rows(tmp_path)
    assert row.token_hash == hashlib.sha256(token.encode()).hexdigest()
    assert (row.user_id, row.label, row.is_admin) == ("0055g00000AbCdE", "Ana laptop", True)
    assert token not in repr(vars(row))


def test_each_token_is_new(migrated: Cli) -> None:
    tokens = {migrated("token", "create", "--user", "u-1").stdout.strip() for _ in range(3)}
    assert len(tokens) == 3


def test_list_shows_tokens_without_secrets(migrated: Cli, tmp_path: Path) -> None:
    admin = migrated("token", "create", "--user", "u-admin", "--label", "ops", "--admin").stdout.strip()
    user = migrated("token", "create", "--user", "u-mgr").stdout.strip()
    result = migrated("token", "list")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["ID", "USER", "ADMIN"]
    assert lines[1].split()[:3] == ["1", "u-admin", "yes"]
    assert lines[1].rstrip().endswith("ops")
    assert lines[2].split()[:3] == ["2", "u-mgr", "no"]
    assert "active" in lines[2]
    for secret in (admin, user, *(row.token_hash for row in stored_rows(tmp_path))):
        assert secret not in result.output


def test_list_with_no_tokens_says_how_to_create_one(migrated: Cli) -> None:
    assert "crm-approvals token create --user" in migrated("token", "list").stdout


def test_revoke_stops_the_token_and_shows_in_the_list(migrated: Cli, tmp_path: Path) -> None:
    token = migrated("token", "create", "--user", "u-mgr").stdout.strip()
    result = migrated("token", "revoke", "1")
    assert result.exit_code == 0, result.output
    assert "token 1 (u-mgr) revoked" in result.stdout
    assert "revoked" in migrated("token", "list").stdout.splitlines()[1]
    [row] = stored_rows(tmp_path)
    assert row.revoked_at is not None
    again = migrated("token", "revoke", "1")  # idempotent, keeps the first revocation time
    assert again.exit_code == 0
    assert stored_rows(tmp_path)[0].revoked_at == row.revoked_at
    assert token not in result.output + again.output


def test_revoking_an_unknown_token_fails_clearly(migrated: Cli) -> None:
    result = migrated("token", "revoke", "42")
    assert result.exit_code == 1
    assert "no token with ID 42" in result.output


def test_create_needs_a_user(migrated: Cli) -> None:
    missing = migrated("token", "create")
    assert missing.exit_code == 2
    assert "--user" in missing.output
    blank = migrated("token", "create", "--user", "  ")
    assert blank.exit_code == 2
    assert "must not be empty" in blank.output


def test_commands_before_db_upgrade_say_what_to_run(cli: Cli) -> None:
    result = cli("token", "list")
    assert result.exit_code == 1
    assert "crm-approvals db upgrade" in result.output


# --- the module the API authenticates with ---------------------------------------------------


def test_lookup_is_by_hash_and_notes_the_last_use(runtime: Runtime) -> None:
    with transaction(runtime.sessions) as session:
        info, token = create_token(session, "u-mgr", "bot")
    assert info.last_used_at is None
    with transaction(runtime.sessions) as session:
        found = find_token(session, token)
        assert found is not None and found.user_id == "u-mgr"
        first_use = found.last_used_at
        assert first_use is not None
        assert find_token(session, token[:-1] + ("A" if token[-1] != "A" else "B")) is None
        assert find_token(session, hash_token(token)) is None  # the stored hash is no token
    with transaction(runtime.sessions) as session:
        again = find_token(session, token)
    assert again is not None and again.last_used_at == first_use  # within LAST_USED_PRECISION
    assert LAST_USED_PRECISION.total_seconds() >= 60


def test_revoked_tokens_are_found_as_revoked(runtime: Runtime) -> None:
    with transaction(runtime.sessions) as session:
        info, token = create_token(session, "u-mgr")
        revoked = revoke_token(session, info.id)
        assert revoked is not None and revoked.revoked
        found = find_token(session, token)
        assert found is not None and found.revoked
        assert revoke_token(session, info.id + 100) is None


def test_a_token_needs_a_user_id(runtime: Runtime) -> None:
    with transaction(runtime.sessions) as session, pytest.raises(ValueError, match="user id"):
        create_token(session, " ")
