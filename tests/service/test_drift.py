"""In-doubt write-backs and drift repair against Salesforce's own formats (mocked with
`responses`): a timed-out sObject Collections PATCH is read back before anything is resent,
nothing newer is sent while it is in doubt, and when Salesforce applies the timed-out call
late, over a newer write, drift repair puts the newer values back."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
import requests
import responses
from sqlalchemy import select

from connector.clock import utcnow
from connector.config import Settings, parse_connections
from connector.crm.retry import RetryPolicy
from connector.crm.salesforce import SalesforceAdapter
from connector.runtime import Runtime
from connector.service.drift import DriftRepairJob, repair_drift
from connector.storage.audit import verify
from connector.storage.db import transaction
from connector.storage.models import AuditEntry, DeadLetter, OutboxUpdate
from connector.storage.outbox import enqueue_update, flush
from tests.contract.harness_salesforce import (
    COLLECTIONS_URL,
    INSTANCE,
    QUERY_URL,
    api_error,
    opportunity_ids,
    save_success,
    soql_record,
)

CONNECTION = "sf"
ENV = {
    "CRM_CONNECTIONS": "sf=salesforce",
    "SF_SESSION_ID": "00DDn00000ABCDE!AQ4AQSession",
    "SF_INSTANCE_URL": INSTANCE,
}
RECORD, OTHER = opportunity_ids(2)
STATUS, EXPIRES = "Approval_Status__c", "Approval_Expires__c"
PENDING = {STATUS: "Pending"}
APPROVED = {STATUS: "Approved", EXPIRES: "2027-05-22"}


@dataclass
class FakeOrg:
    """Opportunities behind the REST API: PATCH composite/sobjects and SOQL queries."""

    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    time_out_next_write: bool = False
    reads_fail: bool = False
    late: list[dict[str, Any]] = field(default_factory=list)  # timed-out PATCH bodies not yet applied
    patches: list[dict[str, dict[str, Any]]] = field(default_factory=list)  # id -> fields, per call

    def patch(self, request: requests.PreparedRequest) -> Any:
        body = json.loads(request.body or b"{}")
        sent = {
            r["id"]: {k: v for k, v in r.items() if k not in ("id", "attributes")} for r in body["records"]
        }
        self.patches.append(sent)
        if self.time_out_next_write:
            self.time_out_next_write = False
            self.late.append(sent)  # Salesforce got it, and will apply it after we gave up waiting
            return requests.ReadTimeout("HTTPSConnectionPool: Read timed out. (read timeout=30)")
        self._apply(sent)
        return 200, {}, json.dumps([save_success(record_id) for record_id in sent])

    def apply_late(self) -> None:
        for sent in self.late:
            self._apply(sent)
        self.late.clear()

    def query(self, request: requests.PreparedRequest) -> Any:
        if self.reads_fail:
            return 503, {}, api_error("SERVER_UNAVAILABLE", "Server temporarily unavailable")
        soql = parse_qs(urlparse(request.url).query)["q"][0]
        fields = [f.strip() for f in soql.split(" FROM ")[0].removeprefix("SELECT ").split(",")]
        ids = re.findall(r"'([A-Za-z0-9]{18})'", soql)
        found = [
            soql_record("Opportunity", i, {f: self.records[i].get(f) for f in fields if f != "Id"})
            for i in ids
            if i in self.records
        ]
        return 200, {}, json.dumps({"totalSize": len(found), "done": True, "records": found})

    def _apply(self, sent: dict[str, dict[str, Any]]) -> None:
        for record_id, values in sent.items():
            self.records.setdefault(record_id, {}).update(values)


@pytest.fixture
def org() -> Iterator[FakeOrg]:
    fake = FakeOrg(
        records={RECORD: {STATUS: None, EXPIRES: None}, OTHER: {STATUS: "Approved", EXPIRES: None}}
    )
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.add_callback(responses.PATCH, COLLECTIONS_URL, callback=fake.patch)
        rsps.add_callback(responses.GET, QUERY_URL, callback=fake.query)
        yield fake


@pytest.fixture
def sf(either: Runtime, org: FakeOrg) -> Runtime:
    runtime = either
    connections = parse_connections(ENV)
    adapter = SalesforceAdapter.from_config(connections[CONNECTION], Settings(connections=connections))
    adapter.retry = RetryPolicy(attempts=3, sleep=lambda _seconds: None)
    runtime.set_adapter(CONNECTION, adapter)
    return runtime


def enqueue(runtime: Runtime, fields: dict[str, Any], record_id: str = RECORD) -> None:
    with transaction(runtime.sessions) as session:
        enqueue_update(session, CONNECTION, "Opportunity", record_id, fields, reason="test")


def send(runtime: Runtime, **kwargs: Any) -> Any:
    return flush(runtime.sessions, runtime.adapter, **kwargs)


def later(minutes: int = 10) -> Any:
    return utcnow() + timedelta(minutes=minutes)


def audit_kinds(runtime: Runtime) -> list[str]:
    with runtime.sessions() as session:
        return list(session.scalars(select(AuditEntry.kind).order_by(AuditEntry.id)))


# --- the story of the issue ---------------------------------------------------------------


def test_a_timed_out_write_applied_late_over_a_newer_one_is_repaired(sf: Runtime, org: FakeOrg) -> None:
    enqueue(sf, PENDING)
    org.time_out_next_write = True
    report = send(sf)
    assert report.in_doubt == 1 and len(org.patches) == 1  # not sent again at once
    assert "writeback_in_doubt" in audit_kinds(sf)

    enqueue(sf, APPROVED)  # the request got approved meanwhile
    org.reads_fail = True
    send(sf, now=later())
    assert len(org.patches) == 1, "nothing is sent while the older write is in doubt"

    org.reads_fail = False
    report = send(sf)  # read back: the timed-out write has not landed; it waits out its backoff
    assert len(org.patches) == 1 and report.confirmed_by_read_back == 0
    assert send(sf, now=later()).done == 1  # then both rows go as one request, newest values winning
    assert org.patches[-1] == {RECORD: APPROVED}
    assert org.records[RECORD] == APPROVED

    org.apply_late()  # Salesforce applies the timed-out PATCH after all
    assert org.records[RECORD][STATUS] == "Pending"

    (drift,) = repair_drift(sf.sessions, sf.adapter, window=timedelta(hours=24))
    assert (drift.record_id, drift.intended, drift.found, drift.queued) == (
        RECORD,
        {STATUS: "Approved"},
        {STATUS: "Pending"},
        True,
    )
    assert send(sf).done == 1
    assert org.patches[-1] == {RECORD: {STATUS: "Approved"}}
    assert org.records[RECORD] == APPROVED  # the newer values, in the end
    assert repair_drift(sf.sessions, sf.adapter, window=timedelta(hours=24)) == []
    assert audit_kinds(sf).count("drift_repaired") == 1
    assert verify(sf.sessions).ok


def test_a_timed_out_write_that_landed_is_confirmed_by_read_back_not_resent(
    sf: Runtime, org: FakeOrg
) -> None:
    enqueue(sf, APPROVED)
    org.time_out_next_write = True
    send(sf)
    org.apply_late()  # applied before we read back
    report = send(sf)
    assert report.confirmed_by_read_back == 1 and len(org.patches) == 1
    with sf.sessions() as session:
        assert session.scalars(select(OutboxUpdate.status)).all() == ["done"]


def test_writes_that_keep_timing_out_and_never_land_are_dead_lettered(sf: Runtime, org: FakeOrg) -> None:
    enqueue(sf, APPROVED)
    when = utcnow()
    reports = []
    for attempt in range(1, 4):
        org.time_out_next_write = True
        assert send(sf, now=when, max_attempts=3).in_doubt == 1
        assert len(org.patches) == attempt
        when += timedelta(hours=2)
        reports.append(send(sf, now=when, max_attempts=3))  # read back: not there
        when += timedelta(hours=2)
    assert [r.dead for r in reports] == [0, 0, 1] and len(org.patches) == 3
    with sf.sessions() as session:
        (letter,) = session.scalars(select(DeadLetter)).all()
    assert letter.error_code == "in_doubt" and "never landed" in letter.error_message


# --- drift repair, one rule at a time -------------------------------------------------------


def written(sf: Runtime, org: FakeOrg, *fields: dict[str, Any], record_id: str = RECORD) -> None:
    for values in fields:
        enqueue(sf, values, record_id)
    send(sf)


def test_dry_run_reports_without_queuing(sf: Runtime, org: FakeOrg) -> None:
    written(sf, org, APPROVED)
    org.records[RECORD][STATUS] = "Pending"
    (drift,) = repair_drift(sf.sessions, sf.adapter, window=timedelta(hours=1), dry_run=True)
    assert drift.intended == {STATUS: "Approved"} and not drift.queued
    with sf.sessions() as session:
        assert session.scalars(select(OutboxUpdate.status)).all() == ["done"]
    assert "drift_repaired" not in audit_kinds(sf)


def test_only_records_written_inside_the_window_are_compared(sf: Runtime, org: FakeOrg) -> None:
    written(sf, org, APPROVED)
    org.records[RECORD][STATUS] = "Pending"
    assert repair_drift(sf.sessions, sf.adapter, window=timedelta(hours=1), now=later(120)) == []


def test_records_the_outbox_is_still_on_are_left_alone(sf: Runtime, org: FakeOrg) -> None:
    written(sf, org, APPROVED)
    org.records[RECORD][STATUS] = "Pending"
    enqueue(sf, {STATUS: "Expired"})  # pending: it will be sent anyway
    assert repair_drift(sf.sessions, sf.adapter, window=timedelta(hours=1)) == []


def test_a_field_whose_last_write_was_refused_is_not_repaired(sf: Runtime, org: FakeOrg) -> None:
    written(sf, org, APPROVED)
    with transaction(sf.sessions) as session:
        enqueue_update(session, CONNECTION, "Opportunity", RECORD, {STATUS: "Bogus"})
        session.flush()
        row = session.scalars(select(OutboxUpdate).order_by(OutboxUpdate.id.desc())).first()
        assert row is not None
        row.status = "dead"  # the CRM refused it; a dead letter waits for a person
    org.records[RECORD].update({STATUS: "Pending", EXPIRES: None})
    (drift,) = repair_drift(sf.sessions, sf.adapter, window=timedelta(hours=1))
    assert drift.intended == {EXPIRES: "2027-05-22"}


def test_untouched_records_and_matching_values_are_not_drift(sf: Runtime, org: FakeOrg) -> None:
    written(sf, org, {STATUS: "Approved", "Amount": 1500})
    org.records[RECORD]["Amount"] = 1500.0  # numbers compare by value
    org.records[OTHER][STATUS] = "Rejected"  # never written by us
    assert repair_drift(sf.sessions, sf.adapter, window=timedelta(hours=1)) == []


def test_a_failed_read_skips_the_run_without_queuing(sf: Runtime, org: FakeOrg) -> None:
    written(sf, org, APPROVED)
    org.records[RECORD][STATUS] = "Pending"
    org.reads_fail = True
    assert repair_drift(sf.sessions, sf.adapter, window=timedelta(hours=1)) == []


def test_the_sweep_job_runs_at_its_interval_and_is_off_with_a_zero_window(sf: Runtime, org: FakeOrg) -> None:
    written(sf, org, APPROVED)
    org.records[RECORD][STATUS] = "Pending"
    ticks = iter([0.0, 60.0, 901.0])
    job = DriftRepairJob(timedelta(hours=24), timedelta(minutes=15), clock=lambda: next(ticks))
    assert job(sf) == {"drifted": 1, "requeued": 1}
    assert job(sf) is None  # 1 minute later: not yet
    send(sf)
    assert job(sf) == {"drifted": 0, "requeued": 0}
    assert DriftRepairJob(timedelta(0), timedelta(0))(sf) is None


def test_the_worker_registers_drift_repair_on_its_sweep(settings_factory: Callable[..., Settings]) -> None:
    from connector.storage.migrate import upgrade
    from connector.wiring import build_runtime

    settings = settings_factory(drift_repair_window_hours=6, drift_repair_interval_minutes=5)
    upgrade(settings.database_url)
    runtime = build_runtime(settings)
    try:
        job = next(j.run for j in runtime.sweep_jobs if j.name == "drift_repair")
        assert isinstance(job, DriftRepairJob)
        assert (job.window, job.interval) == (timedelta(hours=6), timedelta(minutes=5))
    finally:
        runtime.close()


def test_drift_settings_come_from_the_environment() -> None:
    settings = Settings.from_env(
        {"DRIFT_REPAIR_WINDOW_HOURS": "48", "DRIFT_REPAIR_INTERVAL_MINUTES": "30"}, None
    )
    assert (settings.drift_repair_window_hours, settings.drift_repair_interval_minutes) == (48, 30)
    assert Settings.from_env({}, None).drift_repair_window_hours == 24
