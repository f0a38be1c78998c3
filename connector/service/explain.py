"""`crm-approvals explain`: which rule a record matches, why, and who would be asked.
Read-only: nothing is stored, queued or written back."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from connector.approvals.errors import ChainError
from connector.approvals.lifecycle import plan_chain
from connector.approvals.spec import ConditionTrace, EvalContext, MappingSpec, RuleSpec
from connector.service.pipeline import build_context, effective_changes


@dataclass
class StepPlan:
    name: str
    mode: str
    approvers: tuple[str, ...] = ()
    required: int = 0
    skipped: bool = False
    error: str | None = None


@dataclass
class RuleExplanation:
    rule: str
    matched: bool
    would_open: bool  # matched, and the mapping's match mode reaches it
    conditions: list[ConditionTrace]
    chain: list[StepPlan] = field(default_factory=list)


@dataclass
class Explanation:
    mapping: str
    mapping_hash: str
    match_mode: str
    values: dict[str, Any]
    changed: list[str]
    rules: list[RuleExplanation]


def explain_record(
    spec: MappingSpec,
    values: Mapping[str, Any],
    previous: Mapping[str, Any] | None = None,
    changed_fields: tuple[str, ...] = (),
) -> Explanation:
    """Evaluate every rule of one mapping against a record given by API-name values."""
    changed = effective_changes(changed_fields, values, previous)
    ctx = build_context(spec, values, previous, changed)
    rules, opened = [], 0
    for rule in spec.rules:
        matched = rule.when(ctx)
        would_open = matched and (spec.match == "all" or opened == 0)
        opened += would_open
        chain = _plan(rule, spec, ctx) if would_open else []
        rules.append(RuleExplanation(rule.name, matched, would_open, rule.when.explain(ctx), chain))
    return Explanation(
        spec.source_path, spec.content_hash, spec.match, dict(ctx.values), sorted(ctx.changed_fields), rules
    )


def _plan(rule: RuleSpec, spec: MappingSpec, ctx: EvalContext) -> list[StepPlan]:
    plans = []
    try:
        for step, assignment in plan_chain(rule, spec.roles, ctx):
            if assignment is None:
                plans.append(StepPlan(step.name, step.mode, skipped=True))
            else:
                plans.append(StepPlan(step.name, step.mode, assignment.approvers, assignment.required))
    except ChainError as exc:
        plans.append(StepPlan("(chain error)", "-", error=str(exc)))
    return plans


def render_text(explanation: Explanation) -> str:
    digest = explanation.mapping_hash[:12]
    lines = [f"mapping {explanation.mapping} (sha256 {digest}, match: {explanation.match_mode})"]
    lines.append(f"changed fields: {', '.join(explanation.changed) or '(none)'}")
    for rule in explanation.rules:
        verdict = "MATCHES" if rule.matched else "does not match"
        if rule.matched and not rule.would_open:
            verdict += " (not used: match: first took an earlier rule)"
        lines.append(f"\nrule {rule.rule}: {verdict}")
        for trace in rule.conditions:
            mark = "✓" if trace.result else "✗"
            if trace.field is None:
                lines.append(f"  {mark} {trace.path}: {trace.operator}")
            else:
                lines.append(
                    f"  {mark} {trace.path}: {trace.field} {trace.operator} {trace.expected!r}"
                    f"  (actual: {trace.actual!r})"
                )
        for n, step in enumerate(rule.chain, 1):
            if step.error:
                lines.append(f"  chain error: {step.error}")
            elif step.skipped:
                lines.append(f"  step {n} {step.name}: skipped (entry criteria not met)")
            else:
                who = ", ".join(step.approvers)
                lines.append(
                    f"  step {n} {step.name} [{step.mode}, {step.required} of {len(step.approvers)}]: {who}"
                )
    return "\n".join(lines)
