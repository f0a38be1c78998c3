"""Issue 12's mapping keys: `related:`, `requires:`, `kind: check` and `kind: duplicate` steps,
and the `is` operator on `<related>.approval`; every mistake names file:line with a hint."""

from __future__ import annotations

from pathlib import Path

import pytest

from connector.approvals.spec import DuplicateCheck, HttpCheck, Route
from connector.rules import load_mapping_file
from connector.rules.errors import MappingError, MappingLoadError
from connector.rules.loader import load_mappings_detailed
from tests.rules.test_rules_loader import ctx, write

ROOT = Path(__file__).resolve().parents[2]
CONTRACT = """\
connection: sandbox
object: contract
related:
  company: {field: company_id, object: company}
fields:
  number: contract_number
  company_id: company_id
roles:
  lawyer: [u-lawyer]
rules:
  - name: contract-approval
    when: {company.approval: {is: approved}}
    requires:
      - {related: company, rule: company-approval}
    steps:
      - name: unique-number
        kind: duplicate
        duplicate:
          field: number
          message: "{{ duplicate.value }} is used by {{ duplicate.other_name }}"
      - name: security
        kind: check
        check:
          url: ${VERIFY_URL}/check
          headers: {Authorization: "Bearer ${VERIFY_TOKEN}"}
          body: '{"number": {{ record.number | tojson }}}'
          timeout: 5s
          retries: 2
          response: {verdict: verdict, score: {api: result.score, type: number}}
          routes:
            - when: {verdict: clear}
              then: continue
            - when: {score: {lt: 50}}
              then: {back: lawyer, message: "Low score {{ answer.score }}"}
            - then: {reject: "{{ answer.verdict }}"}
          on_failure: reject
      - name: lawyer
        mode: one
        approvers: [{role: lawyer}]
"""
COMPANY = """\
connection: sandbox
object: company
fields: {name: name}
roles: {cfo: [u-cfo]}
rules:
  - name: company-approval
    steps: [{name: cfo, mode: one, approvers: [{role: cfo}]}]
"""


def errors_of(tmp_path: Path, old: str, new: str) -> list[MappingError]:
    assert old in CONTRACT, old
    with pytest.raises(MappingLoadError) as info:
        load_mapping_file(write(tmp_path, "contract.yaml", CONTRACT.replace(old, new, 1)))
    return info.value.errors


def test_the_keys_compile_to_the_spec(tmp_path: Path) -> None:
    spec = load_mapping_file(write(tmp_path, "contract.yaml", CONTRACT))
    assert spec.related["company"].field == "company_id" and spec.related["company"].object_type == "company"
    assert spec.fields["company.approval"].is_virtual and "@company.approval" not in spec.api_fields()
    rule = spec.rules[0]
    assert [(r.related, r.rule) for r in rule.requires] == [("company", "company-approval")]
    assert rule.when(ctx({"company.approval": "approved"})) and not rule.when(
        ctx({"company.approval": "pending"})
    )
    duplicate, check, lawyer = rule.steps
    assert isinstance(duplicate.service, DuplicateCheck) and duplicate.service.field == "number"
    assert isinstance(check.service, HttpCheck) and lawyer.service is None
    assert check.service.timeout.total_seconds() == 5 and check.service.retries == 2
    assert check.service.headers == {"Authorization": "Bearer ${VERIFY_TOKEN}"}
    assert [r.route.action for r in check.service.routes] == ["continue", "back", "reject"]
    assert check.service.routes[1].route.to == "lawyer"
    assert check.service.on_failure == Route("reject")
    assert check.service.routes[1].when(ctx({"score": "42"}))


def test_the_shipped_seed_001_examples_load_together() -> None:
    files = [
        ROOT / "mappings/examples/sandbox-company.yaml",
        ROOT / "mappings/examples/sandbox-contract.yaml",
    ]
    loaded, errors = load_mappings_detailed(files)
    assert errors == [] and len(loaded) == 2


@pytest.mark.parametrize(
    ("old", "new", "line", "message", "hint"),
    [
        (
            "{related: company, rule",
            "{related: compny, rule",
            14,
            "unknown related record `compny`",
            "company",
        ),
        ("{is: approved}", "{is: aproved}", 12, "is an approval state", "approved"),
        ("field: number\n", "field: numbr\n", 19, "unknown field `numbr`", "number"),
        ("then: {back: lawyer,", "then: {back: lawyr,", 34, "no step named `lawyr`", "lawyer"),
        ("timeout: 5s", "timeout: 5 months", 27, "expected a duration such as 10s", "s, min, h or d"),
        ("url: ${VERIFY_URL}/check", "url: ftp://x", 24, "`url` must start with", "${SECURITY_CHECK_URL}"),
        (
            'Authorization: "Bearer ${VERIFY_TOKEN}"',
            'Authorization: "Bearer abc123"',
            25,
            "holds a literal secret",
            "keep secrets in the environment",
        ),
        ("then: continue", "then: proceed", 32, "unknown route 'proceed'", "then: continue"),
        (
            "        kind: duplicate\n",
            "        kind: duplicat\n",
            17,
            "'duplicat' is not allowed",
            "duplicate",
        ),
        ("        mode: one\n", "", 37, "missing required key `mode`", "mode: one"),
        (
            '          message: "{{ duplicate.value }}',
            '          message: "{{ duplicate.valu }}',
            20,
            "`duplicate` has no attribute `valu`",
            "value",
        ),
    ],
)
def test_mistakes_name_the_line_with_a_hint(
    tmp_path: Path, old: str, new: str, line: int, message: str, hint: str
) -> None:
    errors = errors_of(tmp_path, old, new)
    assert any(message in e.message for e in errors), [str(e) for e in errors]
    [error] = [e for e in errors if message in e.message]
    assert error.line == line, str(error)
    assert hint in (error.hint or ""), str(error)


def test_a_check_step_without_check_settings_and_a_people_step_with_them(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, "        kind: check\n        check:", "        check:")
    assert any("`check` needs `kind: check`" in e.message for e in errors), [str(e) for e in errors]


def test_requires_names_a_rule_some_mapping_file_has(tmp_path: Path) -> None:
    contract = write(tmp_path, "contract.yaml", CONTRACT)
    company = write(
        tmp_path, "company.yaml", COMPANY.replace("name: company-approval", "name: company-check")
    )
    _loaded, errors = load_mappings_detailed([contract, company])
    [error] = errors
    assert (error.line, error.key) == (14, "rules[0].requires[0].rule")
    assert "no rule `company-approval`" in error.message and "`company-check`" in (error.hint or "")
    _loaded, errors = load_mappings_detailed([contract])
    assert "no mapping file maps sandbox `company`" in errors[0].message
