"""The adapter contract: every CRM passes the same tests, against its documented formats."""

from __future__ import annotations

import math

import pytest
import responses

from connector.crm.errors import RetriableError
from connector.crm.retry import RetryPolicy
from tests.contract.discover import adapter_harnesses
from tests.contract.harness import AdapterHarness

NO_WAIT = RetryPolicy(attempts=1, sleep=lambda _s: None)

HARNESSES = adapter_harnesses()


@pytest.fixture(params=HARNESSES, ids=[h.kind for h in HARNESSES])
def harness(request: pytest.FixtureRequest) -> AdapterHarness:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def policy(sleeps: list[float]) -> RetryPolicy:
    return RetryPolicy(attempts=3, sleep=sleeps.append)


def test_write_back_of_250_records_uses_ceil_250_over_limit_calls(
    harness: AdapterHarness, policy: RetryPolicy
) -> None:
    from connector.crm.base import RecordUpdate

    ids = harness.record_ids(250)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        log = harness.mock_updates(rsps)
        results = harness.make_adapter(policy).update_records(
            harness.object_type, [RecordUpdate(i, {"Approval_Status": "Approved"}) for i in ids]
        )
    assert len(log.calls) == math.ceil(250 / harness.batch_limit)
    assert all(len(call) <= harness.batch_limit for call in log.calls)
    assert [r.record_id for r in results] == ids
    assert all(r.ok for r in results)


def test_partial_failure_maps_each_result_back_to_its_record(
    harness: AdapterHarness, policy: RetryPolicy
) -> None:
    from connector.crm.base import RecordUpdate

    ids = harness.record_ids(5)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        harness.mock_updates(rsps, fail={ids[1]: "fatal", ids[3]: "retriable"})
        results = harness.make_adapter(policy).update_records(
            harness.object_type, [RecordUpdate(i, {"Approval_Status": "Approved"}) for i in ids]
        )
    by_id = {r.record_id: r for r in results}
    assert [by_id[i].ok for i in ids] == [True, False, True, False, True]
    fatal, retriable = by_id[ids[1]], by_id[ids[3]]
    assert fatal.error_code == harness.fatal_code and not fatal.retriable
    assert fatal.message  # the CRM's own words reach the dead letter
    assert retriable.retriable


def test_rate_limit_is_retried_honouring_retry_after(
    harness: AdapterHarness, policy: RetryPolicy, sleeps: list[float]
) -> None:
    from connector.crm.base import RecordUpdate

    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        log = harness.mock_throttled_then_ok(rsps, retry_after=7)
        results = harness.make_adapter(policy).update_records(
            harness.object_type, [RecordUpdate("1001", {"A": 1})]
        )
    assert results[0].ok
    assert len(log.calls) == 2
    if harness.sends_retry_after:
        assert sleeps == [7]
    else:
        assert len(sleeps) == 1 and sleeps[0] != 7  # the policy's own backoff


def test_server_errors_are_retried_then_succeed(
    harness: AdapterHarness, policy: RetryPolicy, sleeps: list[float]
) -> None:
    from connector.crm.base import RecordUpdate

    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        log = harness.mock_server_error_then_ok(rsps)
        results = harness.make_adapter(policy).update_records(
            harness.object_type, [RecordUpdate("1001", {"A": 1})]
        )
    assert results[0].ok
    assert len(log.calls) == 2
    assert len(sleeps) == 1


def test_retries_give_up_with_a_retriable_error(harness: AdapterHarness, sleeps: list[float]) -> None:
    from connector.crm.base import RecordUpdate

    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        harness.mock_throttled_then_ok(rsps, retry_after=1)
        adapter = harness.make_adapter(RetryPolicy(attempts=1, sleep=sleeps.append))
        with pytest.raises(RetriableError):
            adapter.update_records(harness.object_type, [RecordUpdate("1001", {"A": 1})])


def test_expired_auth_is_refreshed_once_and_the_call_retried(
    harness: AdapterHarness, policy: RetryPolicy
) -> None:
    from connector.crm.base import RecordUpdate

    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        log = harness.mock_auth_expired_then_ok(rsps)
        results = harness.make_adapter(policy).update_records(
            harness.object_type, [RecordUpdate("1001", {"A": 1})]
        )
    assert results[0].ok
    assert len(log.calls) == 2


def test_get_records_returns_requested_fields_by_api_name(
    harness: AdapterHarness, policy: RetryPolicy
) -> None:
    records = harness.sample_records()
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        harness.mock_records(rsps, records)
        got = harness.make_adapter(policy).get_records(
            harness.object_type, list(records), harness.read_fields()
        )
    assert set(got) == set(records)
    for record_id, values in records.items():
        for name, value in values.items():
            assert got[record_id][name] == value, (record_id, name)


def test_reading_many_records_uses_ceil_n_over_read_limit_calls(
    harness: AdapterHarness, policy: RetryPolicy
) -> None:
    """What the worker does for a batch of events: one read call per CRM read limit."""
    template = next(iter(harness.sample_records().values()))
    plain = {name: value for name, value in template.items() if "." not in name}
    total = math.ceil(harness.read_batch_limit * 2.5)
    ids = harness.record_ids(total)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        harness.mock_records(rsps, {i: dict(plain) for i in ids})
        got = harness.make_adapter(policy).get_records(harness.object_type, ids, sorted(plain))
        reads = [c.request.url for c in rsps.calls if harness.is_read_call(c.request)]
    assert set(got) == set(ids)
    assert len(reads) == math.ceil(total / harness.read_batch_limit), reads[:5]


def test_last_modified_by_is_read_from_the_crms_own_field(
    harness: AdapterHarness, policy: RetryPolicy
) -> None:
    """Votes from the CRM and locked fields trust the CRM's word for who changed a record."""
    adapter = harness.make_adapter(policy)
    field = adapter.modified_by_field(harness.object_type)
    if harness.modified_by_sample is None:
        assert field is None, f"{harness.kind} names {field!r}: give the harness a modified_by_sample"
        return
    raw, expected = harness.modified_by_sample
    assert field, f"{harness.kind} names no last-modified-by field"
    record_id = next(iter(harness.sample_records()))
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        harness.mock_records(rsps, {record_id: {field: raw}})
        got = adapter.get_records(harness.object_type, [record_id], [field])
    assert adapter.modified_by(harness.object_type, got[record_id]) == expected
    assert adapter.modified_by(harness.object_type, {}) is None


def test_queue_members_are_read_in_the_crms_own_format(harness: AdapterHarness, policy: RetryPolicy) -> None:
    queues = harness.sample_queues()
    assert len(queues) >= 2 and any(len(q.members) > 1 for q in queues) and any(not q.members for q in queues)
    with responses.RequestsMock() as rsps:
        harness.mock_queues(rsps, queues)
        got = harness.make_adapter(policy).list_queues()
    assert sorted(got, key=lambda q: q.id) == sorted(queues, key=lambda q: q.id)


def test_find_duplicates_asks_the_crm_in_its_own_query_language_and_skips_this_record(
    harness: AdapterHarness,
) -> None:
    """issue 12: `kind: duplicate` steps ask whether another record holds the same value."""
    first, this, third = harness.record_ids(3)
    value = "2026/001"
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        seen = harness.mock_duplicate_query(
            rsps, value, {first: "First contract", this: "This one", third: "Third"}
        )
        adapter = harness.make_adapter(NO_WAIT)
        found = adapter.find_duplicates(harness.object_type, harness.unique_field, value, exclude_id=this)
    assert [d.record_id for d in found] == [first, third]
    assert len(seen) == 1
    names = [d.name for d in found]
    assert names in (["First contract", "Third"], [None, None])  # where the query can return names


def test_find_duplicates_with_no_other_record_is_empty(harness: AdapterHarness) -> None:
    [this] = harness.record_ids(1)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        harness.mock_duplicate_query(rsps, "2026/002", {this: "This one"})
        adapter = harness.make_adapter(NO_WAIT)
        assert (
            adapter.find_duplicates(harness.object_type, harness.unique_field, "2026/002", exclude_id=this)
            == []
        )


def test_a_documents_new_version_replaces_the_old_one_on_the_record(
    harness: AdapterHarness, policy: RetryPolicy
) -> None:
    """Approval sheets are attached after every vote: the record must show one file per
    document, with the latest content, never a pile of versions (connector/documents/)."""
    from connector.crm.base import FileUpload

    record = harness.record_ids(1)[0]
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        shown = harness.mock_files(rsps, record)
        adapter = harness.make_adapter(policy)

        def attach(version: int, replaces: str | None) -> str:
            upload = FileUpload(
                f"approval-sheet v{version}.pdf",
                "Approval sheet",
                f"%PDF-1.7 sheet v{version}".encode(),
                document="approval-sheet",
            )
            return adapter.attach_file(harness.object_type, record, upload, replaces)

        first = attach(1, None)
        assert list(shown.files.values()) == [b"%PDF-1.7 sheet v1"]
        second = attach(2, first)
        assert list(shown.files.values()) == [b"%PDF-1.7 sheet v2"]
        third = attach(3, second)
    assert list(shown.files.values()) == [b"%PDF-1.7 sheet v3"]
    assert first and second and third
