"""A stand-in for the sandbox CRM's record API, for bench/e2e: batch read, batch update and
the (empty) paged queries, each call taking `--delay` seconds. It counts read calls, write
calls and writes per record, so the benchmark can prove none is duplicated. Usage:

    .venv/bin/python -m bench.e2e.crm_standin --port 8765 --delay 0.2
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.read_calls = 0  # reads of the record fields the mapping judges (the worker's)
        self.read_sizes: list[int] = []  # ids per such read call
        self.other_reads = 0  # other reads, e.g. drift repair re-reading what was written
        self.write_calls = 0
        self.writes: Counter[str] = Counter()  # record id -> write-backs received
        self.records: dict[str, dict[str, Any]] = {}  # what was written, as reads then answer
        self.first_write: float | None = None
        self.last_write: float | None = None

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "read_calls": self.read_calls,
                "read_sizes": list(self.read_sizes),
                "other_reads": self.other_reads,
                "write_calls": self.write_calls,
                "records_written": len(self.writes),
                "writes": sum(self.writes.values()),
                "duplicated_records": sum(1 for n in self.writes.values() if n > 1),
                "last_write": self.last_write,
            }


def make_handler(stats: Stats, delay: float) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_args: Any) -> None:
            pass

        def _answer(self, body: Any, status: int = 200) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> Any:
            length = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(length) or b"{}")

        def do_GET(self) -> None:
            if self.path.startswith("/stats"):
                return self._answer(stats.snapshot())
            time.sleep(delay)
            return self._answer({"records": [], "next_cursor": None})  # users, queries: none

        def do_POST(self) -> None:
            body = self._body()
            if self.path == "/reset":
                with stats.lock:
                    stats.__init__()  # type: ignore[misc]
                return self._answer({})
            time.sleep(delay)
            if self.path.endswith("/batch-read"):
                with stats.lock:
                    if "company.credit_score" in body["fields"]:
                        stats.read_calls += 1
                        stats.read_sizes.append(len(body["ids"]))
                    else:
                        stats.other_reads += 1
                fields = body["fields"]
                with stats.lock:
                    records = [
                        {"id": i, "fields": {f: _value(stats.records.get(i, {}), f) for f in fields}}
                        for i in body["ids"]
                    ]
                return self._answer({"records": records})
            if self.path.endswith("/batch-update"):
                now = time.time()
                with stats.lock:
                    stats.write_calls += 1
                    for record in body["records"]:
                        stats.writes[record["id"]] += 1
                        stats.records.setdefault(record["id"], {}).update(record["fields"])
                    stats.first_write = stats.first_write or now
                    stats.last_write = now
                return self._answer({"results": [{"id": r["id"], "ok": True} for r in body["records"]]})
            return self._answer({"error": {"code": "NOT_FOUND", "message": self.path}}, 404)

    return Handler


def _value(written: dict[str, Any], field: str) -> Any:
    """What a read answers: what was written, else the deal every webhook describes (the
    webhooks leave out the company's credit score, so the worker must read it)."""
    if field in written:
        return written[field]
    return {"company.credit_score": 80, "amount": 150000, "stage": "negotiation"}.get(field)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds each CRM call takes")
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(Stats(), args.delay))
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
