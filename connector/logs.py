"""Logging set-up, with every configured secret value masked as a last line of defence."""

from __future__ import annotations

import logging

from connector.config import SECRET_MARKERS, Settings


class SecretRedactingFilter(logging.Filter):
    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        # Longest first, so a secret containing another is masked whole.
        self.secrets = sorted({s for s in secrets if len(s) >= 6}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        message = record.getMessage()
        masked = message
        for secret in self.secrets:
            masked = masked.replace(secret, "***")
        if masked != message:
            record.msg, record.args = masked, None
        return True


def secret_values(settings: Settings) -> list[str]:
    values = []
    for connection in settings.connections.values():
        values += [v for k, v in connection.settings.items() if any(m in k for m in SECRET_MARKERS)]
    for url in (settings.database_url, settings.queue_url):
        if "@" in url and ":" in url.split("@")[0]:
            values.append(url.split("@")[0].rsplit(":", 1)[-1])  # the password in scheme://user:password@host
    return values


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(SecretRedactingFilter(secret_values(settings)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
