"""gunicorn, embedded, so `crm-approvals serve` needs no separate config file."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gunicorn.app.base import BaseApplication


class _App(BaseApplication):
    def __init__(self, load_app: Callable[[], Any], options: dict[str, Any]) -> None:
        self.load_app = load_app
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        # Called in each worker after the fork: every worker builds its own engine and pools.
        return self.load_app()


# The worker classes `serve` offers, by the name it takes, and what gunicorn is given.
# waitress (the default): each worker reads every connection in an event loop and hands a
# thread only complete requests, so a client trickling its headers or body holds nothing but
# its socket; gthread pins a thread per request being read, so 200 slow clients starve
# /healthz; gevent survives them but blocks a worker during each commit (docs/decisions.md,
# "Serving slow clients").
WORKER_CLASSES = {
    "waitress": "connector.waitress_worker.WaitressWorker",
    "gthread": "gthread",
    "gevent": "gevent",
}
DEFAULT_WORKER_CLASS = "waitress"
WORKER_CONNECTIONS = 1000  # per worker process (waitress, gevent): open connections, slow ones included


def serve_app(
    load_app: Callable[[], Any],
    bind: str,
    workers: int,
    threads: int,
    worker_class: str = DEFAULT_WORKER_CLASS,
) -> None:
    """Serve the WSGI app `load_app()` returns, under gunicorn (`threads`: not for gevent)."""
    if worker_class not in WORKER_CLASSES:
        raise ValueError(f"worker class must be one of {tuple(WORKER_CLASSES)}, got {worker_class!r}")
    options = {
        "bind": bind,
        "workers": workers,
        "threads": threads,
        "worker_class": WORKER_CLASSES[worker_class],
        "worker_connections": WORKER_CONNECTIONS,
        "timeout": 30,
        "graceful_timeout": 10,
        "accesslog": "-",
        # Access log without the query string: a misconfigured sender might put a token there.
        "access_log_format": '%(h)s "%(m)s %(U)s" %(s)s %(b)s %(L)ss',
    }
    _App(load_app, options).run()


_PID_FILE = re.compile(r"_(\d+)\.db$")


def prepare_metrics_dir(directory: str) -> Path:
    """Point prometheus-client at the shared multiprocess directory (connector/metrics.py).

    Call it first thing in a process that serves or works, before anything imports
    prometheus_client: the library picks its mode at import. Files left by processes that
    no longer run (an earlier start) are removed, so totals start afresh with this start
    (Prometheus sees a counter reset); files of live processes, e.g. a worker started
    before this server, are kept.
    """
    if "prometheus_client" in sys.modules and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        raise RuntimeError("prepare_metrics_dir must run before prometheus_client is imported")
    path = Path(directory).resolve()
    path.mkdir(parents=True, exist_ok=True)
    for file in path.glob("*.db"):
        match = _PID_FILE.search(file.name)
        if match and not _alive(int(match.group(1))):
            file.unlink(missing_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True
