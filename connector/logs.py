"""Logging set-up: text or JSON lines (LOG_FORMAT), with every configured secret value
masked as a last line of defence.

Business events (request opened, approved, ...), retries and dead letters are logged with
`log_event`, which attaches an event name and fields: in JSON each becomes a top-level key.
Keys every JSON line has: time, level, logger, message; then event and its fields when
the line is an event, and exception when one was logged.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from connector.config import SECRET_MARKERS, Settings

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_RESERVED = ("time", "level", "logger", "message", "event", "exception")


def log_event(
    logger: logging.Logger, level: int, event: str, message: str, *args: Any, **fields: Any
) -> None:
    """Log `message % args` as the named event; `fields` become JSON keys (and are not in text)."""
    logger.log(level, message, *args, extra={"event": event, "event_fields": fields})


class SecretRedactingFilter(logging.Filter):
    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        # Longest first, so a secret containing another is masked whole.
        self.secrets = sorted({s for s in secrets if len(s) >= 6}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        message = record.getMessage()
        masked = self.mask(message)
        if masked != message:
            record.msg, record.args = masked, None
        fields = getattr(record, "event_fields", None)
        if isinstance(fields, Mapping):
            record.event_fields = {k: self.mask(v) if isinstance(v, str) else v for k, v in fields.items()}
        return True

    def mask(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text


class JsonFormatter(logging.Formatter):
    """One JSON object per line with stable keys (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        event = getattr(record, "event", None)
        if event is not None:
            line["event"] = event
            fields = getattr(record, "event_fields", None) or {}
            line.update({k: v for k, v in fields.items() if k not in _RESERVED})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


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
    formatter = JsonFormatter() if settings.log_format == "json" else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    handler.addFilter(SecretRedactingFilter(secret_values(settings)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())


def log_sweep(logger: logging.Logger, summary: Mapping[str, Any]) -> None:
    """The per-minute sweep as one short INFO line, or DEBUG when it did nothing.

    Counts of zero, empty lists and None are left out (`sweep: inbox done=3; expire 2`);
    `api_usage` is context, not work, and is appended only to a line that is logged anyway.
    """
    work = {name: value for name, value in summary.items() if name != "api_usage"}
    usage = summary.get("api_usage") or {}
    tail = f" (API use: {', '.join(f'{k} {v}' for k, v in usage.items())})" if usage else ""
    line = sweep_summary(work)
    if line is None:
        logger.debug("sweep: nothing to do%s", tail)
    else:
        logger.info("sweep: %s%s", line, tail)


def sweep_summary(summary: Mapping[str, Any]) -> str | None:
    """`inbox done=3 retried=1; expire 2`, or None when every count is zero or empty."""
    parts = []
    for name, value in summary.items():
        if isinstance(value, Mapping):
            shown = " ".join(_nonzero_counts(value))
            if shown:
                parts.append(f"{name} {shown}")
        elif isinstance(value, list | tuple | set):
            if value:
                parts.append(f"{name} {len(value)}")
        elif value:
            parts.append(f"{name} {value}")
    return "; ".join(parts) or None


def _nonzero_counts(counts: Mapping[str, Any], prefix: str = "") -> list[str]:
    """`k=v` for each count that is not zero or empty; a nested job's counts (the flush's
    notifications) as `job.k=v`, so an idle nested job adds nothing."""
    shown: list[str] = []
    for key, value in counts.items():
        if isinstance(value, Mapping):
            shown += _nonzero_counts(value, f"{prefix}{key}.")
        elif value:
            shown.append(f"{prefix}{key}={value}")
    return shown
