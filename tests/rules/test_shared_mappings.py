"""One rule set for several CRMs: a `connections:` file compiles to one mapping per
connection, each checked against its own field map, with file:line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from connector.commands.validate import validate_paths
from connector.rules import MappingSet
from connector.rules.loader import MappingLoadError, load_mapping_texts
from connector.service.explain import explain_record

SHARED = """\
description: Big deals, the same process on both CRMs
connections:
  salesforce:
    object: Opportunity
    fields:
      amount: {api: Amount, type: money}
      owner_manager: {api: Owner.ManagerId, type: user}
      status: Approval_Status__c
  hubspot:
    object: deals
    fields:
      amount: {api: amount, type: money}
      owner_manager: {api: manager_owner_id, type: user}
      status: approval_status
    roles:
      cfo: ["8812"]
roles:
  cfo: [005CFO000000001]
groups:
  legal: [005LAW000000001]
rules:
  - name: big-deal
    when: {amount: {gt: 100000}}
    steps:
      - name: manager
        mode: one
        approvers: [{field: owner_manager}]
      - name: cfo
        mode: one
        approvers: [{role: cfo}]
    on:
      approve: {set: {status: Approved}}
"""


def load(text: str, name: str = "deals.yaml"):  # type: ignore[no-untyped-def]
    return load_mapping_texts(text.encode(), name)


def test_one_file_becomes_one_mapping_per_connection() -> None:
    salesforce, hubspot = load(SHARED)
    assert (salesforce.spec.connection, salesforce.spec.object_type) == ("salesforce", "Opportunity")
    assert (hubspot.spec.connection, hubspot.spec.object_type) == ("hubspot", "deals")
    assert salesforce.spec.fields["amount"].api_name == "Amount"
    assert hubspot.spec.fields["amount"].api_name == "amount"
    assert [r.name for r in salesforce.spec.rules] == [r.name for r in hubspot.spec.rules] == ["big-deal"]
    assert salesforce.spec.roles["cfo"] == ("005CFO000000001",)  # shared
    assert hubspot.spec.roles["cfo"] == ("8812",)  # this CRM's own id for the shared role
    assert hubspot.spec.roles["legal"] == ("005LAW000000001",)
    assert salesforce.spec.content_hash == hubspot.spec.content_hash


def test_the_shared_rule_reads_each_crm_through_its_own_field_map(tmp_path: Path) -> None:
    (tmp_path / "deals.yaml").write_text(SHARED)
    mappings = MappingSet.load(tmp_path)
    assert not mappings.errors
    (sf,) = mappings.for_object("salesforce", "opportunity")
    (hs,) = mappings.for_object("hubspot", "DEALS")
    on_sf = explain_record(sf, {"Amount": 150000, "Owner.ManagerId": "005MGR", "Approval_Status__c": None})
    on_hs = explain_record(hs, {"amount": "150000", "manager_owner_id": "77", "approval_status": None})
    assert [(s.name, s.approvers) for s in on_sf.rules[0].chain] == [
        ("manager", ("005MGR",)),
        ("cfo", ("005CFO000000001",)),
    ]
    assert [(s.name, s.approvers) for s in on_hs.rules[0].chain] == [("manager", ("77",)), ("cfo", ("8812",))]
    small = explain_record(hs, {"amount": "90000", "manager_owner_id": "77"})
    assert not small.rules[0].matched


def errors_of(text: str) -> list[str]:
    with pytest.raises(MappingLoadError) as caught:
        load(text)
    return [str(e) for e in caught.value.errors]


def test_a_field_missing_from_one_field_map_names_that_connection_and_the_line() -> None:
    broken = SHARED.replace("      owner_manager: {api: manager_owner_id, type: user}\n", "")
    (error,) = errors_of(broken)
    line = broken.splitlines().index("        approvers: [{field: owner_manager}]") + 1
    assert error.startswith(f"deals.yaml:{line}: rules[0].steps[0].approvers[0].field: unknown field")
    assert "(in connection `hubspot`'s field map)" in error


def test_a_problem_in_a_connections_field_map_points_at_its_own_key() -> None:
    broken = SHARED.replace("amount: {api: amount, type: money}", "amount: {api: amount, type: monie}")
    errors = errors_of(broken)
    line = broken.splitlines().index("      amount: {api: amount, type: monie}") + 1
    assert any(e.startswith(f"deals.yaml:{line}: connections.hubspot.fields.amount.type:") for e in errors), (
        errors
    )


def test_a_problem_in_the_shared_rules_is_said_once() -> None:
    errors = errors_of(
        SHARED.replace(
            "mode: one\n        approvers: [{role: cfo}]", "mode: won\n        approvers: [{role: cfo}]"
        )
    )
    assert len(errors) == 1 and "rules[0].steps[1].mode" in errors[0] and "connection" not in errors[0]


def test_single_connection_keys_beside_connections_are_refused_with_a_hint() -> None:
    errors = errors_of("connection: salesforce\n" + SHARED)
    assert errors == [
        "deals.yaml:1: connection: `connection` is not used in a file with `connections:`; hint: move it "
        "under each connection: `connections: {salesforce: {object: ..., fields: ...}}`, or drop "
        "`connections:` for a file of one connection"
    ]


def test_unknown_key_under_a_connection_suggests_the_right_one() -> None:
    errors = errors_of(SHARED.replace("    object: deals", "    objet: deals"))
    assert any(
        "connections.hubspot.objet: unknown key `objet`; hint: did you mean `object`?" in e for e in errors
    )


def test_validate_checks_every_connections_field_map_against_its_crm(tmp_path: Path) -> None:
    path = tmp_path / "deals.yaml"
    path.write_text(SHARED)
    described = {
        ("salesforce", "Opportunity"): {"Amount", "Owner", "OwnerId", "Approval_Status__c"},
        ("hubspot", "deals"): {"amount", "approval_status"},  # manager_owner_id is missing
    }
    errors = validate_paths([path], lambda connection, obj: described[(connection, obj)])
    line = SHARED.splitlines().index("      owner_manager: {api: manager_owner_id, type: user}") + 1
    assert [(e.line, e.key) for e in errors] == [(line, "connections.hubspot.fields.owner_manager")]


def test_the_same_object_in_a_shared_file_and_another_file_is_a_duplicate(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(SHARED)
    (tmp_path / "b.yaml").write_text(
        "connection: hubspot\nobject: deals\nfields: {amount: amount}\n"
        "rules: [{name: r, steps: [{name: s, mode: one, approvers: [{user: '1'}]}]}]\n"
    )
    errors = [str(e) for e in MappingSet.load(tmp_path).errors]
    assert errors and "b.yaml:2: object: hubspot `deals` is already mapped in" in errors[0]


# --- documents: (approval sheets and generated documents) ---------------------------------------

DOCUMENT_RULE = """\
connection: sandbox
object: deal
fields: {amount: {api: amount, type: money}}
rules:
  - name: big
    steps: [{name: s, mode: one, approvers: [{user: u1}]}]
    documents:
{documents}
"""


def test_documents_compile_to_their_transitions() -> None:
    text = DOCUMENT_RULE.replace(
        "{documents}",
        "      - {name: approval-sheet, template: approval_sheet.html}\n"
        "      - {name: contract, template: standard_contract.html, on: [approve, step], title: Contract}",
    )
    (loaded,) = load(text)
    sheet, contract = loaded.spec.rules[0].documents
    assert "submitted" in sheet.on and "step_approved" in sheet.on and "rejected" in sheet.on
    assert contract.on == frozenset({"approved", "step_approved"}) and contract.label == "Contract"


@pytest.mark.parametrize(
    ("documents", "expected"),
    [
        (
            "      - {name: sheet, template: ../secrets.html}\n",
            "documents[0].template: expected a template file name ending in .html, got '../secrets.html'",
        ),
        (
            "      - {name: sheet, template: sheet.html, on: aprove}\n",
            "documents[0].on[0]: 'aprove' is not allowed; expected `every_change`, `submit`",
        ),
        (
            "      - {name: sheet, template: a.html}\n      - {name: sheet, template: b.html}\n",
            "documents[1].name: duplicate document name `sheet`",
        ),
        ("      - {name: 'two words', template: a.html}\n", "documents[0].name: expected a name of letters"),
    ],
)
def test_bad_documents_say_where_and_how_to_fix(documents: str, expected: str) -> None:
    errors = errors_of(DOCUMENT_RULE.replace("{documents}", documents.rstrip("\n")))
    assert any(f"rules[0].{expected}" in e for e in errors), errors
