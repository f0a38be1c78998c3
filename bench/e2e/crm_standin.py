"""A CRM stand-in for bench/e2e: the record API of the sandbox CRM (this module) or of
HubSpot (bench/e2e/hubspot_standin.py), each call taking `--delay` seconds. Both count the
same things here, in `Stats`: the worker's read calls (and ids per call), other reads (drift
repair re-reading what was written), write calls, and writes per record, so the benchmark can
prove none is duplicated. Usage:

    .venv/bin/python -m bench.e2e.crm_standin --port 8765 --delay 0.2 [--crm hubspot]
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

Answer = tuple[int, Any]  # HTTP status, JSON body


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.read_calls = 0  # reads of the record fields the mapping judges (the worker's)
        self.read_sizes: list[int] = []  # ids per such read call
        self.other_reads = 0  # other reads, e.g. drift repair re-reading what was written
        self.write_calls = 0
        self.write_sizes: list[int] = []  # records per write call
        self.writes: Counter[str] = Counter()  # record id -> write-backs received
        self.records: dict[str, dict[str, Any]] = {}  # what was written, as reads then answer
        self.first_write: float | None = None
        self.last_write: float | None = None
        # Every API call: (start, end, path, the client's port): which calls overlapped, and
        # which connection (so which worker process) made them.
        self.calls: list[tuple[float, float, str, int]] = []

    def read(
        self, ids: Sequence[str], fields: Sequence[str], *, judged: bool, defaults: Mapping[str, Any]
    ) -> list[tuple[str, dict[str, Any]]]:
        """Count one read call; answer each id's fields: what was written, else `defaults`."""
        with self.lock:
            if judged:
                self.read_calls += 1
                self.read_sizes.append(len(ids))
            else:
                self.other_reads += 1
            return [(i, {f: self.records.get(i, {}).get(f, defaults.get(f)) for f in fields}) for i in ids]

    def write(self, records: Iterable[tuple[str, Mapping[str, Any]]]) -> None:
        """Count one write call of (id, fields) records."""
        now = time.time()
        with self.lock:
            self.write_calls += 1
            size = 0
            for record_id, fields in records:
                self.writes[record_id] += 1
                self.records.setdefault(record_id, {}).update(fields)
                size += 1
            self.write_sizes.append(size)
            self.first_write = self.first_write or now
            self.last_write = now

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "read_calls": self.read_calls,
                "read_sizes": list(self.read_sizes),
                "other_reads": self.other_reads,
                "write_calls": self.write_calls,
                "write_sizes": list(self.write_sizes),
                "records_written": len(self.writes),
                "writes": sum(self.writes.values()),
                "duplicated_records": sum(1 for n in self.writes.values() if n > 1),
                "last_write": self.last_write,
                "calls": list(self.calls),
            }


class CRMApi(Protocol):
    """One CRM's record API as the stand-in answers it: (status, JSON body), None = 404."""

    def get(self, path: str, stats: Stats) -> Answer | None: ...

    def post(self, path: str, body: Any, stats: Stats) -> Answer | None: ...


class SandboxApi:
    """The sandbox CRM's batch read, batch update and (empty) paged queries and users."""

    # What a read answers for a field nobody wrote: the deal every webhook describes. The
    # webhooks leave out the company's credit score, so the worker must read it.
    DEFAULTS = {"company.credit_score": 80, "amount": 150000, "stage": "negotiation"}
    JUDGED = "company.credit_score"  # only the worker's reads ask for it

    def get(self, path: str, stats: Stats) -> Answer | None:
        return 200, {"records": [], "next_cursor": None}  # users, queries: none

    def post(self, path: str, body: Any, stats: Stats) -> Answer | None:
        if path.endswith("/batch-read"):
            fields = body["fields"]
            found = stats.read(body["ids"], fields, judged=self.JUDGED in fields, defaults=self.DEFAULTS)
            return 200, {"records": [{"id": i, "fields": values} for i, values in found]}
        if path.endswith("/batch-update"):
            stats.write((r["id"], r["fields"]) for r in body["records"])
            return 200, {"results": [{"id": r["id"], "ok": True} for r in body["records"]]}
        return None


def make_handler(stats: Stats, delay: float, api: CRMApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # The headers and the body go out in two writes: with Nagle's algorithm the second
        # waits for the client's delayed ACK of the first, 40 ms a call on a kept-alive
        # connection, which made an "instant" CRM take 40 ms a call.
        disable_nagle_algorithm = True

        def log_message(self, *_args: Any) -> None:
            pass

        def _answer(self, answer: Answer | None) -> None:
            status, body = answer or (404, {"error": {"code": "NOT_FOUND", "message": self.path}})
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> Any:
            length = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(length) or b"{}")

        def _call(self, answer: Callable[[], Answer | None]) -> None:
            start = time.time()
            time.sleep(delay)
            result = answer()
            with stats.lock:
                stats.calls.append((start, time.time(), self.path, self.client_address[1]))
            return self._answer(result)

        def do_GET(self) -> None:
            if self.path.startswith("/stats"):
                return self._answer((200, stats.snapshot()))
            return self._call(lambda: api.get(self.path, stats))

        def do_POST(self) -> None:
            body = self._body()
            if self.path == "/reset":
                with stats.lock:
                    stats.__init__()  # type: ignore[misc]
                return self._answer((200, {}))
            return self._call(lambda: api.post(self.path, body, stats))

    return Handler


def apis() -> dict[str, CRMApi]:
    from bench.e2e.hubspot_standin import HubSpotApi

    return {"sandbox": SandboxApi(), "hubspot": HubSpotApi()}


def serve(port: int, delay: float, api: CRMApi) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", port), make_handler(Stats(), delay, api))
    server.daemon_threads = True
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds each CRM call takes")
    parser.add_argument("--crm", choices=sorted(apis()), default="sandbox", help="whose API to answer")
    args = parser.parse_args()
    serve(args.port, args.delay, apis()[args.crm]).serve_forever()


if __name__ == "__main__":
    main()
