"""Mapping-file loading: YAML, validation errors (line + key + hint), specs, MappingSet, validate."""

from __future__ import annotations

import hashlib
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from connector.approvals.spec import (
    EvalContext,
    FieldApprovers,
    MappingSpec,
    RoleApprovers,
    UserApprovers,
    ValueMapApprovers,
)
from connector.commands.validate import make_validate_command, validate, validate_paths
from connector.rules import (
    LoadResult,
    MappingError,
    MappingLoadError,
    MappingSet,
    load_mapping_dir,
    load_mapping_file,
)
from connector.rules.templating import LiteralValue, TemplateValue

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "mappings" / "examples"
TODAY = date(2024, 6, 15)
NOW = datetime(2024, 6, 15, 12, 0, tzinfo=UTC)

BASE = """\
connection: salesforce
object: Opportunity
match: first
fields:
  amount: {api: Amount, type: money}
  stage: StageName
  owner_manager: {api: Owner.ManagerId, type: user}
  lines: {api: Product_Lines__c, type: list}
  status: Approval_Status__c
  expires_on: {api: Approval_Expires__c, type: date}
  vip: {api: VIP__c, type: boolean}
roles:
  general_manager: [005GM0000000001]
groups:
  finance: [005FI0000000001, 005FI0000000002]
rules:
  - name: large-deal
    when:
      all:
        - amount: {gt: 100000}
        - not: {stage: {eq: Closed Lost}}
    restart_on_change: [amount]
    expires_after: 180d
    steps:
      - name: manager
        mode: one
        approvers: [{field: owner_manager}]
      - name: finance-vote
        mode: quorum
        quorum: 2
        approvers: [{group: finance}]
        when: {amount: {gt: 500000}}
        on_reject: back
    on:
      submit: {set: {status: Pending}}
      approve: {set: {status: Approved, expires_on: "{{ today + days(180) }}"}}
      expire: {set: {status: Expired, expires_on: null}}
"""


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def load_errors(path: Path) -> list[MappingError]:
    with pytest.raises(MappingLoadError) as info:
        load_mapping_file(path)
    return info.value.errors


def ctx(values: dict[str, Any]) -> EvalContext:
    return EvalContext(values, None, frozenset(), TODAY, NOW)


def line_of(text: str, needle: str) -> int:
    (index,) = [i for i, line in enumerate(text.splitlines(), 1) if needle in line]
    return index


# --- the happy path ---------------------------------------------------------------------------


def test_base_file_compiles_to_the_spec(tmp_path: Path) -> None:
    path = write(tmp_path, "opp.yaml", BASE)
    spec = load_mapping_file(path)
    assert isinstance(spec, MappingSpec)
    assert (spec.connection, spec.object_type, spec.match) == ("salesforce", "Opportunity", "first")
    assert spec.source_path == str(path)
    assert spec.content_hash == hashlib.sha256(BASE.encode()).hexdigest()
    assert spec.fields["owner_manager"].api_name == "Owner.ManagerId"
    assert spec.fields["owner_manager"].is_related and spec.fields["status"].type == "string"
    assert spec.roles == {
        "general_manager": ("005GM0000000001",),
        "finance": ("005FI0000000001", "005FI0000000002"),
    }
    (rule,) = spec.rules
    assert rule.name == "large-deal"
    assert rule.expires_after == timedelta(days=180)
    assert rule.restart_on_change == frozenset({"amount"})
    assert rule.when(ctx({"amount": 200000, "stage": "Open"})) is True
    assert rule.when(ctx({"amount": 200000, "stage": "Closed Lost"})) is False
    manager, vote = rule.steps
    assert (manager.mode, manager.approvers, manager.when, manager.on_reject) == (
        "one",
        (FieldApprovers("owner_manager"),),
        None,
        "reject",
    )
    assert (vote.mode, vote.quorum_count, vote.quorum_percent, vote.on_reject) == ("quorum", 2, None, "back")
    assert vote.approvers == (RoleApprovers("finance"),)
    assert vote.when is not None and vote.when(ctx({"amount": 600000})) is True
    assert set(rule.actions) == {"submit", "approve", "expire"}
    approve = rule.actions["approve"].set
    assert isinstance(approve["status"], LiteralValue) and isinstance(approve["expires_on"], TemplateValue)
    assert approve["expires_on"]({"today": TODAY}) == "2024-12-12"
    assert rule.actions["expire"].set["expires_on"]({}) is None


def test_approver_sources_and_quorum_percent(tmp_path: Path) -> None:
    text = BASE.replace(
        "approvers: [{group: finance}]",
        "approvers: [{user: [12345, 005XX]}, {role: general_manager}, "
        "{from_field: lines, map: {Hardware: {user: h1}, Field Services: [{group: finance}]}, "
        "default: [{role: general_manager}]}]",
    ).replace("quorum: 2", "quorum: 60%")
    spec = load_mapping_file(write(tmp_path, "opp.yaml", text))
    step = spec.rules[0].steps[1]
    assert step.quorum_percent == Decimal("60") and step.quorum_count is None
    users, role, value_map = step.approvers
    assert users == UserApprovers(("12345", "005XX"))  # numeric ids become text
    assert role == RoleApprovers("general_manager")
    assert isinstance(value_map, ValueMapApprovers)
    assert value_map.field == "lines"
    assert value_map.mapping == {
        "Hardware": (UserApprovers(("h1",)),),
        "Field Services": (RoleApprovers("finance"),),
    }
    assert value_map.default == (RoleApprovers("general_manager"),)


def test_rule_without_when_matches_everything(tmp_path: Path) -> None:
    text = BASE.replace(
        "    when:\n      all:\n        - amount: {gt: 100000}\n", "    description: x\n      # \n"
    )
    text = text.replace("        - not: {stage: {eq: Closed Lost}}\n", "")
    text = text.replace("      # \n", "")
    rule = load_mapping_file(write(tmp_path, "opp.yaml", text)).rules[0]
    assert rule.when(ctx({})) is True
    assert [t.operator for t in rule.when.explain(ctx({}))] == ["always"]


@pytest.mark.parametrize(
    ("literal", "field", "expected"),
    [
        ("yes", "vip", True),  # booleans are written as real booleans
        ("No", "vip", False),
        ("2025-01-31", "expires_on", "2025-01-31"),
        ("2025-01-31T10:00:00Z", "expires_on", "2025-01-31"),
        ("Pending", "status", "Pending"),
        ("0.10", "amount", Decimal("0.10")),
        ("null", "status", None),
    ],
)
def test_literal_action_values(tmp_path: Path, literal: str, field: str, expected: Any) -> None:
    text = BASE.replace("submit: {set: {status: Pending}}", f"submit: {{set: {{{field}: {literal}}}}}")
    renderer = load_mapping_file(write(tmp_path, "opp.yaml", text)).rules[0].actions["submit"].set[field]
    assert renderer({}) == expected
    assert type(renderer({})) is type(expected)


def test_yaml_12_scalars_protect_admin_values(tmp_path: Path) -> None:
    # YAML 1.1 would turn `on:` into True, 005... into an octal int, and `yes` into True.
    text = BASE.replace("[005GM0000000001]", "[005000000000001, 12345]").replace(
        "{stage: {eq: Closed Lost}}", "{stage: {eq: yes}}"
    )
    spec = load_mapping_file(write(tmp_path, "opp.yaml", text))
    assert spec.roles["general_manager"] == ("005000000000001", "12345")
    assert set(spec.rules[0].actions) == {"submit", "approve", "expire"}  # `on` was read as text
    assert spec.rules[0].when(ctx({"amount": 200000, "stage": "yes"})) is False


def test_anchors_and_merge_keys(tmp_path: Path) -> None:
    text = BASE.replace(
        "  general_manager: [005GM0000000001]", "  general_manager: &gm [005GM0000000001]\n  backup: *gm"
    )
    text = text.replace(
        "      expire: {set: {status: Expired, expires_on: null}}",
        "      expire: {set: {<<: {status: Expired, expires_on: null}, status: Gone}}",
    )
    spec = load_mapping_file(write(tmp_path, "opp.yaml", text))
    assert spec.roles["backup"] == spec.roles["general_manager"] == ("005GM0000000001",)
    assert spec.rules[0].actions["expire"].set["status"]({}) == "Gone"  # own key beats the merge
    assert spec.rules[0].actions["expire"].set["expires_on"]({}) is None


# --- the shipped examples ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "connection", "object_type", "money", "score", "term", "stage"),
    [
        ("sandbox-deals.yaml", "sandbox", "deal", "amount", "credit_score", "term_months", "open"),
        (
            "salesforce-opportunity.yaml",
            "salesforce",
            "Opportunity",
            "amount",
            "credit_score",
            "term_months",
            "Prospecting",
        ),
    ],
)
def test_shipped_examples(
    name: str, connection: str, object_type: str, money: str, score: str, term: str, stage: str
) -> None:
    spec = load_mapping_file(EXAMPLES / name)
    assert (spec.connection, spec.object_type) == (connection, object_type)
    (rule,) = spec.rules
    actions = {
        event: {k: r({"today": TODAY, "comment": "bad"}) for k, r in a.set.items()}
        for event, a in rule.actions.items()
    }
    assert actions["submit"] == {"status": "Pending"}
    assert actions["approve"] == {"status": "Approved", "expires_on": "2024-12-12"}  # today + 180 days
    assert actions["reject"]["status"] == "Non-valid company"
    assert actions["expire"] == {"status": "Expired", "expires_on": None}
    assert rule.expires_after == timedelta(days=180)
    small = {money: 1000, score: 90, term: 6, "stage": stage}
    assert rule.when(ctx(small)) is False
    steps = {step.name: step for step in rule.steps}
    for changed, step_name in ((money, "general-manager"), (score, "finance"), (term, "legal")):
        record = {**small, changed: {money: 100000.01, score: 69, term: 13}[changed]}
        assert rule.when(ctx(record)) is True, changed
        assert steps[step_name].when(ctx(record)) is True
        assert steps[step_name].when(ctx(small)) is False
    assert rule.when(ctx({**small, money: 100000})) is False  # "over 100,000" is strict


def test_salesforce_example_maps_the_documented_api_names() -> None:
    spec = load_mapping_file(EXAMPLES / "salesforce-opportunity.yaml")
    api = {name: f.api_name for name, f in spec.fields.items()}
    for name in (
        "Amount",
        "StageName",
        "OwnerId",
        "Owner.ManagerId",
        "Account.Credit_Score__c",
        "Term_Months__c",
    ):
        assert name in api.values()
    for name in ("Product_Lines__c", "Approval_Status__c", "Approval_Expires__c", "Approval_Comment__c"):
        assert name in api.values()
    assert spec.fields["product_lines"].type == "list"


def test_shipped_examples_validate_cleanly() -> None:
    assert validate_paths([EXAMPLES]) == []


# --- validation errors: file, line, key path, message, hint --------------------------------------

# (replace this, with that, expected key, message fragment, hint fragment, line anchor or None)
ERROR_CASES = [
    ("match: first", "mtach: first", "mtach", "unknown key `mtach`", "did you mean `match`?", None),
    ("match: first", "match: firts", "match", "'firts' is not allowed", "did you mean `first`?", None),
    ("type: money}", "type: mony}", "fields.amount.type", "not allowed; expected `string`", "`money`", None),
    (
        "{api: Amount, type: money}",
        "{api: Amount, typ: money}",
        "fields.amount.typ",
        "unknown key",
        "`type`",
        None,
    ),
    ("  stage: StageName", "  stage: 12", "fields.stage", "expected a mapping", None, None),
    (
        "  stage: StageName",
        "  amount: StageName",
        "fields.amount",
        "duplicate key `amount` (first written on line 5)",
        "remove one",
        None,
    ),
    (
        "  vip: {api: VIP__c, type: boolean}",
        "  credit-score: {api: VIP__c}",
        "fields.credit-score",
        "not a valid canonical field name",
        "letters",
        None,
    ),
    (
        "  vip: {api: VIP__c, type: boolean}",
        "  all: {api: VIP__c}",
        "fields.all",
        "`all` is reserved",
        "rename",
        None,
    ),
    (
        "  general_manager: [005GM0000000001]",
        "  finance: [005GM0000000001]",
        "groups.finance",
        "both a role and a group",
        "namespace",
        "  finance: [005FI",
    ),
    ("- name: large-deal", "- name: 2024", "rules[0].name", "expected text, got 2024", "quotes", None),
    (
        "mode: one",
        "mode: onne",
        "rules[0].steps[0].mode",
        "'onne' is not allowed",
        "did you mean `one`?",
        None,
    ),
    (
        "on_reject: back",
        "on_reject: bak",
        "rules[0].steps[1].on_reject",
        "not allowed",
        "did you mean `back`?",
        None,
    ),
    (
        "quorum: 2",
        "quorom: 2",
        "rules[0].steps[1].quorom",
        "unknown key `quorom`",
        "did you mean `quorum`?",
        None,
    ),
    (
        "    restart_on_change: [amount]",
        "    quorum: 2  # misplaced",
        "rules[0].quorum",
        "unknown key",
        "belongs to a step",
        None,
    ),
    (
        "    restart_on_change: [amount]",
        "    restart_on_change: amount",
        "rules[0].restart_on_change",
        "expected a list",
        None,
        None,
    ),
    (
        "        mode: one",
        "        # mode removed",
        "rules[0].steps[0].mode",
        "missing required key `mode`",
        None,
        "- name: manager",
    ),
    (
        "approvers: [{field: owner_manager}]",
        "approvers: []",
        "rules[0].steps[0].approvers",
        "at least one",
        None,
        None,
    ),
    (
        "[{field: owner_manager}]",
        "[{}]",
        "rules[0].steps[0].approvers[0]",
        "exactly one of",
        "{group: finance}",
        None,
    ),
    (
        "[{group: finance}]",
        "[{group: finance, user: x}]",
        "rules[0].steps[1].approvers[0]",
        "got `user` or `group`",
        None,
        None,
    ),
    (
        "[{group: finance}]",
        "[{grop: finance}]",
        "rules[0].steps[1].approvers[0].grop",
        "unknown key",
        "did you mean `group`?",
        None,
    ),
    (
        "[{group: finance}]",
        "[{from_field: lines}]",
        "rules[0].steps[1].approvers[0]",
        "needs a `map`",
        "from_field",
        None,
    ),
    (
        "[{group: finance}]",
        "[{group: finance, map: {A: {user: x}}}]",
        "rules[0].steps[1].approvers[0]",
        "only go with `from_field`",
        None,
        None,
    ),
    (
        "[{group: finance}]",
        "[{user: [{id: 1}]}]",
        "rules[0].steps[1].approvers[0].user",
        "expected user ids",
        "as text",
        None,
    ),
    (
        "[{group: finance}]",
        "[{role: finance}]",
        "rules[0].steps[1].approvers[0].role",
        "unknown role `finance`",
        "is a group",
        None,
    ),
    (
        "[{group: finance}]",
        "[{group: finanse}]",
        "rules[0].steps[1].approvers[0].group",
        "unknown group",
        "did you mean `finance`?",
        None,
    ),
    (
        "[{field: owner_manager}]",
        "[{field: owner_manger}]",
        "rules[0].steps[0].approvers[0].field",
        "unknown field",
        "`owner_manager`",
        None,
    ),
    (
        "[{field: owner_manager}]",
        "[{field: amount}]",
        "rules[0].steps[0].approvers[0].field",
        "field `amount` is money",
        None,
        None,
    ),
    (
        "[{group: finance}]",
        "[{from_field: line, map: {A: {user: x}}}]",
        "rules[0].steps[1].approvers[0].from_field",
        "unknown field",
        "`lines`",
        None,
    ),
    (
        "[{group: finance}]",
        "[{from_field: lines, map: {A: {role: gm}}}]",
        "rules[0].steps[1].approvers[0].map.A[0].role",
        "unknown role",
        None,
        None,
    ),
    (
        "quorum: 2",
        "quorum: 3",
        "rules[0].steps[1].quorum",
        "more than the 2 possible approvers",
        "at most 2",
        None,
    ),
    ("quorum: 2", "quorum: 150%", "rules[0].steps[1].quorum", "needs a quorum", "60%", None),
    ("quorum: 2", "quorum: 0", "rules[0].steps[1].quorum", "needs a quorum", None, None),
    ("quorum: 2", "quorum: nan%", "rules[0].steps[1].quorum", "needs a quorum", "60%", None),
    (
        "        quorum: 2",
        "        # quorum removed",
        "rules[0].steps[1].quorum",
        "needs a quorum",
        None,
        "- name: finance-vote",
    ),
    (
        "        mode: one",
        "        mode: one\n        quorum: 1",
        "rules[0].steps[0].quorum",
        "only applies to `mode: quorum`",
        None,
        "quorum: 1",
    ),
    (
        "        mode: one",
        "        mode: one\n        on_reject: back  # first",
        "rules[0].steps[0].on_reject",
        "no previous step",
        "reject",
        "# first",
    ),
    (
        "- name: finance-vote",
        "- name: manager  # again",
        "rules[0].steps[1].name",
        "duplicate step name `manager`",
        "unique",
        None,
    ),
    (
        "expires_after: 180d",
        "expires_after: 6 months",
        "rules[0].expires_after",
        "expected a duration",
        "180d",
        None,
    ),
    (
        "expires_after: 180d",
        "expires_after: 6m",
        "rules[0].expires_after",
        "exact length",
        "a month has no fixed length",
        None,
    ),
    (
        "- amount: {gt: 100000}",
        "- amout: {gt: 100000}",
        "rules[0].when.all[0].amout",
        "unknown field `amout`",
        "did you mean `amount`?",
        None,
    ),
    (
        "- amount: {gt: 100000}",
        "- Amount: {gt: 100000}",
        "rules[0].when.all[0].Amount",
        "unknown field",
        "CRM API name",
        None,
    ),
    (
        "{gt: 100000}",
        "{gtt: 100000}",
        "rules[0].when.all[0].amount.gtt",
        "unknown operator `gtt`",
        "did you mean `gt`?",
        None,
    ),
    (
        "{gt: 100000}",
        "{gt: lots}",
        "rules[0].when.all[0].amount.gt",
        "'lots' is not a valid money",
        None,
        None,
    ),
    (
        "{stage: {eq: Closed Lost}}",
        "{stage: {gt: 5}}",
        "rules[0].when.all[1].not.stage.gt",
        "does not work on string",
        "type: number",
        None,
    ),
    (
        "when: {amount: {gt: 500000}}",
        "when: {amonut: {gt: 500000}}",
        "rules[0].steps[1].when.amonut",
        "unknown field",
        "`amount`",
        None,
    ),
    (
        "[amount]",
        "[amonut]",
        "rules[0].restart_on_change[0]",
        "unknown field `amonut`",
        "did you mean `amount`?",
        None,
    ),
    (
        "submit: {set",
        "sumbit: {set",
        "rules[0].on.sumbit",
        "unknown key `sumbit`",
        "did you mean `submit`?",
        None,
    ),
    (
        "submit: {set: {status: Pending}}",
        "submit: {sett: {status: Pending}}",
        "rules[0].on.submit.sett",
        "unknown key",
        "did you mean `set`?",
        None,
    ),
    (
        "{status: Pending}",
        "{stauts: Pending}",
        "rules[0].on.submit.set.stauts",
        "unknown field `stauts`",
        "did you mean `status`?",
        None,
    ),
    (
        "{status: Pending}",
        "{vip: maybe}",
        "rules[0].on.submit.set.vip",
        "'maybe' is not a valid boolean",
        None,
        None,
    ),
    (
        "{status: Pending}",
        "{owner_manager: x}",
        "rules[0].on.submit.set.owner_manager",
        "cannot be written back",
        "object itself",
        None,
    ),
    (
        "{{ today + days(180) }}",
        "{{ todya + days(180) }}",
        "rules[0].on.approve.set.expires_on",
        "unknown template variable `todya`",
        "did you mean `today`?",
        None,
    ),
    (
        "{{ today + days(180) }}",
        "{{ today + }}",
        "rules[0].on.approve.set.expires_on",
        "template syntax error",
        "templates look like",
        None,
    ),
    (
        "{{ today + days(180) }}",
        "{{ record.amout }}",
        "rules[0].on.approve.set.expires_on",
        "`record` has no attribute `amout`",
        "`amount`",
        None,
    ),
    (
        '"{{ today + days(180) }}"',
        "\"{{ ''.__class__ }}\"",
        "rules[0].on.approve.set.expires_on",
        "private attributes",
        None,
        None,
    ),
]


@pytest.mark.parametrize(("old", "new", "key", "message", "hint", "anchor"), ERROR_CASES)
def test_validation_errors(
    tmp_path: Path, old: str, new: str, key: str, message: str, hint: str | None, anchor: str | None
) -> None:
    assert old in BASE
    text = BASE.replace(old, new, 1)
    path = write(tmp_path, "opp.yaml", text)
    errors = load_errors(path)
    matching = [e for e in errors if e.key == key]
    assert matching, [str(e) for e in errors]
    error = matching[0]
    assert error.file == str(path)
    assert error.line == line_of(text, anchor or new)  # multi-line replacements name an anchor
    assert message in error.message, str(error)
    if hint is not None:
        assert error.hint is not None and hint in error.hint, str(error)
    assert str(error).startswith(f"{path}:{error.line}: {key}: ")


def test_errors_are_reported_together_and_in_line_order(tmp_path: Path) -> None:
    text = (
        BASE.replace("[amount]", "[amonut]")
        .replace("{gt: 100000}", "{gtt: 100000}")
        .replace("mode: one", "mode: one\n        quorum: 1")
    )
    errors = load_errors(write(tmp_path, "opp.yaml", text))
    assert [e.key for e in errors] == [
        "rules[0].when.all[0].amount.gtt",
        "rules[0].restart_on_change[0]",
        "rules[0].steps[0].quorum",
    ]
    assert [e.line for e in errors] == sorted(e.line for e in errors)


def test_missing_top_level_keys(tmp_path: Path) -> None:
    errors = load_errors(write(tmp_path, "opp.yaml", "connection: salesforce\nobject: Opportunity\n"))
    assert {(e.key, e.line, e.message) for e in errors} == {
        ("fields", 1, "missing required key `fields`"),
        ("rules", 1, "missing required key `rules`"),
    }


def test_duplicate_rule_names(tmp_path: Path) -> None:
    rule = BASE[BASE.index("  - name: large-deal") :]
    errors = load_errors(write(tmp_path, "opp.yaml", BASE + rule))
    assert [(e.key, e.message) for e in errors] == [
        ("rules[1].name", "duplicate rule name `large-deal` (also rules[0])")
    ]
    assert errors[0].line == BASE.count("\n") + 1


# --- YAML problems ---------------------------------------------------------------------------------

YAML_CASES = [
    ("broken", "connection: x\nfields: {a: [1, 2}\n", 2, "YAML syntax error", "indentation"),
    ("tab", "connection: x\nfields:\n\tamount: Amount\n", 3, "cannot start any token", "tabs"),
    ("colon", "connection: x\nobject: a: b\n", 2, "mapping values are not allowed", "quoted"),
    ("two documents", "connection: x\n---\nconnection: y\n", 2, "single document", "`---`"),
    ("empty", "# nothing here\n", 1, "file is empty", "`connection`"),
    ("python tag", "connection: !!python/object:os.system x\n", 1, "not supported", "!tag"),
    ("duplicate", "connection: x\nobject: a\nconnection: y\n", 3, "duplicate key `connection`", "remove one"),
    ("alias loop", "a: &x [*x]\n", 1, "refers to itself", None),
    ("list root", "- connection: x\n", 1, "expected a mapping", None),
    ("not utf-8", b"connection: \xff\xfe\n", 1, "not UTF-8", None),
]


@pytest.mark.parametrize(
    ("name", "text", "line", "message", "hint"), YAML_CASES, ids=[c[0] for c in YAML_CASES]
)
def test_yaml_problems(
    tmp_path: Path, name: str, text: str | bytes, line: int, message: str, hint: str | None
) -> None:
    path = tmp_path / "opp.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    errors = load_errors(path)
    error = errors[0]
    assert (error.file, error.line) == (str(path), line), str(error)
    assert message in error.message
    if hint is not None:
        assert error.hint is not None and hint in error.hint


def test_alias_bombs_are_refused(tmp_path: Path) -> None:
    rows = ["a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for prev, name in zip("abcd", "bcde", strict=True):
        rows.append(f"{name}: &{name} [{', '.join(['*' + prev] * 10)}]")
    errors = load_errors(write(tmp_path, "bomb.yaml", "\n".join(rows) + "\n"))
    assert "more than 100000 values" in errors[0].message


def test_unreadable_file(tmp_path: Path) -> None:
    errors = load_errors(tmp_path / "missing.yaml")
    assert errors[0].line == 0 and "cannot read file" in errors[0].message


# --- directories and the live set ----------------------------------------------------------------

SANDBOX = BASE.replace("connection: salesforce", "connection: sandbox").replace(
    "object: Opportunity", "object: deal"
)


def test_load_mapping_dir(tmp_path: Path) -> None:
    write(tmp_path, "sf.yaml", BASE)
    write(tmp_path, "nested/sandbox.yml", SANDBOX)
    write(tmp_path, "broken.yaml", "connection: [\n")
    write(tmp_path, ".hidden/ignored.yaml", "not: [valid\n")
    write(tmp_path, "notes.txt", "not a mapping")
    result = load_mapping_dir(tmp_path)
    assert isinstance(result, LoadResult)
    assert sorted(m.connection for m in result.mappings) == ["salesforce", "sandbox"]
    assert [e.file for e in result.errors] == [str(tmp_path / "broken.yaml")]


def test_same_connection_and_object_twice_is_an_error(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", BASE)
    second = write(tmp_path, "b.yaml", BASE.replace("object: Opportunity", "object: OPPORTUNITY"))
    result = load_mapping_dir(tmp_path)
    assert [m.source_path for m in result.mappings] == [str(tmp_path / "a.yaml")]
    (error,) = result.errors
    assert (error.file, error.line, error.key) == (str(second), 2, "object")
    assert "already mapped in" in error.message and str(tmp_path / "a.yaml") in error.message


def test_missing_directory() -> None:
    result = load_mapping_dir("/nonexistent/mappings")
    assert result.mappings == [] and "does not exist" in result.errors[0].message


def test_mapping_set_lookup_is_case_insensitive_on_object(tmp_path: Path) -> None:
    write(tmp_path, "sf.yaml", BASE)
    mappings = MappingSet.load(tmp_path)
    assert mappings.errors == ()
    assert [m.object_type for m in mappings.for_object("salesforce", "opportunity")] == ["Opportunity"]
    assert mappings.for_object("salesforce", "Account") == []
    assert mappings.for_object("hubspot", "Opportunity") == []


def test_mapping_set_keeps_last_good_set_when_a_file_breaks(tmp_path: Path) -> None:
    sf = write(tmp_path, "sf.yaml", BASE)
    write(tmp_path, "sandbox.yaml", SANDBOX)
    mappings = MappingSet.load(tmp_path)
    good = mappings.mappings
    assert len(good) == 2

    # Break one file and edit the other: nothing new is activated, errors are reported.
    sf.write_text(BASE.replace("{gt: 100000}", "{gtt: 100000}"))
    write(tmp_path, "sandbox.yaml", SANDBOX.replace("Pending", "Waiting"))
    errors = mappings.reload()
    assert [e.key for e in errors] == ["rules[0].when.all[0].amount.gtt"]
    assert mappings.errors == tuple(errors)
    assert mappings.mappings == good  # the whole last good set, untouched
    status = mappings.for_object("sandbox", "deal")[0].rules[0].actions["submit"].set["status"]
    assert status({}) == "Pending"

    # Fix it: the new set goes live and the errors clear.
    sf.write_text(BASE)
    assert mappings.reload() == []
    assert mappings.errors == ()
    status = mappings.for_object("sandbox", "deal")[0].rules[0].actions["submit"].set["status"]
    assert status({}) == "Waiting"


def test_mapping_set_first_load_with_errors_is_empty(tmp_path: Path) -> None:
    write(tmp_path, "sf.yaml", BASE)
    write(tmp_path, "broken.yaml", "connection: [\n")
    mappings = MappingSet.load(tmp_path)
    assert mappings.mappings == ()
    assert len(mappings.errors) == 1
    assert mappings.for_object("salesforce", "Opportunity") == []


def test_mapping_set_follows_deleted_files(tmp_path: Path) -> None:
    sf = write(tmp_path, "sf.yaml", BASE)
    write(tmp_path, "sandbox.yaml", SANDBOX)
    mappings = MappingSet.load(tmp_path)
    sf.unlink()
    assert mappings.reload() == []
    assert [m.connection for m in mappings.mappings] == ["sandbox"]


# --- crm-approvals validate ----------------------------------------------------------------------


def test_validate_command_ok(tmp_path: Path) -> None:
    write(tmp_path, "sf.yaml", BASE)
    result = CliRunner().invoke(validate, [str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "all mapping files are valid" in result.output


def test_validate_command_reports_file_line_key_message_hint(tmp_path: Path) -> None:
    write(tmp_path, "sf.yaml", BASE)
    bad = write(tmp_path, "bad.yaml", SANDBOX.replace("mode: one", "mode: onne"))
    result = CliRunner().invoke(validate, [str(tmp_path)])
    assert result.exit_code == 1
    line = line_of(SANDBOX, "mode: one")
    expected = (
        f"{bad}:{line}: rules[0].steps[0].mode: 'onne' is not allowed; "
        "expected `one`, `all`, `any` or `quorum`; hint: did you mean `one`?"
    )
    assert expected in result.output.splitlines()


def test_validate_command_defaults_to_mappings_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(validate, [])
    assert result.exit_code == 1
    assert "mappings" in result.output and "no such file or directory" in result.output
    write(tmp_path, "mappings/sf.yaml", BASE)
    assert CliRunner().invoke(validate, []).exit_code == 0


def test_validate_command_accepts_files_and_flags_cross_file_duplicates(tmp_path: Path) -> None:
    a = write(tmp_path, "a.yaml", BASE)
    b = write(tmp_path, "b.yaml", BASE)
    assert CliRunner().invoke(validate, [str(a)]).exit_code == 0
    assert CliRunner().invoke(validate, [str(a), str(a)]).exit_code == 0  # same file twice is fine
    result = CliRunner().invoke(validate, [str(a), str(b)])
    assert result.exit_code == 1 and "already mapped" in result.output


def test_validate_empty_directory_is_an_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(validate, [str(tmp_path)])
    assert result.exit_code == 1 and "no mapping files" in result.output


SF_FIELDS = {
    "Amount",
    "StageName",
    "OwnerId",
    "Approval_Status__c",
    "Approval_Expires__c",
    "Product_Lines__c",
    "VIP__c",
}


def test_validate_with_describe_checks_api_names(tmp_path: Path) -> None:
    path = write(tmp_path, "sf.yaml", BASE.replace("api: Amount,", "api: Amont,"))
    calls: list[tuple[str, str]] = []

    def describe(connection: str, object_type: str) -> set[str]:
        calls.append((connection, object_type))
        return SF_FIELDS

    errors = validate_paths([path], describe)
    assert calls == [("salesforce", "Opportunity")]
    assert [(e.key, e.line) for e in errors] == [("fields.amount", 5)]
    assert "`Amont` is not a field" in errors[0].message and errors[0].hint == "did you mean `Amount`?"


@pytest.mark.parametrize(
    ("describe_names", "ok"),
    [
        ({"Owner"}, True),  # relationship name listed
        ({"OwnerId"}, True),  # or its lookup field
        ({"ownerid"}, True),  # case-insensitive
        ({"Owner_Id"}, True),
        ({"CreatedById"}, False),
    ],
)
def test_validate_with_describe_checks_relationship_first_segment(
    tmp_path: Path, describe_names: set[str], ok: bool
) -> None:
    path = write(tmp_path, "sf.yaml", BASE)
    errors = validate_paths([path], lambda c, o: (SF_FIELDS - {"OwnerId"}) | describe_names)
    assert (errors == []) is ok
    if not ok:
        assert errors[0].key == "fields.owner_manager" and "relationship `Owner`" in errors[0].message


def test_validate_custom_relationship_uses_lookup_field(tmp_path: Path) -> None:
    path = write(tmp_path, "sf.yaml", BASE.replace("Owner.ManagerId", "Partner__r.Manager__c"))
    assert validate_paths([path], lambda c, o: SF_FIELDS | {"Partner__c"}) == []


def test_validate_describe_failure_is_reported_not_raised(tmp_path: Path) -> None:
    path = write(tmp_path, "sf.yaml", BASE)

    def describe(connection: str, object_type: str) -> set[str]:
        raise ConnectionError("CRM unreachable")

    (error,) = validate_paths([path], describe)
    assert (error.key, error.line) == ("object", 2) and "CRM unreachable" in error.message


def test_make_validate_command_uses_describe_factory(tmp_path: Path) -> None:
    write(tmp_path, "sf.yaml", BASE)
    command = make_validate_command(lambda ctx: lambda c, o: set())
    result = CliRunner().invoke(command, [str(tmp_path)])
    assert result.exit_code == 1 and "is not a field of this object" in result.output


def test_docs_full_example_is_a_valid_mapping(tmp_path: Path) -> None:
    docs = (REPO / "docs" / "mappings.md").read_text(encoding="utf-8")
    example = docs.split("```yaml\n", 1)[1].split("```", 1)[0]
    spec = load_mapping_file(write(tmp_path, "example.yaml", example))
    assert [step.name for step in spec.rules[0].steps] == ["manager", "general-manager", "finance", "legal"]
