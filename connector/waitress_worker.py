"""A gunicorn worker that serves with waitress: slow clients cost a socket, not a thread.

gunicorn keeps doing what the team chose it for (processes, the shared listening socket,
heartbeats, restarts, graceful stops); inside each worker process, waitress's event loop
reads every connection without blocking and buffers a request completely (headers and
body, spilled to a temporary file past `inbuf_overflow`) before one of the worker's
threads sees it. A client trickling its headers or its body therefore holds no thread,
unlike gunicorn's gthread worker, where it pins one of the few until it finishes
(docs/decisions.md, "Serving slow clients"). The app still runs in real threads, so the
inbox's group commit overlaps requests exactly as under gthread.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from gunicorn.workers.base import Worker

# Seconds a connection may stay silent (no byte in or out) before waitress closes it.
CHANNEL_TIMEOUT = 60
DEFAULT_MAX_BODY = 4 * 1024 * 1024  # for an app that sets no MAX_CONTENT_LENGTH
LOOP_TIMEOUT = 1.0  # seconds between heartbeats to the gunicorn arbiter

access_log = logging.getLogger("gunicorn.access")


class WaitressWorker(Worker):
    """`--worker-class connector.waitress_worker.WaitressWorker`: threads from `--threads`,
    open connections per process (slow ones included) from `--worker-connections`."""

    def run(self) -> None:
        from waitress import wasyncore
        from waitress.server import create_server

        # Bodies are buffered whole before the app runs, so bound them: up to twice the app's
        # MAX_CONTENT_LENGTH reaches the app, which refuses the excess with its own 413 in
        # its own error format; beyond that waitress answers 413 itself without reading on.
        app_limit = getattr(self.wsgi, "config", {}).get("MAX_CONTENT_LENGTH") or DEFAULT_MAX_BODY
        sockets: dict[int, Any] = {}
        server = create_server(
            _AccessLog(self.wsgi) if self.cfg.accesslog else self.wsgi,
            map=sockets,
            sockets=[listener.sock for listener in self.sockets],
            threads=self.cfg.threads,
            connection_limit=self.cfg.worker_connections,
            channel_timeout=CHANNEL_TIMEOUT,
            backlog=self.cfg.backlog,
            max_request_body_size=2 * app_limit,
            asyncore_use_poll=True,  # select() stops at 1024 descriptors
            expose_tracebacks=False,
            ident="crm-approvals",
            # The thread that made a response sends it at once, instead of queueing it for the
            # event loop and waking it (measured: bench/ingest, docs/benchmarks.md).
            send_bytes=1,
            **_proxy_settings(self.cfg.forwarded_allow_ips),
        )
        listeners = [d for d in sockets.values() if getattr(d, "accepting", False)]
        next_beat = 0.0
        while self.alive:
            now = time.monotonic()
            if now >= next_beat:  # not on every loop: under load the loop turns per request
                self.notify()
                next_beat = now + LOOP_TIMEOUT
                if self.ppid != os.getppid():
                    self.log.info("Parent changed, shutting down: %s", self)
                    break
            wasyncore.loop(timeout=LOOP_TIMEOUT, map=sockets, use_poll=True, count=1)
        # Graceful stop: accept nothing new, let the requests already read finish and flush.
        for listener in listeners:
            listener.accepting = False
            listener.del_channel()
        deadline = time.monotonic() + self.cfg.graceful_timeout
        while time.monotonic() < deadline and any(_busy(d) for d in list(sockets.values())):
            self.notify()
            wasyncore.loop(timeout=0.1, map=sockets, use_poll=True, count=1)
        server.task_dispatcher.shutdown(cancel_pending=True, timeout=1)
        wasyncore.close_all(sockets)


def _proxy_settings(forwarded_allow_ips: list[str]) -> dict[str, Any]:
    """As gunicorn does for its own workers: X-Forwarded-Proto is believed from the addresses
    in `--forwarded-allow-ips` (by default the local host, where a TLS proxy usually runs),
    so that the app sees https behind it. waitress trusts one address or all."""
    ips = [ip.strip() for ip in forwarded_allow_ips]
    if "*" in ips or "127.0.0.1" in ips:
        proxy = "*" if "*" in ips else "127.0.0.1"
    elif len(ips) == 1:
        proxy = ips[0]
    else:
        return {}
    return {"trusted_proxy": proxy, "trusted_proxy_headers": {"x-forwarded-proto"}}


def _busy(dispatcher: Any) -> bool:
    """A channel with a request in hand or a response still to send."""
    return bool(getattr(dispatcher, "requests", None)) or bool(getattr(dispatcher, "total_outbufs_len", 0))


class _AccessLog:
    """One access-log line per request through gunicorn's logger, as the gthread worker
    writes it (waitress itself logs no requests)."""

    def __init__(self, app: Callable[..., Any]) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        started = time.monotonic()
        status: list[str] = []

        def recording_start_response(code: str, headers: list[Any], exc_info: Any = None) -> Any:
            status[:] = [code]
            return start_response(code, headers, exc_info)

        body = self.app(environ, recording_start_response)
        try:
            yield from body
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()
            # Path without the query string: a misconfigured sender might put a token there.
            access_log.info(
                '%s "%s %s" %s %.3fs',
                environ.get("REMOTE_ADDR", "-"),
                environ.get("REQUEST_METHOD", "-"),
                environ.get("PATH_INFO", "-"),
                (status[0].split(" ", 1)[0] if status else "-"),
                time.monotonic() - started,
            )
