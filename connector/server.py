"""gunicorn, embedded, so `crm-approvals serve` needs no separate config file."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gunicorn.app.base import BaseApplication


class _App(BaseApplication):  # type: ignore[misc]
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


def serve_app(load_app: Callable[[], Any], bind: str, workers: int, threads: int) -> None:
    """Serve the WSGI app `load_app()` returns, under gunicorn."""
    options = {
        "bind": bind,
        "workers": workers,
        "threads": threads,
        "worker_class": "gthread" if threads > 1 else "sync",
        "timeout": 30,
        "graceful_timeout": 10,
        "accesslog": "-",
        # Access log without the query string: a misconfigured sender might put a token there.
        "access_log_format": '%(h)s "%(m)s %(U)s" %(s)s %(b)s %(L)ss',
    }
    _App(load_app, options).run()
