"""Deputies while people are away: setting, listing and cancelling delegations, and handing
the open steps of people who are away to their deputies.

The pure part (who stands in for whom today, cycles) is connector.approvals.routing; this
module keeps the rows (connector.directory.models.DelegationRow) and builds the
``RoutingContext`` the approval service resolves approvers with. New steps are routed when
they open; steps already open move when a delegation is set and, for delegations that start
later, on the worker's sweep (``delegations`` job), which is idempotent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from connector.approvals.errors import (
    DelegationCycleError,
    DelegationNotAllowedError,
    DelegationNotFoundError,
    InvalidDelegationError,
)
from connector.approvals.routing import Delegation, RoutingContext, describe_cycle, find_cycle
from connector.clock import utcnow
from connector.directory.models import DelegationRow
from connector.directory.org import DirectoryOrg
from connector.rules.errors import did_you_mean
from connector.storage import audit
from connector.storage.db import transaction
from connector.storage.models import ApprovalRequestRow, ApprovalStepRow

if TYPE_CHECKING:
    from connector.runtime import Runtime
    from connector.service.approval_service import ApprovalService

log = logging.getLogger(__name__)

MAX_DAYS = 366  # a longer absence is a change of job: reassign the work or change the mapping


@dataclass(frozen=True)
class DelegationView:
    """A delegation as people see it (API, CLI, web app)."""

    id: int
    connection: str
    user: str
    deputy: str
    starts_on: date
    ends_on: date
    rule: str | None
    note: str | None
    created_by: str
    created_at: datetime
    cancelled_at: datetime | None

    def in_force(self, today: date) -> bool:
        return self.cancelled_at is None and self.starts_on <= today <= self.ends_on

    def as_rule(self) -> Delegation:
        return Delegation(self.user, self.deputy, self.starts_on, self.ends_on, self.rule, self.id)


def _view(row: DelegationRow) -> DelegationView:
    return DelegationView(
        id=row.id,
        connection=row.connection,
        user=row.user_id,
        deputy=row.deputy_id,
        starts_on=row.starts_on,
        ends_on=row.ends_on,
        rule=row.rule_name,
        note=row.note,
        created_by=row.created_by,
        created_at=row.created_at,
        cancelled_at=row.cancelled_at,
    )


def current_delegations(session: Session, connection: str, today: date) -> list[Delegation]:
    """Delegations of the connection not cancelled and not over by ``today``."""
    rows = session.scalars(
        select(DelegationRow).where(
            DelegationRow.connection == connection,
            DelegationRow.cancelled_at.is_(None),
            DelegationRow.ends_on >= today,
        )
    )
    return [_view(row).as_rule() for row in rows]


class RoutingSource:
    """Builds the ``RoutingContext`` for one connection: the mapping's roles, the directory's
    org chart and queues, and the delegations in force ``today``."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def context(
        self,
        connection: str,
        roles: Mapping[str, tuple[str, ...]],
        today: date,
        *,
        session: Session | None = None,
    ) -> RoutingContext:
        if session is not None:
            # One read per transaction: a batch of events routes with the same delegations.
            txn, cached = session.info.get("delegations_in_force", (None, {}))
            if txn is not session.get_transaction():
                txn, cached = session.get_transaction(), {}
                session.info["delegations_in_force"] = (txn, cached)
            if (connection, today) not in cached:
                cached[connection, today] = current_delegations(session, connection, today)
            delegations = cached[connection, today]
        else:
            with transaction(self.sessions) as own:  # COMMIT, not ROLLBACK: as ApprovalService's reads
                delegations = current_delegations(own, connection, today)
        org = DirectoryOrg(self.sessions, connection, session=session)
        return RoutingContext(roles, org=org, delegations=delegations, today=today)


class DelegationService:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        approvals: ApprovalService,
        *,
        known_users: Callable[[str], set[str] | None] | None = None,
        rule_names: Callable[[str], Iterable[str]] | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.sessions = sessions
        self.approvals = approvals
        self.known_users = known_users  # directory ids of a connection; None before its first refresh
        self.rule_names = rule_names
        self.clock = clock

    @classmethod
    def from_runtime(cls, runtime: Runtime) -> DelegationService:
        from connector.directory import Directory

        approvals = runtime.approvals
        if approvals is None:
            raise InvalidDelegationError("the approval engine is not loaded (no mapping files)")
        directory = Directory.from_runtime(runtime)
        return cls(
            runtime.sessions,
            approvals,
            known_users=directory.known_ids,
            rule_names=lambda connection: _rule_names(approvals, connection),
            clock=approvals.clock,
        )

    # --- setting and cancelling ---------------------------------------------------------

    def set(
        self,
        *,
        connection: str,
        user: str,
        deputy: str,
        starts_on: date,
        ends_on: date,
        rule: str | None = None,
        note: str | None = None,
        actor: str,
        is_admin: bool = False,
    ) -> DelegationView:
        """Record that ``deputy`` acts for ``user`` from ``starts_on`` to ``ends_on`` (inclusive),
        on ``rule`` or every rule, then hand them the open steps ``user`` holds if it starts
        today. Users set their own deputy; admins anyone's."""
        user, deputy, rule = user.strip(), deputy.strip(), (rule or "").strip() or None
        if actor != user and not is_admin:
            raise DelegationNotAllowedError(
                f"{actor!r} may not set a deputy for {user!r}", hint="set your own, or ask an admin"
            )
        today = self.clock().date()
        self._check(connection, user, deputy, starts_on, ends_on, rule, today)
        new = Delegation(user, deputy, starts_on, ends_on, rule)
        with transaction(self.sessions) as session:
            cycle = find_cycle(current_delegations(session, connection, today), new)
            if cycle is not None:
                raise DelegationCycleError(
                    f"this deputy would hand {user}'s approvals back to them: {describe_cycle(cycle)}",
                    hint="cancel the other delegation first "
                    f"(`crm-approvals delegation list --user {deputy}`), or choose a deputy not away then",
                )
            row = DelegationRow(
                connection=connection,
                user_id=user,
                deputy_id=deputy,
                starts_on=starts_on,
                ends_on=ends_on,
                rule_name=rule,
                note=(note or "").strip()[:2000] or None,
                created_by=actor,
                created_at=self.clock(),
            )
            session.add(row)
            session.flush()
            audit.record(
                session,
                "delegation_set",
                connection=connection,
                actor=actor,
                delegation_id=row.id,
                user=user,
                deputy=deputy,
                starts_on=starts_on.isoformat(),
                ends_on=ends_on.isoformat(),
                rule=rule,
            )
            view = _view(row)
        if view.in_force(today):
            self.hand_over_open_steps(connection)
        return view

    def cancel(self, delegation_id: int, *, actor: str, is_admin: bool = False) -> DelegationView:
        """End a delegation now. Steps already handed to the deputy stay with them (an admin
        reassigns them if needed); new steps go to the user again."""
        with transaction(self.sessions) as session:
            row = session.get(DelegationRow, delegation_id)
            if row is None or not (is_admin or actor in (row.user_id, row.created_by)):
                raise DelegationNotFoundError(f"no delegation {delegation_id} that you may change")
            if row.cancelled_at is None:
                row.cancelled_at = self.clock()
                audit.record(
                    session,
                    "delegation_cancelled",
                    connection=row.connection,
                    actor=actor,
                    delegation_id=row.id,
                )
            return _view(row)

    def find(
        self,
        *,
        connection: str | None = None,
        user: str | None = None,
        include_past: bool = False,
    ) -> list[DelegationView]:
        """Delegations, newest first; by default only those not cancelled and not over. ``user``
        matches the person away or their deputy."""
        query = select(DelegationRow).order_by(DelegationRow.starts_on.desc(), DelegationRow.id.desc())
        if connection is not None:
            query = query.where(DelegationRow.connection == connection)
        if user is not None:
            query = query.where((DelegationRow.user_id == user) | (DelegationRow.deputy_id == user))
        if not include_past:
            query = query.where(
                DelegationRow.cancelled_at.is_(None), DelegationRow.ends_on >= self.clock().date()
            )
        with self.sessions() as session:
            return [_view(row) for row in session.scalars(query)]

    # --- open steps ---------------------------------------------------------------------

    def hand_over_open_steps(self, connection: str | None = None) -> list[str]:
        """Give open steps of people away today to their deputies (idempotent: a step already
        with the deputy is left alone). Returns a line per request changed."""
        today = self.clock().date()
        changed: list[str] = []
        with self.sessions() as session:
            away: dict[str, set[str]] = {}
            query = select(DelegationRow).where(
                DelegationRow.cancelled_at.is_(None),
                DelegationRow.starts_on <= today,
                DelegationRow.ends_on >= today,
            )
            if connection is not None:
                query = query.where(DelegationRow.connection == connection)
            for row in session.scalars(query):
                away.setdefault(row.connection, set()).add(row.user_id)
            candidates = [
                request_id
                for conn, users in away.items()
                for request_id in _open_requests_held_by(session, conn, users)
            ]
        for request_id in candidates:
            try:
                stored = self.approvals.delegate(self.sessions, request_id)
            except Exception as exc:  # one broken request must not stop the others
                log.warning("delegation: request %s left as it is: %s", request_id, exc)
                continue
            if stored is not None:
                changed.append(f"{stored.record.ref} (request {request_id})")
        return changed

    # --- checks -------------------------------------------------------------------------

    def _check(
        self,
        connection: str,
        user: str,
        deputy: str,
        starts_on: date,
        ends_on: date,
        rule: str | None,
        today: date,
    ) -> None:
        if not user or not deputy:
            raise InvalidDelegationError("name both the person away and their deputy (user ids)")
        if deputy == user:
            raise InvalidDelegationError(f"{user} cannot be their own deputy", hint="name someone else")
        if ends_on < starts_on:
            raise InvalidDelegationError(
                f"the delegation ends ({ends_on}) before it starts ({starts_on})", hint="swap the dates"
            )
        if ends_on < today:
            raise InvalidDelegationError(f"the delegation ended on {ends_on}, before today ({today})")
        if ends_on - starts_on > timedelta(days=MAX_DAYS):
            raise InvalidDelegationError(
                f"a delegation lasts at most {MAX_DAYS} days, this one {(ends_on - starts_on).days + 1}",
                hint="for a longer absence reassign the work or change the mapping files",
            )
        known = self.known_users(connection) if self.known_users is not None else None
        if known is not None:
            for who, role in ((user, "user"), (deputy, "deputy")):
                if who not in known:
                    raise InvalidDelegationError(
                        f"{role} {who!r} is not a user of connection {connection!r}",
                        hint=did_you_mean(who, sorted(known))
                        or "use the CRM user id (`crm-approvals directory list CONNECTION`)",
                    )
        if rule is not None and self.rule_names is not None:
            names = sorted(set(self.rule_names(connection)))
            if rule not in names:
                raise InvalidDelegationError(
                    f"no rule {rule!r} on connection {connection!r}",
                    hint=did_you_mean(rule, names) or f"rules: {', '.join(names) or 'none'}",
                )


def _open_requests_held_by(session: Session, connection: str, users: set[str]) -> list[str]:
    rows = session.execute(
        select(ApprovalStepRow.request_id, ApprovalStepRow.approvers)
        .join(ApprovalRequestRow, ApprovalRequestRow.id == ApprovalStepRow.request_id)
        .where(
            ApprovalRequestRow.connection == connection,
            ApprovalRequestRow.status == "pending",
            ApprovalStepRow.status == "pending",
        )
    )
    return sorted({request_id for request_id, approvers in rows if users & set(approvers or ())})


def _rule_names(approvals: ApprovalService, connection: str) -> list[str]:
    return [
        rule.name
        for spec in approvals.mappings.mappings
        if spec.connection == connection
        for rule in spec.rules
    ]


def sweep(runtime: Runtime) -> dict[str, Any]:
    """The worker's periodic job: hand open steps to deputies whose delegation started."""
    if runtime.approvals is None:
        return {"handed_over": []}
    return {"handed_over": DelegationService.from_runtime(runtime).hand_over_open_steps()}
