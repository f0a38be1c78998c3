"""Wiring of the event processor the worker runs (filled in by the approval engine)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from connector.config import Settings
from connector.events import RecordChangeEvent
from connector.runtime import Runtime


class Pipeline:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def prepare(self, event: RecordChangeEvent) -> Any:
        return None

    def apply(self, session: Session, event: RecordChangeEvent, prepared: Any) -> str:
        return "no rules loaded"


def build_runtime(settings: Settings) -> Runtime:
    runtime = Runtime.from_settings(settings)
    runtime.processor = Pipeline(runtime)
    return runtime
