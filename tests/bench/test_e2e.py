"""bench/e2e's pieces that carry logic: the HubSpot stand-in answers our real HubSpot adapter
and counts what it is asked, the bench's HubSpot deliveries pass our intake as HubSpot's do,
and a small run of the whole bench lands every write-back at ceil(N/100) calls."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask

from bench.deliveries import HUBSPOT_SECRET, hubspot_delivery
from bench.e2e.__main__ import CRMS, ceiling_seconds, hubspot_id, overlap, sign_hubspot, tree_cpu
from bench.e2e.crm_standin import apis, serve
from bench.ingest.__main__ import cpu_seconds, free_port
from connector.crm.base import RecordUpdate
from connector.crm.hubspot import HubSpotAdapter
from connector.events import RecordChangeEvent
from connector.runtime import Runtime
from connector.storage.inbox import accept
from connector.storage.models import InboxEvent

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def standin(delay: float) -> Iterator[str]:
    port = free_port()
    server = serve(port, delay, apis()["hubspot"])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def hubspot_standin() -> Iterator[str]:
    with standin(0.0) as url:
        yield url


def stats(url: str) -> dict[str, Any]:
    return requests.get(f"{url}/stats", timeout=5).json()


def test_the_hubspot_standin_answers_our_hubspot_adapter_and_counts_its_calls(hubspot_standin: str) -> None:
    adapter = CRMS["hubspot"].adapter(hubspot_standin)
    assert isinstance(adapter, HubSpotAdapter)
    ids = [hubspot_id(i) for i in range(150)]

    found = adapter.get_records("deals", ids, ["amount", "dealstage", "approval_status"])
    assert found[ids[0]] == {"amount": "150000", "dealstage": "contractsent", "approval_status": None}
    assert set(found) == set(ids)

    results = adapter.update_records("deals", [RecordUpdate(i, {"approval_status": "Pending"}) for i in ids])
    assert all(r.ok for r in results) and len(results) == 150
    assert adapter.update_records("deals", [RecordUpdate(ids[0], {"approval_status": "Approved"})])[0].ok

    # A read of what was written (drift repair's) answers it and is counted apart from the
    # worker's reads, which ask for the deal stage the webhooks do not carry.
    again = adapter.get_records("deals", ids[:2], ["approval_status"])
    assert again == {ids[0]: {"approval_status": "Approved"}, ids[1]: {"approval_status": "Pending"}}
    counted = stats(hubspot_standin)
    assert (counted["read_calls"], counted["read_sizes"], counted["other_reads"]) == (2, [100, 50], 1)
    assert (counted["write_calls"], counted["write_sizes"]) == (3, [100, 50, 1])
    assert (counted["records_written"], counted["writes"], counted["duplicated_records"]) == (150, 151, 1)

    # What else the worker calls: owners (both pages), teams, properties, search.
    assert list(adapter.list_users()) == []
    assert list(adapter.list_queues()) == []
    assert {f.name for f in adapter.describe("deals")} >= {"amount", "dealstage", "approval_status"}
    assert list(adapter.query("deals", ["amount"], {"dealstage": "contractsent"})) == []


def test_the_hubspot_standin_refuses_more_than_100_inputs_as_hubspot_does(hubspot_standin: str) -> None:
    body = {"properties": ["amount"], "inputs": [{"id": str(i)} for i in range(101)]}
    answer = requests.post(f"{hubspot_standin}/crm/v3/objects/deals/batch/read", json=body, timeout=5)
    assert answer.status_code == 400
    assert answer.json()["category"] == "VALIDATION_ERROR"
    assert stats(hubspot_standin)["read_calls"] == 0


def test_the_ceiling_writes_through_the_same_adapter_at_the_batch_limit(hubspot_standin: str) -> None:
    assert ceiling_seconds(CRMS["hubspot"], hubspot_standin, 250) > 0
    counted = stats(hubspot_standin)
    assert counted["write_sizes"] == [100, 100, 50]
    assert counted["duplicated_records"] == 0


def test_the_bench_s_hubspot_deliveries_pass_our_intake(
    runtime_factory: Callable[..., Runtime],
    settings_factory: Callable[..., Any],
    app_factory: Callable[[Runtime], Flask],
) -> None:
    env = CRMS["hubspot"].env("http://127.0.0.1:9")
    runtime = runtime_factory(settings_factory(env=env))
    client = app_factory(runtime).test_client()
    deliveries = sign_hubspot(150, runtime.settings.public_base_url)
    assert [len(json.loads(body)) for body, _headers in deliveries] == [100, 50]
    for body, headers in deliveries:
        answer = client.post("/webhooks/hubspot", data=body, headers=headers)
        assert answer.status_code == 202, answer.get_data(as_text=True)
    with runtime.sessions() as session:
        events = [
            RecordChangeEvent.from_row(row) for row in session.query(InboxEvent).order_by(InboxEvent.id)
        ]
    assert [e.record_id for e in events] == [hubspot_id(i) for i in range(150)]
    assert {(e.object_type, e.changed_fields, e.values_signed) for e in events} == {
        ("deals", ("amount",), True)
    }
    assert events[7].values == {"amount": "150007"}


def test_a_hubspot_delivery_carries_at_most_100_events() -> None:
    with pytest.raises(ValueError):
        hubspot_delivery("http://x/webhooks/hubspot", [(hubspot_id(i), 1) for i in range(101)], 1)
    _body, headers = hubspot_delivery("http://x/webhooks/hubspot", [("1", 1)], 1)
    assert headers["X-HubSpot-Signature-Version"] == "v3"
    assert HUBSPOT_SECRET not in json.dumps(headers)


def test_one_worker_s_reads_and_writes_overlap_through_the_hubspot_adapter_at_whole_calls(
    tmp_path: Path, runtime_factory: Callable[..., Runtime], settings_factory: Callable[..., Any]
) -> None:
    """One worker's burst against the stand-in (100 ms a call) through the real HubSpot adapter
    and pipeline: the next batch's reads and the last batch's writes are in flight together
    (read ahead, written behind), and it still costs ceil(N/100) reads and writes, each record
    written once. A worker that read, applied and wrote in turn never has two calls in flight."""
    from connector.rules import MappingSet
    from connector.wiring import attach_pipeline
    from connector.worker import Tasks, make_huey
    from webhooks.hubspot import parse_delivery

    total = 1000
    (tmp_path / "mappings").mkdir()
    (tmp_path / "mappings" / "deals.yaml").write_text((ROOT / "bench/e2e/mapping_hubspot.yaml").read_text())
    with standin(0.1) as url:
        settings = settings_factory(env=CRMS["hubspot"].env(url), mappings_dir=str(tmp_path / "mappings"))
        runtime = runtime_factory(settings)
        attach_pipeline(runtime, MappingSet.load(tmp_path / "mappings"))
        connection = settings.connections["hubspot"]
        events = [
            event
            for body, _headers in sign_hubspot(total, settings.public_base_url)
            for event in parse_delivery(connection, json.loads(body))
        ]
        accept(runtime.sessions, events)
        tasks = Tasks(runtime, make_huey("memory://"))
        tasks.run_outbox()  # the adapter's start-up calls (owners, teams), before counting
        requests.post(f"{url}/reset", timeout=5)
        done, more = 0, True
        while more:  # the passes the worker's nudges would run (one, while the burst lasts)
            report = tasks.run_inbox(flush_owed=done > 0)
            done, more = done + report["done"], report["more"]
        tasks.close()
        counted = stats(url)
    calls = math.ceil(total / 100)
    assert done == total
    assert (counted["read_calls"], counted["write_calls"]) == (calls, calls)
    assert (counted["records_written"], counted["duplicated_records"]) == (total, 0)
    reads = [c for c in counted["calls"] if c[2].endswith("/batch/read")]
    writes = [c for c in counted["calls"] if c[2].endswith("/batch/update")]
    assert any(r[0] < w[1] and w[0] < r[1] for r in reads for w in writes)  # a read during a write
    assert overlap(counted["calls"])[0] >= 2


def test_overlap_counts_calls_in_flight() -> None:
    assert overlap([[0.0, 1.0, "/r", 1], [0.5, 1.5, "/r", 2], [2.0, 3.0, "/w", 1]]) == (2, 3.0 / 2.5)
    assert overlap([]) == (0, 0.0)


@pytest.mark.slow
def test_a_small_run_of_the_bench_lands_every_write_back_at_ceil_n_over_100_calls() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.e2e", "--crm", "hubspot", "--records", "150", "--timeout", "120"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    row = re.search(r"^\s+1\s+(\w+)\s+\S+\s+\S+\s+\S+\s+(\d+)/(\d+)\s+(\d+)/(\d+)\s+(\d+)\s*$", out, re.M)
    assert row is not None, out
    done, reads, min_reads, writes, min_writes, duplicated = row.groups()
    assert done == "True"
    assert int(reads) == int(writes) == int(min_reads) == int(min_writes) == math.ceil(150 / 100)
    assert duplicated == "0"
    cpu_line = r"^1 workers: CPU ms per record: poster (\S+), server (\S+), workers (\S+), stand-in (\S+);"
    cpu = re.search(cpu_line, out, re.M)
    assert cpu is not None, out
    assert all(float(ms) > 0 for ms in cpu.groups()[1:3]), out  # the server and the worker did the work


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads CPU time from Linux's /proc")
def test_tree_cpu_counts_a_process_and_its_children() -> None:
    burn = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\n"
    burn += "time.sleep(30)"
    parent = subprocess.Popen(
        [sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', {burn!r}])"]
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and tree_cpu(parent.pid) - cpu_seconds(parent.pid) < 0.3:
            time.sleep(0.1)
        assert tree_cpu(parent.pid) - cpu_seconds(parent.pid) >= 0.3  # the child's burn, counted
    finally:
        for child in Path(f"/proc/{parent.pid}/task/{parent.pid}/children").read_text().split():
            os.kill(int(child), 9)
        parent.kill()
        parent.wait()
