"""Find every `tests/contract/harness_<kind>.py`: each defines ADAPTER_HARNESS and INTAKE_HARNESS."""

from __future__ import annotations

from importlib import import_module
from pathlib import Path

from tests.contract.harness import AdapterHarness, IntakeHarness


def _modules() -> list[object]:
    here = Path(__file__).parent
    return [import_module(f"tests.contract.{p.stem}") for p in sorted(here.glob("harness_*.py"))]


def adapter_harnesses() -> list[AdapterHarness]:
    return [m.ADAPTER_HARNESS for m in _modules() if hasattr(m, "ADAPTER_HARNESS")]  # type: ignore[attr-defined]


def intake_harnesses() -> list[IntakeHarness]:
    return [m.INTAKE_HARNESS for m in _modules() if hasattr(m, "INTAKE_HARNESS")]  # type: ignore[attr-defined]
