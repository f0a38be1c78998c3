"""The web app's settings: `crm-approvals init` writes a SECRET_KEY; the rest come from the environment."""

from __future__ import annotations

from pathlib import Path

from dotenv import dotenv_values

from connector.config import Settings
from connector.envfile import write_env_file

ROOT = Path(__file__).resolve().parents[2]


def test_init_writes_a_fresh_secret_key_and_leaves_the_rest(tmp_path: Path) -> None:
    first, second = tmp_path / "one.env", tmp_path / "two.env"
    write_env_file(ROOT / ".env.example", first)
    write_env_file(ROOT / ".env.example", second)
    one, two = dotenv_values(first), dotenv_values(second)
    assert one["SECRET_KEY"] and len(one["SECRET_KEY"]) >= 60 and one["SECRET_KEY"] != two["SECRET_KEY"]
    assert one["ADMIN_USERS"] == "" and one["SIGN_IN_LINK_MINUTES"] == "15"
    settings = Settings.from_env({}, dotenv_path=str(first))
    assert settings.secret_key == one["SECRET_KEY"] and settings.sign_in_link_minutes == 15


def test_web_settings_from_the_environment() -> None:
    settings = Settings.from_env(
        {
            "SECRET_KEY": "k" * 40,
            "ADMIN_USERS": " u-admin, u-ops ,,",
            "OIDC_ISSUER": "https://login.example.com/realms/acme/",
            "OIDC_CLIENT_ID": "crm-approvals",
            "OIDC_CLIENT_SECRET": "very-secret",
            "DECISION_LINK_HOURS": "24",
        },
        dotenv_path=None,
    )
    assert settings.admin_users == ("u-admin", "u-ops")
    assert settings.oidc_issuer == "https://login.example.com/realms/acme"
    assert settings.decision_link_hours == 24
    assert "very-secret" not in repr(settings) and "k" * 40 not in repr(settings)
