"""Rejection comments, admin reassignment and the permission queries of the lifecycle."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from connector.approvals.errors import (
    CommentRequiredError,
    DuplicateVoteError,
    InvalidReassignError,
    NotAnApproverError,
    ReassignNotAllowedError,
    RequestClosedError,
    StaleStepError,
)
from connector.approvals.lifecycle import current_step_state, may_recall, may_see, may_vote, reassign
from connector.rules.loader import MappingLoadError, load_mapping_file
from tests.approvals.test_lifecycle import T0, make_rule, one, submit, team_step, vote
from tests.rules.test_rules_loader import BASE


def test_required_comment_refuses_a_bare_rejection_and_changes_nothing() -> None:
    rule = make_rule(one("Manager", "m1"), reject_comment="required")
    request = submit(rule).request
    for comment in (None, "", "   "):
        with pytest.raises(CommentRequiredError, match="needs a comment"):
            vote(request, rule, "m1", "reject", comment=comment)
    assert request.status == "pending" and request.votes == []
    rejected = vote(request, rule, "m1", "reject", comment="margin too thin").request
    assert rejected.status == "rejected" and rejected.votes[0].comment == "margin too thin"


def test_optional_comment_and_approvals_need_none() -> None:
    optional = make_rule(one("Manager", "m1"), reject_comment="optional")
    assert vote(submit(optional).request, optional, "m1", "reject").request.status == "rejected"
    required = make_rule(one("Manager", "m1"), reject_comment="required")
    assert vote(submit(required).request, required, "m1", "approve").request.status == "approved"


def test_outsiders_hear_they_may_not_vote_before_hearing_about_comments() -> None:
    rule = make_rule(one("Manager", "m1"), reject_comment="required")
    with pytest.raises(NotAnApproverError):
        vote(submit(rule).request, rule, "stranger", "reject")


def test_mapping_files_require_a_comment_unless_they_say_otherwise(tmp_path: Path) -> None:
    default = tmp_path / "default.yaml"
    default.write_text(BASE)
    assert load_mapping_file(default).rules[0].reject_comment == "required"
    assert load_mapping_file(default).rules[0].bulk_approve is False
    optional = tmp_path / "optional.yaml"
    optional.write_text(
        BASE.replace(
            "    expires_after: 180d\n",
            "    expires_after: 180d\n    reject_comment: optional\n    bulk_approve: true\n",
        )
    )
    rule = load_mapping_file(optional).rules[0]
    assert (rule.reject_comment, rule.bulk_approve) == ("optional", True)


def test_a_misspelt_reject_comment_value_is_explained(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        BASE.replace("    expires_after: 180d\n", "    expires_after: 180d\n    reject_comment: optinal\n")
    )
    with pytest.raises(MappingLoadError) as info:
        load_mapping_file(path)
    [error] = info.value.errors
    assert error.key == "rules[0].reject_comment"
    assert "expected 'required' or 'optional'" in error.message or "required" in error.message
    assert error.hint is not None and "optional" in error.hint


def test_admin_reassigns_an_approver_who_has_not_voted() -> None:
    rule = make_rule(team_step("all"))
    request = vote(submit(rule).request, rule, "a").request
    outcome = reassign(
        request,
        step_index=0,
        old="b",
        new="z",
        actor="admin",
        now=T0 + timedelta(hours=1),
        comment="b is away",
        is_admin=True,
    )
    step = current_step_state(outcome.request)
    assert step is not None and step.approvers == ("a", "z", "c")
    assert outcome.steps == (step,) and outcome.actions == ()
    [transition] = outcome.transitions
    assert (transition.kind, transition.actor, transition.acting_admin) == ("reassigned", "admin", True)
    assert transition.comment == "b -> z: b is away"
    assert outcome.request.version == request.version + 1
    # The new approver votes; the one replaced no longer may, and a's earlier vote still counts.
    assert may_vote(outcome.request, "z") and not may_vote(outcome.request, "b")
    after = vote(outcome.request, rule, "z", minutes=90).request
    assert vote(after, rule, "c", minutes=91).request.status == "approved"


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"is_admin": False}, ReassignNotAllowedError),
        ({"old": "a"}, DuplicateVoteError),  # a already voted
        ({"old": "nobody"}, NotAnApproverError),
        ({"new": "  "}, InvalidReassignError),
        ({"new": "c"}, InvalidReassignError),
        ({"step_index": 1}, StaleStepError),
    ],
)
def test_reassign_refusals_change_nothing(kwargs: dict[str, object], error: type[Exception]) -> None:
    rule = make_rule(team_step("all"))
    request = vote(submit(rule).request, rule, "a").request
    args: dict[str, object] = {"step_index": 0, "old": "b", "new": "z", "actor": "admin", "is_admin": True}
    args.update(kwargs)
    with pytest.raises(error):
        reassign(request, now=T0, **args)  # type: ignore[arg-type]
    assert current_step_state(request).approvers == ("a", "b", "c")  # type: ignore[union-attr]


def test_reassign_on_a_closed_request_is_refused() -> None:
    rule = make_rule(one("Manager", "m1"))
    request = vote(submit(rule).request, rule, "m1").request
    with pytest.raises(RequestClosedError):
        reassign(request, step_index=0, old="m1", new="z", actor="admin", now=T0, is_admin=True)


def test_who_may_see_vote_and_recall() -> None:
    rule = make_rule(one("Manager", "m1"), one("Director", "d1"))
    request = submit(rule).request
    assert may_see(request, "sub") and may_see(request, "m1") and may_see(request, "d1") is False
    assert may_see(request, "d1", is_admin=True)
    assert may_vote(request, "m1") and not may_vote(request, "d1") and not may_vote(request, "sub")
    assert may_vote(request, "d1", is_admin=True)  # an admin override
    assert may_recall(request, "sub") and may_recall(request, "x", is_admin=True)
    assert not may_recall(request, "m1")
    voted = vote(request, rule, "m1").request
    assert may_see(voted, "d1") and not may_vote(voted, "m1") and may_vote(voted, "d1")
    done = vote(voted, rule, "d1", minutes=2).request
    assert not may_vote(done, "d1", is_admin=True) and not may_recall(done, "sub")
