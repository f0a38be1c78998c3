"""Rendering of rule actions (CRM write-backs) from template variables.

Template variables (``TEMPLATE_VARIABLES``), passed to every ``ValueRenderer``:

``today`` (date), ``now`` (datetime)
    The clock of the operation, supplied by the caller.
``record`` (dict)
    Canonical field -> value; the request's snapshot unless the caller passes fresh values.
``approver`` (str | None)
    Who triggered the event: the deciding voter for ``approve`` / ``reject``, the actor for
    ``recall``, the submitter for ``submit``; None when the engine acted alone (expiry,
    restart, approval of a chain whose steps were all skipped).
``comment`` (str | None)
    The comment given with that action.
``request`` (dict)
    ``id``, ``rule`` (name), ``status``, ``step`` (name of the open step, None unless
    pending), ``step_index``, ``last_step`` (name of the most recently entered step, e.g.
    the one that rejected; None if every step was skipped), ``submitter``, ``record_ref``,
    ``submitted_at``, ``approved_at``, ``expires_at``.
``rule`` (dict)
    ``name``, ``steps`` (tuple of step names), ``expires_after`` (timedelta | None).

Values are plain dicts so both Python renderers (``v["request"]["expires_at"]``) and
Jinja templates (``{{ request.expires_at }}``) can read them. The variables describe the
request *after* the operation: when one outcome fires ``submit`` then ``approve``, both
see the approved request.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from connector.approvals.errors import ActionRenderError
from connector.approvals.lifecycle import ApprovalRequest, Outcome, current_step_state
from connector.approvals.spec import ActionEvent, ActionSpec, RuleSpec

TEMPLATE_VARIABLES: tuple[str, ...] = ("today", "now", "record", "approver", "comment", "request", "rule")


@dataclass(frozen=True)
class RenderedAction:
    """An event with its rendered canonical field values, ready to queue for write-back."""

    event: ActionEvent
    values: dict[str, Any]


def render_action(action: ActionSpec | None, variables: Mapping[str, Any]) -> dict[str, Any]:
    """Canonical field -> rendered value; ``{}`` when the rule has no action for the event.

    A renderer that raises is reported as ``ActionRenderError`` naming the field.
    """
    if action is None:
        return {}
    rendered: dict[str, Any] = {}
    for name, renderer in action.set.items():
        try:
            rendered[name] = renderer(variables)
        except Exception as exc:  # any renderer bug must name the field it broke
            raise ActionRenderError(name, exc) from exc
    return rendered


def template_variables(
    request: ApprovalRequest,
    rule: RuleSpec,
    today: date,
    now: datetime,
    approver: str | None = None,
    comment: str | None = None,
    record: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The variables documented in the module docstring, for ``request`` under ``rule``."""
    return {
        "today": today,
        "now": now,
        "record": dict(request.record if record is None else record),
        "approver": approver,
        "comment": comment,
        "request": _request_variables(request),
        "rule": {
            "name": rule.name,
            "steps": tuple(step.name for step in rule.steps),
            "expires_after": rule.expires_after,
        },
    }


def render_outcome_actions(
    outcome: Outcome, rule: RuleSpec, today: date, now: datetime
) -> list[RenderedAction]:
    """Render every action the outcome fired that the rule configures, in firing order.

    Events without an ``ActionSpec`` in ``rule.actions`` write nothing and are left out.
    """
    rendered: list[RenderedAction] = []
    for fired in outcome.actions:
        action = rule.actions.get(fired.event)
        if action is None:
            continue
        variables = template_variables(
            outcome.request, rule, today, now, approver=fired.actor, comment=fired.comment
        )
        rendered.append(RenderedAction(fired.event, render_action(action, variables)))
    return rendered


def _request_variables(request: ApprovalRequest) -> dict[str, Any]:
    current = current_step_state(request)
    entered = [s for s in request.steps if s.status != "skipped"]
    return {
        "id": request.id,
        "rule": request.rule_name,
        "status": request.status,
        "step": current.name if current is not None else None,
        "step_index": request.current_step,
        "last_step": entered[-1].name if entered else None,
        "submitter": request.submitter,
        "record_ref": request.record_ref,
        "submitted_at": request.submitted_at,
        "approved_at": request.approved_at,
        "expires_at": request.expires_at,
    }
