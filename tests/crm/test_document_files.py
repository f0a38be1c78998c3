"""Documents on CRM records, the cases the contract suite does not cover: a CRM that cannot
hold the file says why and how to fix it; a file someone deleted in the CRM starts anew."""

from __future__ import annotations

import json

import pytest
import responses

from connector.crm.base import AttachmentsUnsupported, FileUpload
from connector.crm.retry import RetryPolicy
from tests.contract.harness_bitrix24 import Bitrix24AdapterHarness
from tests.contract.harness_hubspot import HubSpotAdapterHarness
from tests.contract.harness_salesforce import DATA, SalesforceAdapterHarness

NO_WAIT = RetryPolicy(attempts=1, sleep=lambda _s: None)
SHEET = FileUpload("contract v1.pdf", "Standard contract", b"%PDF-1.7 contract", document="standard-contract")


def test_bitrix24_without_a_file_field_for_the_document_names_the_variable() -> None:
    adapter = Bitrix24AdapterHarness().make_adapter(NO_WAIT)
    with pytest.raises(AttachmentsUnsupported, match="set BITRIX24_FILE_FIELD_STANDARD_CONTRACT to its code"):
        adapter.attach_file("dynamic_1032", "1001", SHEET, None)


def test_hubspot_objects_notes_cannot_reach_are_refused_with_the_ones_they_can() -> None:
    adapter = HubSpotAdapterHarness().make_adapter(NO_WAIT)
    with pytest.raises(
        AttachmentsUnsupported, match="documents attach to companies, contacts, deals, tickets"
    ):
        adapter.attach_file("line_items", "1001", SHEET, None)


def test_salesforce_file_deleted_by_a_user_starts_a_new_one() -> None:
    harness = SalesforceAdapterHarness()
    record = harness.record_ids(1)[0]
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        shown = harness.mock_files(rsps, record)
        ref = harness.make_adapter(NO_WAIT).attach_file(
            harness.object_type, record, SHEET, "0694x0000099999AAA"
        )
        bodies = [
            json.loads(c.request.body)
            for c in rsps.calls
            if c.request.url == f"{DATA}/sobjects/ContentVersion"
        ]
    assert [("ContentDocumentId" in b, "FirstPublishLocationId" in b) for b in bodies] == [
        (True, False),
        (False, True),
    ]
    assert shown.files == {ref: b"%PDF-1.7 contract"}
