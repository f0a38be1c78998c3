"""gunicorn, embedded, so `crm-approvals serve` needs no separate config file."""

from __future__ import annotations

from typing import Any

from gunicorn.app.base import BaseApplication


class _App(BaseApplication):  # type: ignore[misc]
    def __init__(self, app_uri: str, options: dict[str, Any]) -> None:
        self.app_uri = app_uri
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        from gunicorn.util import import_app

        return import_app(self.app_uri)


def serve_app(app_uri: str, bind: str, workers: int, threads: int) -> None:
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
    _App(app_uri, options).run()
