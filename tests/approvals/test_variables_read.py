"""Write-back values build only the template variables they read: a template knows the
variables it reads (`reads`), a literal reads none, and `render_outcome_actions` builds only
those (a Python renderer, which cannot say, gets them all). The values are the same."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

from connector.approvals.actions import (
    TEMPLATE_VARIABLES,
    render_outcome_actions,
    template_variables,
    variables_read,
)
from connector.approvals.lifecycle import ApprovalRequest, cast_vote, open_request
from connector.approvals.spec import ActionSpec, EvalContext, RuleSpec, StepSpec, UserApprovers
from connector.rules.templating import LiteralValue, TemplateValue, compile_value
from tests.approvals.test_actions import Always

T0 = datetime(2024, 3, 1, 9, 0, tzinfo=UTC)
TODAY = date(2024, 3, 1)

TEMPLATES = {
    "status": "Approved",
    "note": "{{ approver }} on {{ today }}: {{ comment }} ({{ request.id }}, {{ rule.name }})",
    "waiting": "{{ progress.waiting_for | join(', ') }} since {{ progress.since }}",
    "until": "{{ now + days(record.term) }}",
    "amount": "{{ record.amount * 2 }}",
}


def _rule(values: dict[str, Any]) -> RuleSpec:
    action = ActionSpec(set={name: compile_value(value) for name, value in values.items()})
    return RuleSpec(
        name="Discount",
        when=Always(),
        steps=(
            StepSpec("Manager", "one", (UserApprovers(("m1", "m2")),)),
            StepSpec("CFO", "one", (UserApprovers(("cfo",)),)),
        ),
        actions={"submit": action, "approve": action, "reject": action, "step": action},
        expires_after=timedelta(days=30),
    )


def _submitted(rule: RuleSpec) -> Any:
    context = EvalContext(
        values={"amount": 500, "term": 10}, previous=None, changed_fields=frozenset(), today=TODAY, now=T0
    )
    return open_request(rule, {}, context, record_ref="opp-1", submitter="sub", now=T0, request_id="r1")


def _vote(rule: RuleSpec, request: ApprovalRequest, who: str, comment: str | None = None) -> Any:
    return cast_vote(
        request, rule, {}, approver=who, decision="approve", step_index=request.current_step or 0,
        now=T0 + timedelta(hours=1), comment=comment,
    )  # fmt: skip


class _Names:
    def __init__(self) -> None:
        self.asked: list[str] = []

    def __call__(self, user: str) -> str:
        self.asked.append(user)
        return user.upper()


def test_a_template_knows_the_variables_it_reads_and_a_literal_reads_none() -> None:
    assert TemplateValue(TEMPLATES["note"]).reads == {"approver", "today", "comment", "request", "rule"}
    assert TemplateValue(TEMPLATES["until"]).reads == {"now", "record"}  # days is a global
    assert TemplateValue("{% for s in rule.steps %}{{ s }}{% endfor %}").reads == {"rule"}
    assert LiteralValue("Approved").reads == frozenset()
    renderers = [compile_value(v) for v in TEMPLATES.values()]
    assert variables_read(renderers) == {
        "approver", "today", "comment", "request", "rule", "progress", "now", "record"
    }  # fmt: skip
    assert variables_read([compile_value("Pending"), lambda _variables: 1]) is None


def test_only_the_variables_read_are_built_and_the_values_are_the_same() -> None:
    rule = _rule(TEMPLATES)
    # the same templates beside a Python renderer, which cannot say what it reads: every
    # variable is built for it, as for every action before
    every = _rule({**TEMPLATES, "python": "x"})
    for spec in every.actions.values():
        spec.set["python"] = lambda _variables: "x"  # type: ignore[index]
    submitted = _submitted(rule)
    voted = _vote(rule, submitted.request, "m1", comment="fine")
    seen = []
    for outcome, now in ((submitted, T0), (voted, T0 + timedelta(hours=1))):
        names = _Names()
        rendered = render_outcome_actions(outcome, rule, now.date(), now, names=names, request_url="u")
        expected = render_outcome_actions(outcome, every, now.date(), now, names=_Names(), request_url="u")
        assert [r.event for r in rendered] == [r.event for r in expected] and rendered
        for got, want in zip(rendered, expected, strict=True):
            assert {**got.values, "python": "x"} == want.values
        assert names.asked  # `progress.waiting_for` is read: the names were looked up
        seen.append([(r.event, r.values["note"], r.values["waiting"]) for r in rendered])
    assert seen == [
        [
            ("submit", "sub on 2024-03-01:  (r1, Discount)", "M1 since 2024-03-01"),
            ("step", " on 2024-03-01:  (r1, Discount)", "M1 since 2024-03-01"),
        ],
        [("step", " on 2024-03-01:  (r1, Discount)", "CFO since 2024-03-01")],
    ]
    assert rendered[0].values["amount"] == 1000 and rendered[0].values["until"] == "2024-03-11T10:00:00+00:00"


def test_literal_values_build_no_variables_and_look_up_no_names() -> None:
    rule = _rule({"status": "Pending", "flag": True})
    names = _Names()
    outcome = _submitted(rule)
    rendered = render_outcome_actions(outcome, rule, TODAY, T0, names=names)
    assert [(r.event, r.values) for r in rendered] == [
        ("submit", {"status": "Pending", "flag": True}),
        ("step", {"status": "Pending", "flag": True}),
    ]
    assert names.asked == []  # progress (the approvers' names) was not built
    assert template_variables(outcome.request, rule, TODAY, T0, only=()) == {"today": TODAY, "now": T0}


def test_a_python_renderer_gets_every_variable() -> None:
    seen: list[set[str]] = []

    def spy(variables: Any) -> str:
        seen.append(set(variables))
        return "x"

    rule = _rule({"status": "Pending"})
    action = ActionSpec(set={"status": compile_value("Pending"), "spy": spy})
    rule = RuleSpec(name=rule.name, when=rule.when, steps=rule.steps, actions={"submit": action})
    names = _Names()
    render_outcome_actions(_submitted(rule), rule, TODAY, T0, names=names)
    assert seen == [set(TEMPLATE_VARIABLES)]
    assert names.asked == ["m1"]  # progress was built for it
