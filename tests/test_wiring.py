"""Process wiring (connector/wiring.py): the collaborators a runtime judges events with are
its own typed attributes, never process-wide state another runtime could overwrite."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from connector.config import Settings
from connector.runtime import Runtime
from connector.service.pipeline import Pipeline
from connector.storage.migrate import upgrade
from connector.wiring import build_runtime
from connector.worker import Tasks, make_huey
from tests.fakes import MemoryCRM
from tests.processors import CountingProcessor

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def built(settings_factory: Callable[..., Settings]) -> Iterator[Runtime]:
    settings = settings_factory(mappings_dir=str(ROOT / "mappings" / "examples"))
    upgrade(settings.database_url)
    runtime = build_runtime(settings)
    yield runtime
    runtime.close()


def test_build_runtime_attaches_the_pipeline_and_its_collaborators(built: Runtime) -> None:
    assert isinstance(built.processor, Pipeline)
    assert built.mappings is built.processor.mappings
    assert built.mappings.mappings, "the example mapping files were loaded"
    assert built.approvals is built.processor.approvals
    assert [job.name for job in built.sweep_jobs] == [
        "reload_mappings",
        "expire",
        "step_timers",  # before "people", which sends the reminders it queued in the same sweep
        "drift_repair",
        "zoho_channels",
        "people",
        "delegations",
        "service_steps",  # issue 12: checks retried, callbacks timed out
        "request_counts",  # PostgreSQL's delta rows of approval_request_counts folded
    ]
    assert built.approvals is not None and built.approvals.timers is not None
    assert [job.name for job in built.flush_jobs] == ["notifications", "service_steps", "documents"]


def test_each_runtime_sweeps_only_its_own_jobs(
    built: Runtime, settings_factory: Callable[..., Settings], runtime_factory: Callable[[Settings], Runtime]
) -> None:
    plain = runtime_factory(settings_factory())  # built after `built`: nothing of it leaks in
    plain.processor = CountingProcessor()
    assert plain.sweep_jobs == []
    assert set(Tasks(plain, make_huey("memory://")).run_sweep()) == {"inbox", "outbox", "api_usage"}

    built.set_adapter("sandbox", MemoryCRM())
    summary = Tasks(built, make_huey("memory://")).run_sweep()
    assert summary["expire"] == 0  # nothing is due
    assert "reload_mappings" in summary


def test_an_adapter_that_reports_no_api_usage_is_left_out_of_the_sweep_log(runtime: Runtime) -> None:
    runtime.set_adapter("sandbox", MemoryCRM())
    assert runtime.adapter("sandbox").api_usage is None  # the CRMAdapter default
    assert runtime.api_usage() == {}
