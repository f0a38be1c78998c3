"""What one process needs to do its work: settings, the database, CRM adapters and, in a
process that judges events, the event processor, the live mapping files, the approval
service and the jobs of the periodic sweep. `connector/wiring.py` builds a full one; the
web app and the worker each build one from the same Settings."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from connector.config import Settings
from connector.crm.base import CRMAdapter
from connector.crm.rate_limits import attach as attach_rate_limiter
from connector.crm.rate_limits import limits_for
from connector.crm.registry import build_adapter, check_kinds
from connector.storage.db import make_engine, make_session_factory

if TYPE_CHECKING:
    from connector.notify.render import LinkProvider
    from connector.rules import MappingSet
    from connector.service.approval_service import ApprovalService
    from connector.storage.inbox import EventProcessor


@dataclass(frozen=True)
class SweepJob:
    """A job the worker's periodic sweep runs after the inbox and outbox (e.g. expiry)."""

    name: str  # its key in the sweep's log summary
    run: Callable[[Runtime], Any]


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    processor: EventProcessor | None = None
    mappings: MappingSet | None = None  # None: this process judges nothing
    approvals: ApprovalService | None = None  # None: the API answers 503 to votes
    sweep_jobs: list[SweepJob] = field(default_factory=list)
    flush_jobs: list[SweepJob] = field(default_factory=list)  # also run after every outbox flush
    link_providers: list[LinkProvider] = field(default_factory=list)  # one-click links in messages
    _adapters: dict[str, CRMAdapter] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def from_settings(cls, settings: Settings, processor: EventProcessor | None = None) -> Runtime:
        check_kinds(settings)
        for connection in settings.connections.values():
            limits_for(connection)  # a malformed NAME_RATE_LIMITS stops start-up, naming it
        engine = make_engine(settings.database_url)
        runtime = cls(settings=settings, engine=engine, sessions=make_session_factory(engine))
        runtime.processor = processor
        return runtime

    def adapter(self, connection_name: str) -> CRMAdapter:
        """The adapter of a configured connection, built once per process."""
        with self._lock:
            if connection_name not in self._adapters:
                connection = self.settings.connection(connection_name)
                adapter = build_adapter(connection, self.settings)
                attach_rate_limiter(
                    adapter, self.settings.queue_url, self.sessions
                )  # shared by every process
                self._adapters[connection_name] = adapter
            return self._adapters[connection_name]

    def set_adapter(self, connection_name: str, adapter: CRMAdapter) -> None:
        """Use a ready-built adapter (e.g. one with a test retry policy)."""
        with self._lock:
            self._adapters[connection_name] = adapter

    def api_usage(self) -> dict[str, str]:
        """API quota use the CRMs reported on their last response (e.g. Sforce-Limit-Info)."""
        with self._lock:
            adapters = dict(self._adapters)
        usage = {name: adapter.api_usage for name, adapter in adapters.items()}
        return {name: f"{u.used}/{u.limit} used today" for name, u in usage.items() if u is not None}

    def close(self) -> None:
        self.engine.dispose()

    def __getstate__(self) -> dict[str, Any]:  # never pickled into a queue
        raise TypeError("Runtime is per process and cannot be serialized")
