"""Create a .env from .env.example, filling each blank `*_WEBHOOK_SECRET=`, `*_API_TOKEN=`, `SECRET_KEY=`."""

from __future__ import annotations

import base64
import secrets
from pathlib import Path


def fresh_value(key: str) -> str:
    if key.endswith("WEBHOOK_SECRET"):
        return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    if key == "SECRET_KEY":
        return secrets.token_urlsafe(48)
    return secrets.token_urlsafe(24)


def write_env_file(example: Path, target: Path) -> None:
    lines = []
    for line in example.read_text().splitlines():
        key, sep, value = line.partition("=")
        if (
            sep
            and not line.lstrip().startswith("#")
            and not value
            and key.endswith(("WEBHOOK_SECRET", "API_TOKEN", "SECRET_KEY"))
        ):
            line = f"{key}={fresh_value(key)}"
        lines.append(line)
    target.write_text("\n".join(lines) + "\n")
    target.chmod(0o600)
