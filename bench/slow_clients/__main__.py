"""bench/slow_clients: how long /livez and /healthz take while slow clients hold connections.

For each worker class, `crm-approvals serve` (its defaults otherwise) is started on a fresh
SQLite database; `--clients` connections are opened, half sending a request line and then a
header every 0.5 s, never the blank line that ends the headers, half sending complete
headers of a 100 kB body and then a byte every 0.5 s. While they are open, `--probes` fresh
connections ask for /livez and /healthz in turn; the same probes are also timed with no
slow client, in the same run. A probe that gets no answer within `--timeout` counts as that
time-out. Usage:

    .venv/bin/python -m bench.slow_clients --clients 200 --probes 20
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

from bench.deliveries import SECRET

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def open_slow(port: int, n: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    if n % 2:  # slow headers
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    else:  # slow body
        sock.sendall(
            b"POST /webhooks/standard HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"
        )
    return sock


def trickle(socks: list[socket.socket], stop: threading.Event) -> None:
    while not stop.wait(0.5):
        for n, sock in enumerate(socks):
            with contextlib.suppress(OSError):
                sock.sendall(b"X-Slow: 1\r\n" if n % 2 else b" ")


def probe(base: str, count: int, timeout: float) -> list[float]:
    took = []
    for i in range(count):
        started = time.perf_counter()
        try:
            with requests.Session() as fresh:
                fresh.get(f"{base}{('/livez', '/healthz')[i % 2]}", timeout=timeout)
            took.append(time.perf_counter() - started)
        except requests.RequestException:
            took.append(timeout)
    return took


def measure(worker_class: str, clients: int, probes: int, timeout: float) -> dict[str, list[float]]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-slow-"))
    env_file = tmp / "bench.env"
    env_file.write_text(
        f"DATABASE_URL=sqlite:///{tmp}/bench.db\nQUEUE_URL=sqlite:///{tmp}/queue.db\n"
        f"MAPPINGS_DIR={tmp}\nCRM_CONNECTIONS=sandbox\nSANDBOX_WEBHOOK_SECRET={SECRET}\nLOG_LEVEL=ERROR\n"
    )
    command = [sys.executable, "-m", "connector", "--env-file", str(env_file)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([*command, "db", "upgrade"], cwd=ROOT, env=env, check=True, capture_output=True)
    port = free_port()
    server = subprocess.Popen(
        [*command, "serve", "--bind", f"127.0.0.1:{port}", "--worker-class", worker_class],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    socks: list[socket.socket] = []
    stop = threading.Event()
    try:
        deadline = time.time() + 60
        while True:
            try:
                requests.get(f"{base}/livez", timeout=2)
                break
            except requests.RequestException:
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError(f"serve --worker-class {worker_class} did not start") from None
                time.sleep(0.2)
        quiet = probe(base, probes, timeout)
        socks.extend(open_slow(port, n) for n in range(clients))
        trickler = threading.Thread(target=trickle, args=(socks, stop), daemon=True)
        trickler.start()
        time.sleep(1.0)
        loaded = probe(base, probes, timeout)
        return {"quiet": quiet, "slow": loaded}
    finally:
        stop.set()
        for sock in socks:
            sock.close()
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=200, help="slow connections held open")
    parser.add_argument("--probes", type=int, default=20, help="health requests timed, each phase")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds a probe waits for its answer")
    parser.add_argument("--worker-class", action="append", choices=("waitress", "gthread", "gevent"))
    args = parser.parse_args()
    classes = args.worker_class or ["waitress", "gthread", "gevent"]
    print(f"{'worker class':14} {'clients':>7} {'p50 ms':>8} {'max ms':>8} {'over 1 s':>9}")
    for worker_class in classes:
        result = measure(worker_class, args.clients, args.probes, args.timeout)
        for phase, took in result.items():
            over = sum(t >= 1.0 for t in took)
            print(
                f"{worker_class:14} {args.clients if phase == 'slow' else 0:7} "
                f"{statistics.median(took) * 1000:8.1f} {max(took) * 1000:8.1f} {over:6}/{len(took)}"
            )


if __name__ == "__main__":
    main()
