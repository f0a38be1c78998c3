"""Optional feature modules, found by name (CLI commands, webhook blueprints)."""

from __future__ import annotations

from importlib import import_module
from types import ModuleType


def optional_module(name: str) -> ModuleType | None:
    """The module, or None when it does not exist; an error *inside* it still raises."""
    try:
        return import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        return None
