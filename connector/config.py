"""Settings from the environment and `.env` (python-dotenv). Nothing else reads os.environ.

Every variable is documented in `.env.example`. Secrets live only here and in the
connection settings; `repr()` of either never shows them, so they cannot leak into logs.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dotenv import dotenv_values

from connector.errors import FatalError

DEFAULT_DATABASE_URL = "sqlite:///var/crm-approvals.db"
DEFAULT_QUEUE_URL = "sqlite:///var/queue.db"
SECRET_MARKERS = ("SECRET", "PASSWORD", "TOKEN", "KEY", "SESSION")


class ConfigError(FatalError, ValueError):
    """A setting is missing or malformed; the message says which variable and how to fix it."""

    code = "config_error"


@dataclass(frozen=True)
class ConnectionConfig:
    """One CRM connection: `CRM_CONNECTIONS=name=kind` plus variables prefixed `NAME_`."""

    name: str
    kind: str
    settings: Mapping[str, str] = field(default_factory=dict, repr=False)

    @property
    def env_prefix(self) -> str:
        return self.name.upper().replace("-", "_") + "_"

    def get(self, key: str, default: str | None = None) -> str | None:
        value = self.settings.get(key.upper())
        return value if value not in (None, "") else default

    def require(self, key: str) -> str:
        value = self.get(key)
        if value is None:
            raise ConfigError(
                f"connection {self.name!r} ({self.kind}) needs {self.env_prefix}{key.upper()}; "
                "set it in the environment or .env (see .env.example)"
            )
        return value

    def get_list(self, key: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        raw = self.get(key)
        if raw is None:
            return default
        return tuple(item.strip() for item in raw.split(",") if item.strip())

    def get_float(self, key: str, default: float) -> float:
        raw = self.get(key)
        if raw is None:
            return default
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"{self.env_prefix}{key.upper()} must be a number, got {raw!r}") from None

    def __repr__(self) -> str:
        shown = sorted(k for k in self.settings if not any(m in k for m in SECRET_MARKERS))
        return f"ConnectionConfig(name={self.name!r}, kind={self.kind!r}, keys={shown})"


MAIL_CATCHER_HOST = "127.0.0.1"
SMTP_SECURITY = ("none", "starttls", "ssl")


@dataclass(frozen=True)
class NotifySettings:
    """Notifications (docs/notifications.md). With no SMTP_HOST, mail goes to the local mail
    catcher that `crm-approvals run` starts, so no real mail server is needed to try things."""

    smtp_host: str = ""  # "" = not configured: the local mail catcher
    smtp_port: int | None = None  # default 587 (ssl: 465); the mail catcher's port without SMTP_HOST
    smtp_username: str | None = None
    smtp_password: str | None = field(default=None, repr=False)
    smtp_security: str = "starttls"  # none | starttls | ssl (the mail catcher always speaks plain SMTP)
    smtp_timeout_seconds: float = 30.0
    mail_from: str = "crm-approvals <approvals@localhost>"
    mail_catcher_smtp_port: int = 1025
    mail_catcher_port: int = 8025  # the page listing caught messages
    mail_catcher_dir: str = "var/mail"
    email: bool = True  # NOTIFY_EMAIL=false sends no e-mail (chat only)
    default_locale: str = "en"
    expiry_warning_days: int = 7  # warn the submitter this many days before an approval expires
    templates_dir: str = "templates/notifications"
    max_attempts: int = 8
    lease_seconds: int = 120
    # Apprise URLs (secrets: env only, never shown): "user:<ID>" / "role:<NAME>" -> URLs, with
    # ID and NAME as in the NOTIFY_USER_<ID>_URLS / NOTIFY_ROLE_<NAME>_URLS variable names.
    chat_urls: Mapping[str, tuple[str, ...]] = field(default_factory=dict, repr=False)

    @property
    def uses_mail_catcher(self) -> bool:
        return not self.smtp_host

    @property
    def smtp_address(self) -> tuple[str, int]:
        if self.uses_mail_catcher:
            return MAIL_CATCHER_HOST, self.mail_catcher_smtp_port
        return self.smtp_host, self.smtp_port or (465 if self.smtp_security == "ssl" else 587)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> NotifySettings:
        security = (env.get("SMTP_SECURITY") or "starttls").strip().lower()
        if security not in SMTP_SECURITY:
            raise ConfigError(f"SMTP_SECURITY must be one of {', '.join(SMTP_SECURITY)}, got {security!r}")
        chat: dict[str, tuple[str, ...]] = {}
        for key, value in env.items():
            for kind in ("USER", "ROLE"):
                prefix = f"NOTIFY_{kind}_"
                if key.startswith(prefix) and key.endswith("_URLS") and len(key) > len(prefix) + 5:
                    urls = tuple(u.strip() for u in (value or "").split(",") if u.strip())
                    if urls:
                        chat[f"{kind.lower()}:{key[len(prefix) : -5]}"] = urls
        port = env.get("SMTP_PORT")
        return cls(
            smtp_host=(env.get("SMTP_HOST") or "").strip(),
            smtp_port=_int(env, "SMTP_PORT", 0) or None if port else None,
            smtp_username=env.get("SMTP_USERNAME") or None,
            smtp_password=env.get("SMTP_PASSWORD") or None,
            smtp_security=security,
            smtp_timeout_seconds=float(_int(env, "SMTP_TIMEOUT_SECONDS", 30)),
            mail_from=env.get("MAIL_FROM") or cls.mail_from,
            mail_catcher_smtp_port=_int(env, "MAIL_CATCHER_SMTP_PORT", 1025),
            mail_catcher_port=_int(env, "MAIL_CATCHER_PORT", 8025),
            mail_catcher_dir=env.get("MAIL_CATCHER_DIR") or cls.mail_catcher_dir,
            email=(env.get("NOTIFY_EMAIL") or "true").strip().lower() not in ("false", "0", "no", "off"),
            default_locale=(env.get("NOTIFY_DEFAULT_LOCALE") or "en").strip(),
            expiry_warning_days=_int(env, "NOTIFY_EXPIRY_WARNING_DAYS", 7),
            templates_dir=env.get("NOTIFY_TEMPLATES_DIR") or cls.templates_dir,
            max_attempts=_int(env, "NOTIFY_MAX_ATTEMPTS", 8),
            lease_seconds=_int(env, "NOTIFY_LEASE_SECONDS", 120),
            chat_urls=chat,
        )


@functools.lru_cache(maxsize=4096)  # asked for every recipient of every notice
def env_name(text: str) -> str:
    """How a user id or role name is spelt inside a variable name: u-mgr-boris -> U_MGR_BORIS."""
    return "".join(c if c.isalnum() else "_" for c in text).upper()


@dataclass(frozen=True)
class Settings:
    database_url: str = DEFAULT_DATABASE_URL
    queue_url: str = DEFAULT_QUEUE_URL
    connections: Mapping[str, ConnectionConfig] = field(default_factory=dict)
    mappings_dir: str = "mappings"
    documents_templates_dir: str = "templates/documents"  # approval sheets, generated documents
    public_base_url: str = "http://127.0.0.1:8000"
    host: str = "127.0.0.1"
    port: int = 8000
    sandbox_url: str = "http://127.0.0.1:8001"
    webhook_max_body_bytes: int = 1024 * 1024
    webhook_tolerance_seconds: int = 300
    http_timeout_seconds: float = 30.0
    outbox_lease_seconds: int = 120
    outbox_max_attempts: int = 10
    inbox_max_attempts: int = 10
    drift_repair_window_hours: int = 24  # records written this recently are compared; 0 = off
    drift_repair_interval_minutes: int = 15
    log_level: str = "INFO"
    log_format: str = "text"  # text | json (one JSON object per line, stable keys: connector/logs.py)
    # prometheus-client's multiprocess directory: the server's and worker's counters meet here
    metrics_dir: str = "var/prometheus"
    directory_refresh_minutes: int = 60
    notify: NotifySettings = field(default_factory=NotifySettings)
    # The web app (connector/web, docs/web.md)
    secret_key: str = field(default="", repr=False)  # signs session cookies and links
    admin_users: tuple[str, ...] = ()  # user ids who are admins in the web app
    oidc_issuer: str = ""
    oidc_client_id: str = ""
    oidc_client_secret: str = field(default="", repr=False)
    sign_in_link_minutes: int = 15
    decision_link_hours: int = 72
    # issue 12: every variable (environment over .env), for `${NAME}` in check steps' URLs,
    # headers and callback secrets: their secrets stay out of the mapping files
    variables: Mapping[str, str] = field(default_factory=dict, repr=False)

    def connection(self, name: str) -> ConnectionConfig:
        try:
            return self.connections[name]
        except KeyError:
            known = ", ".join(sorted(self.connections)) or "none"
            raise ConfigError(f"unknown connection {name!r}; configured: {known} (CRM_CONNECTIONS)") from None

    def connections_of_kind(self, kind: str) -> list[ConnectionConfig]:
        return [c for c in self.connections.values() if c.kind == kind]

    @property
    def uses_sandbox(self) -> bool:
        return any(c.kind == "sandbox" for c in self.connections.values())

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, dotenv_path: str | None = ".env") -> Settings:
        """Read settings: real environment variables win over `.env`."""
        env: dict[str, str] = {}
        if dotenv_path and Path(dotenv_path).is_file():
            env.update({k: v for k, v in dotenv_values(dotenv_path).items() if v is not None})
        env.update(os.environ if environ is None else environ)
        return cls(
            database_url=env.get("DATABASE_URL") or DEFAULT_DATABASE_URL,
            queue_url=env.get("QUEUE_URL") or DEFAULT_QUEUE_URL,
            connections=parse_connections(env),
            mappings_dir=env.get("MAPPINGS_DIR") or "mappings",
            documents_templates_dir=env.get("DOCUMENTS_TEMPLATES_DIR") or "templates/documents",
            public_base_url=(env.get("PUBLIC_BASE_URL") or "http://127.0.0.1:8000").rstrip("/"),
            host=env.get("HOST") or "127.0.0.1",
            port=_int(env, "PORT", 8000),
            sandbox_url=(env.get("SANDBOX_URL") or "http://127.0.0.1:8001").rstrip("/"),
            webhook_max_body_bytes=_int(env, "WEBHOOK_MAX_BODY_BYTES", 1024 * 1024),
            webhook_tolerance_seconds=_int(env, "WEBHOOK_TOLERANCE_SECONDS", 300),
            http_timeout_seconds=float(_int(env, "HTTP_TIMEOUT_SECONDS", 30)),
            outbox_lease_seconds=_int(env, "OUTBOX_LEASE_SECONDS", 120),
            outbox_max_attempts=_int(env, "OUTBOX_MAX_ATTEMPTS", 10),
            inbox_max_attempts=_int(env, "INBOX_MAX_ATTEMPTS", 10),
            drift_repair_window_hours=_int(env, "DRIFT_REPAIR_WINDOW_HOURS", 24),
            drift_repair_interval_minutes=_int(env, "DRIFT_REPAIR_INTERVAL_MINUTES", 15),
            log_level=env.get("LOG_LEVEL") or "INFO",
            log_format=_choice(env, "LOG_FORMAT", ("text", "json"), "text"),
            metrics_dir=env.get("PROMETHEUS_MULTIPROC_DIR") or "var/prometheus",
            directory_refresh_minutes=_int(env, "DIRECTORY_REFRESH_MINUTES", 60),
            notify=NotifySettings.from_env(env),
            secret_key=env.get("SECRET_KEY") or "",
            admin_users=tuple(u.strip() for u in (env.get("ADMIN_USERS") or "").split(",") if u.strip()),
            oidc_issuer=(env.get("OIDC_ISSUER") or "").rstrip("/"),
            oidc_client_id=env.get("OIDC_CLIENT_ID") or "",
            oidc_client_secret=env.get("OIDC_CLIENT_SECRET") or "",
            sign_in_link_minutes=_int(env, "SIGN_IN_LINK_MINUTES", 15),
            decision_link_hours=_int(env, "DECISION_LINK_HOURS", 72),
            variables=dict(env),
        )


def parse_connections(env: Mapping[str, str]) -> dict[str, ConnectionConfig]:
    """`CRM_CONNECTIONS=salesforce,eu=zoho` -> connections; a bare name is its own kind.

    With nothing configured the built-in sandbox CRM is the only connection, so a
    newcomer can watch the whole flow without an account anywhere.
    """
    raw = env.get("CRM_CONNECTIONS") or "sandbox"
    connections: dict[str, ConnectionConfig] = {}
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        name, _, kind = item.partition("=")
        name, kind = name.strip(), (kind.strip() or name.strip())
        if not name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(
                f"CRM_CONNECTIONS: {name!r} is not a valid connection name (letters, digits, _ or -)"
            )
        prefix = name.upper().replace("-", "_") + "_"
        settings = {k[len(prefix) :]: v for k, v in env.items() if k.startswith(prefix)}
        connections[name] = ConnectionConfig(name=name, kind=kind, settings=settings)
    return connections


def _int(env: Mapping[str, str], key: str, default: int) -> int:
    raw = env.get(key)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{key} must be a whole number, got {raw!r}") from None


def _choice(env: Mapping[str, str], key: str, allowed: tuple[str, ...], default: str) -> str:
    raw = (env.get(key) or default).strip().lower()
    if raw not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {env.get(key)!r}")
    return raw
