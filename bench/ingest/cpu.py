"""bench/ingest/cpu: CPU time per signed webhook, ours vs the bare Flask ceiling, in-process.

The same deliveries as `python -m bench.ingest`, posted one after another through each app's
WSGI interface (Flask's test client, so no HTTP server and no client process), counting the
process's CPU time rather than wall time: on a machine shared with other work this stays
comparable between runs where throughput does not. It leaves out the HTTP server and the
clients, which cost both apps the same. Usage:

    .venv/bin/python -m bench.ingest.cpu --requests 2000
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.deliveries import SECRET, signed_delivery


def deliveries(count: int, offset: int) -> list[tuple[bytes, dict[str, str]]]:
    return [signed_delivery(f"D-{offset + i}", 100000 + i, "Negotiation") for i in range(count)]


def cpu_ms_per_request(app: Any, count: int) -> float:
    client = app.test_client()
    for body, headers in deliveries(100, 0):  # warm-up
        client.post("/webhooks/standard", data=body, headers=headers)
    batch = deliveries(count, 10_000)
    started = time.process_time()
    for body, headers in batch:
        answer = client.post("/webhooks/standard", data=body, headers=headers)
        assert answer.status_code == 202, answer.get_data(as_text=True)
    return (time.process_time() - started) / count * 1000


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-cpu-"))
    os.environ.update(
        {
            "DATABASE_URL": f"sqlite:///{tmp}/bench.db",
            "QUEUE_URL": f"sqlite:///{tmp}/queue.db",
            "CRM_CONNECTIONS": "sandbox",
            "SANDBOX_WEBHOOK_SECRET": SECRET,
            "LOG_LEVEL": "WARNING",
            "SECRET_KEY": "bench-ingest-" + "k" * 40,  # as in production, and bench.ingest
        }
    )
    from bench.ingest.ceiling_app import app as ceiling
    from connector.storage.migrate import upgrade
    from webhooks.app import create_app

    upgrade(os.environ["DATABASE_URL"])
    ceiling_ms = cpu_ms_per_request(ceiling, args.requests)
    ours_ms = cpu_ms_per_request(create_app(), args.requests)
    print(f"CPU ms per request: ceiling (bare Flask) {ceiling_ms:.3f}, crm-approvals {ours_ms:.3f}")
    print(f"ratio (ceiling / ours): {ceiling_ms / ours_ms:.2f}x")


if __name__ == "__main__":
    main()
