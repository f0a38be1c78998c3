"""`crm-approvals simulate`: what proposed mapping files would have done with the record
changes we stored, beside what really happened. Read-only: it reads the inbox and the
requests, evaluates in memory, and never writes (the session is rolled back).

How the replay judges: the stored inbox events of the period, oldest first, are folded into
per-record values (as the pipeline's snapshots do, starting empty at the period's start);
each change is evaluated with the proposed rules at the moment it happened. A rule "sends a
record for approval" when a change matches it and no simulated request of that rule is
already open for the record; the chain is planned as `explain` plans it. Echoes of our own
write-back and events that failed are skipped, as the pipeline skipped them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from connector.approvals.errors import ChainError
from connector.approvals.lifecycle import plan_chain
from connector.approvals.spec import EvalContext, MappingSpec, RuleSpec
from connector.rules import MappingSet
from connector.service.pipeline import CaseInsensitive, effective_changes
from connector.storage.approval_store import RecordKey
from connector.storage.models import DONE, ApprovalRequestRow, ApprovalStepRow, InboxEvent

PAGE = 1000  # inbox rows read at a time: memory stays flat on a long history

Chain = tuple[str, ...]  # "step: approver, approver" per step that applies
UNFINISHED = "…"  # ends a real chain that stopped early (rejected, recalled, still open)


def same_chain(proposed: Chain, actual: Chain) -> bool:
    """A real chain that stopped early matches when its steps begin the proposed one."""
    if actual and actual[-1] == UNFINISHED:
        return proposed[: len(actual) - 1] == actual[:-1]
    return proposed == actual


@dataclass
class RuleImpact:
    rule: str
    would: dict[str, Chain] = field(default_factory=dict)  # record ref -> first simulated chain
    actual: dict[str, Chain] = field(default_factory=dict)  # record ref -> first real chain
    would_count: int = 0  # simulated submissions (a record may be sent again after it closed)
    actual_count: int = 0  # real requests in the period

    @property
    def only_new(self) -> list[str]:
        """Records the proposed rules would send that were not sent."""
        return sorted(set(self.would) - set(self.actual))

    @property
    def only_actual(self) -> list[str]:
        """Records that were sent and the proposed rules would not send."""
        return sorted(set(self.actual) - set(self.would))

    @property
    def other_chain(self) -> list[str]:
        """Records sent by both, to a different chain."""
        both = set(self.would) & set(self.actual)
        return sorted(ref for ref in both if not same_chain(self.would[ref], self.actual[ref]))

    def chains(self, which: dict[str, Chain]) -> dict[Chain, int]:
        counts: dict[Chain, int] = defaultdict(int)
        for chain in which.values():
            counts[chain] += 1
        return dict(sorted(counts.items(), key=lambda item: -item[1]))


@dataclass
class Simulation:
    since: datetime
    events: int  # record changes replayed
    skipped: int  # echoes, failed and deleted-record events
    rules: dict[str, RuleImpact]


def simulate(session: Session, proposed: MappingSet, since: datetime) -> Simulation:
    """Replay the inbox since `since` through `proposed`; compare with the stored requests."""
    impacts: dict[str, RuleImpact] = {}

    def impact(rule: str) -> RuleImpact:
        return impacts.setdefault(rule, RuleImpact(rule))

    values_by_record: dict[RecordKey, dict[str, Any]] = {}
    open_requests: set[tuple[RecordKey, str]] = set()
    events = skipped = 0
    for event in _events(session, since):
        record = RecordKey(event.connection, event.object_type, event.record_id)
        if event.status != DONE or (event.result or "").startswith("echo") or event.change_type == "deleted":
            skipped += 1
            continue
        events += 1
        previous = values_by_record.get(record)
        values = {**(previous or {}), **(event.values or {})}
        values_by_record[record] = values
        changed = effective_changes(tuple(event.changed_fields or ()), values, previous)
        if previous is not None and not changed:
            continue
        for spec in proposed.for_object(event.connection, event.object_type):
            ctx = _context(spec, values, previous, changed, event.occurred_at)
            matched = [rule for rule in spec.rules if rule.when(ctx)]
            if spec.match == "first":
                matched = matched[:1]
            for rule in matched:
                key = (record, rule.name)
                if key in open_requests and not _restarts(rule, ctx):
                    continue
                open_requests.add(key)
                result = impact(rule.name)
                result.would_count += 1
                result.would.setdefault(record.ref, _planned_chain(rule, spec, ctx))

    for rule_name, ref, chain in _actual(session, since):
        result = impact(rule_name)
        result.actual_count += 1
        result.actual.setdefault(ref, chain)
    return Simulation(since, events, skipped, dict(sorted(impacts.items())))


def _events(session: Session, since: datetime) -> Iterator[InboxEvent]:
    last_id = 0
    while True:
        rows = session.scalars(
            select(InboxEvent)
            .where(InboxEvent.received_at >= since, InboxEvent.id > last_id)
            .order_by(InboxEvent.id)
            .limit(PAGE)
        ).all()
        if not rows:
            return
        yield from rows
        last_id = rows[-1].id
        session.expunge_all()  # keep memory flat; nothing here is ever written


def _context(
    spec: MappingSpec,
    values: dict[str, Any],
    previous: dict[str, Any] | None,
    changed: set[str],
    at: datetime,
) -> EvalContext:
    """As the pipeline builds it, at the moment the change happened (not now)."""
    return EvalContext(
        values=spec.to_canonical(CaseInsensitive(values)),
        previous=spec.to_canonical(CaseInsensitive(previous)) if previous is not None else None,
        changed_fields=spec.canonical_names(changed),
        today=at.date(),
        now=at,
    )


def _restarts(rule: RuleSpec, ctx: EvalContext) -> bool:
    """An open request of the rule restarts (a new submission) when a restart field changed."""
    return bool(set(rule.restart_on_change) & set(ctx.changed_fields))


def _planned_chain(rule: RuleSpec, spec: MappingSpec, ctx: EvalContext) -> Chain:
    try:
        return tuple(
            f"{step.name}: {', '.join(assignment.approvers)}"
            for step, assignment in plan_chain(rule, spec.roles, ctx)
            if assignment is not None
        )
    except ChainError as exc:
        return (f"(no chain: {exc})",)


def _actual(session: Session, since: datetime) -> Iterator[tuple[str, str, Chain]]:
    """Each real request submitted since `since`: its rule, record and first-round chain (the
    steps it entered, ending in UNFINISHED unless it was approved)."""
    R, S = ApprovalRequestRow, ApprovalStepRow
    requests = session.execute(
        select(R.id, R.rule_name, R.connection, R.object_type, R.record_id, R.status)
        .where(R.submitted_at >= since)
        .order_by(R.submitted_at, R.id)
    ).all()
    for row in requests:
        steps = session.execute(
            select(S.name, S.approvers)
            .where(S.request_id == row.id, S.round == 1, S.status != "skipped")
            .order_by(S.index)
        ).all()
        chain = tuple(f"{s.name}: {', '.join(s.approvers)}" for s in steps)
        if row.status != "approved":
            chain += (UNFINISHED,)
        yield row.rule_name, RecordKey(row.connection, row.object_type, row.record_id).ref, chain
