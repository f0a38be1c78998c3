"""Mapping keys of issue 11 items 4-6: `crm_vote`, `lock`, `smart_reapproval` and step
`inputs`: compiled into the spec, and every mistake explained with file:line and a hint."""

from __future__ import annotations

from pathlib import Path

import pytest

from connector.approvals.spec import CrmVoteSpec, LockSpec
from connector.rules import load_mapping_file
from tests.rules.test_rules_loader import BASE, line_of, load_errors, write

TEXT = (
    BASE.replace(
        "  vip: {api: VIP__c, type: boolean}\n",
        "  vip: {api: VIP__c, type: boolean}\n"
        "  decision: Approval_Decision__c\n"
        "  decision_comment: Approval_Comment__c\n"
        "  close_date: {api: CloseDate, type: date}\n",
    )
    .replace(
        "    expires_after: 180d\n",
        "    expires_after: 180d\n"
        "    crm_vote: {decision: decision, comment: decision_comment,"
        " approve: [Approve, Approved], reject: Reject}\n"
        "    lock: {fields: [stage, close_date], mode: revert}\n"
        "    smart_reapproval: true\n",
    )
    .replace(
        "        approvers: [{field: owner_manager}]\n",
        "        approvers: [{field: owner_manager}]\n"
        "        smart_reapproval: false\n"
        "        inputs: [close_date]\n",
    )
)


def test_keys_compile_into_the_spec(tmp_path: Path) -> None:
    spec = load_mapping_file(write(tmp_path, "opp.yaml", TEXT))
    [rule] = spec.rules
    assert rule.crm_vote == CrmVoteSpec("decision", "decision_comment", ("Approve", "Approved"), ("Reject",))
    assert rule.crm_vote.decision_for(" approved ") == "approve"
    assert rule.crm_vote.decision_for("REJECT") == "reject"
    assert rule.crm_vote.decision_for("Maybe") is None
    assert rule.lock == LockSpec(frozenset({"stage", "close_date"}), "revert")
    assert rule.smart_reapproval is True
    manager, finance = rule.steps
    # A step's inputs: what its approvers and criteria read, plus its own `inputs:`.
    assert (manager.smart_reapproval, manager.inputs) == (False, frozenset({"owner_manager", "close_date"}))
    assert (finance.smart_reapproval, finance.inputs) == (None, frozenset({"amount"}))


def test_defaults_without_the_keys(tmp_path: Path) -> None:
    [rule] = load_mapping_file(write(tmp_path, "opp.yaml", BASE)).rules
    assert (rule.crm_vote, rule.lock, rule.smart_reapproval) == (None, None, False)


ERROR_CASES = [
    # (old, new, key, message, hint)
    (
        "decision: decision,",
        "decision: decisoin,",
        "rules[0].crm_vote.decision",
        "unknown field",
        "`decision`",
    ),
    (
        "decision: decision,",
        "decision: Approval_Decision__c,",
        "rules[0].crm_vote.decision",
        "unknown field",
        "use the canonical name `decision`",
    ),
    ("decision: decision,", "decision: amount,", "rules[0].crm_vote.decision", "is money", None),
    (
        "comment: decision_comment,",
        "comment: decision,",
        "rules[0].crm_vote.comment",
        "is the decision",
        None,
    ),
    ("reject: Reject}", "reject: approved}", "rules[0].crm_vote.reject", "both approves and rejects", None),
    (
        "crm_vote: {decision: decision, ",
        "crm_vote: {",
        "rules[0].crm_vote.decision",
        "missing required",
        None,
    ),
    ("approve: [Approve, Approved]", "approve: []", "rules[0].crm_vote.approve", "at least one", None),
    ("reject: Reject}", "reject: Reject, vote: x}", "rules[0].crm_vote.vote", "unknown key", None),
    ("mode: revert}", "mode: undo}", "rules[0].lock.mode", "expected `revert` or `flag`", None),
    ("mode: revert}", "mode: revrt}", "rules[0].lock.mode", "not allowed", "did you mean `revert`?"),
    (
        "lock: {fields: [stage, close_date], mode: revert}",
        "lock: {fields: [stage]}",
        "rules[0].lock.mode",
        "missing",
        None,
    ),
    (
        "fields: [stage, close_date]",
        "fields: [stage, clos_date]",
        "rules[0].lock.fields[1]",
        "unknown field",
        "close_date",
    ),
    (
        "fields: [stage, close_date]",
        "fields: [stage, stage]",
        "rules[0].lock.fields[1]",
        "listed twice",
        None,
    ),
    (
        "fields: [stage, close_date]",
        "fields: [stage, decision]",
        "rules[0].lock.fields[1]",
        "crm_vote",
        "remove",
    ),
    ("fields: [stage, close_date]", "fields: []", "rules[0].lock.fields", "at least one", None),
    (
        "fields: [stage, close_date]",
        "fields: [owner_manager]",
        "rules[0].lock.fields[0]",
        "related record",
        "mode: flag",
    ),
    (
        "smart_reapproval: true",
        "smart_reapproval: sometimes",
        "rules[0].smart_reapproval",
        "true or false",
        None,
    ),
    (
        "inputs: [close_date]",
        "inputs: [closedate]",
        "rules[0].steps[0].inputs[0]",
        "unknown field",
        "close_date",
    ),
    ("    expires_after: 180d", "    inputs: [stage]", "rules[0].inputs", "unknown key", "belongs to a step"),
    (
        "    restart_on_change: [amount]",
        "    restart_on_change: [amount, decision]",
        "rules[0].crm_vote.decision",
        "every vote would restart",
        "remove `decision` from `restart_on_change`",
        "crm_vote:",
    ),
]


@pytest.mark.parametrize(
    ("old", "new", "key", "message", "hint", "anchor"), [(*c, None)[:6] for c in ERROR_CASES]
)
def test_validation_errors(
    tmp_path: Path, old: str, new: str, key: str, message: str, hint: str | None, anchor: str | None
) -> None:
    assert old in TEXT
    text = TEXT.replace(old, new, 1)
    path = write(tmp_path, "opp.yaml", text)
    errors = [e for e in load_errors(path) if e.key == key]
    assert errors, [str(e) for e in load_errors(path)]
    error = errors[0]
    assert message in error.message, str(error)
    if hint is not None:
        assert error.hint is not None and hint in error.hint, str(error)
    assert error.line == line_of(text, anchor or new)
    assert str(error).startswith(f"{path}:{error.line}: {key}: ")
