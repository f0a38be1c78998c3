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
``progress`` (dict)
    Where the request waits, for progress messages on the record: ``step`` (the open step's
    ``label``, else its name; None unless pending), ``step_number`` (1-based position of the
    open step in the rule), ``step_count`` (steps in the rule), ``since`` (date the open step
    opened), ``waiting_for`` (names of its approvers who have not voted yet; the id where the
    directory does not know a person), ``waiting_for_ids``, ``last_comment`` (the latest
    comment of a vote or recall; None before any) and ``url`` (the request's page in the web
    app; None when the caller does not know it).
``rule`` (dict)
    ``name``, ``steps`` (tuple of step names), ``expires_after`` (timedelta | None).

The ``step`` event fires whenever where the request waits changes: for every step that opens
(the first one at submit, each later one, one re-opened by ``on_reject: back``), and once more
when the request stops waiting (approved, rejected or recalled), then with ``progress.step``
None and ``approver``/``comment`` of that decision, so one action both writes the progress and
clears it. It is rendered after the outcome's other events.

Values are plain dicts so both Python renderers (``v["request"]["expires_at"]``) and
Jinja templates (``{{ request.expires_at }}``) can read them. The variables describe the
request *after* the operation: when one outcome fires ``submit`` then ``approve``, both
see the approved request.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from connector.approvals.errors import ActionRenderError
from connector.approvals.lifecycle import ApprovalRequest, Outcome, current_step_state, step_votes
from connector.approvals.spec import ActionEvent, ActionSpec, RuleSpec

# Transitions that change where a request waits: they fire the ``step`` event.
STEP_EVENT_TRANSITIONS = frozenset({"entered", "escalated", "approved", "rejected", "recalled"})
TEMPLATE_VARIABLES: tuple[str, ...] = (
    "today",
    "now",
    "record",
    "approver",
    "comment",
    "request",
    "rule",
    "progress",
)


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
    *,
    names: Callable[[str], str] | None = None,
    request_url: str | None = None,
    only: Collection[str] | None = None,
) -> dict[str, Any]:
    """The variables documented in the module docstring, for ``request`` under ``rule``.
    ``names`` turns a user id into a person's name (the id itself when not given). ``only``:
    the variables the caller's renderers read (``templating.variables_read``); the others are
    left out, not built (``today`` and ``now`` are always there)."""
    wanted = TEMPLATE_VARIABLES if only is None else only
    variables: dict[str, Any] = {"today": today, "now": now}
    if "record" in wanted:
        variables["record"] = dict(request.record if record is None else record)
    if "approver" in wanted:
        variables["approver"] = approver
    if "comment" in wanted:
        variables["comment"] = comment
    if "request" in wanted:
        variables["request"] = _request_variables(request)
    if "rule" in wanted:
        variables["rule"] = {
            "name": rule.name,
            "steps": tuple(step.name for step in rule.steps),
            "expires_after": rule.expires_after,
        }
    if "progress" in wanted:
        variables["progress"] = _progress_variables(request, rule, names or str, request_url)
    return variables


def variables_read(renderers: Iterable[Any]) -> frozenset[str] | None:
    """The variables these value renderers read, together (each says so in its `reads`, as
    connector.rules.templating's literals and templates do); None when one of them cannot say
    (a Python callable): it may read any of them."""
    read: set[str] = set()
    for renderer in renderers:
        reads = getattr(renderer, "reads", None)
        if reads is None:
            return None
        read.update(reads)
    return frozenset(read)


def render_outcome_actions(
    outcome: Outcome,
    rule: RuleSpec,
    today: date,
    now: datetime,
    *,
    names: Callable[[str], str] | None = None,
    request_url: str | None = None,
) -> list[RenderedAction]:
    """Render every action the outcome fired that the rule configures, in firing order, then
    ``step`` when where the request waits changed (see the module docstring).

    Events without an ``ActionSpec`` in ``rule.actions`` write nothing and are left out.
    """
    fired = [(a.event, a.actor, a.comment) for a in outcome.actions]
    moved = [t for t in outcome.transitions if t.kind in STEP_EVENT_TRANSITIONS]
    if moved:  # after a close, `approver` and `comment` are the closing decision's
        last = moved[-1]
        if last.kind == "entered":
            fired.append(("step", None, None))
        else:  # an approval's own row carries no comment: the deciding vote's step row does
            decided = [t for t in outcome.transitions if t.kind == "step_approved"]
            comment = last.comment if last.kind != "approved" or not decided else decided[-1].comment
            fired.append(("step", last.actor, comment))
    rendered: list[RenderedAction] = []
    for event, actor, comment in fired:
        action = rule.actions.get(event)
        if action is None:
            continue
        variables = template_variables(
            outcome.request,
            rule,
            today,
            now,
            approver=actor,
            comment=comment,
            names=names,
            request_url=request_url,
            only=variables_read(action.set.values()),  # a literal reads none, to build none
        )
        rendered.append(RenderedAction(event, render_action(action, variables)))
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


def _progress_variables(
    request: ApprovalRequest, rule: RuleSpec, names: Callable[[str], str], request_url: str | None
) -> dict[str, Any]:
    current = current_step_state(request)
    waiting: tuple[str, ...] = ()
    label = None
    if current is not None and current.status == "pending":
        voted = {v.approver for v in step_votes(request, current)}
        waiting = tuple(a for a in current.approvers if a not in voted)
        in_rule = current.index < len(rule.steps) and rule.steps[current.index].name == current.name
        label = rule.steps[current.index].title if in_rule else current.name
    return {
        "step": label,
        "step_number": current.index + 1 if current is not None else None,
        "step_count": len(rule.steps),
        "since": current.entered_at.date() if current is not None else None,
        "waiting_for": tuple(names(user) for user in waiting),
        "waiting_for_ids": waiting,
        "last_comment": last_comment(request),
        "url": request_url,
    }


def last_comment(request: ApprovalRequest) -> str | None:
    """The latest comment a person gave: on a vote, or with a recall."""
    said = [(v.at, v.comment) for v in request.votes if v.comment]
    said += [(t.at, t.comment) for t in request.transitions if t.kind == "recalled" and t.comment]
    return max(said, key=lambda item: item[0])[1] if said else None
