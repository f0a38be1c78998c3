"""Process wiring: a Runtime that judges events, as the server, the worker and the ops
commands use it. The collaborators it attaches are typed attributes of the Runtime."""

from __future__ import annotations

import logging

from connector.config import Settings
from connector.directory.org import DirectoryOrg
from connector.documents.service import DocumentJob
from connector.notify.queue import NotificationQueue
from connector.notify.sender import send_now
from connector.notify.sender import sweep as people_sweep
from connector.rules import MappingSet
from connector.runtime import Runtime, SweepJob
from connector.service import service_steps
from connector.service.approval_service import ApprovalService
from connector.service.delegation import sweep as delegation_sweep
from connector.service.drift import DriftRepairJob
from connector.service.pipeline import Pipeline, log_mapping_error, refresh_mappings
from connector.service.timer_calendars import calendar_lookup
from connector.service.timers import StepTimers
from connector.service.timers import summary as timer_summary
from connector.service.zoho_channels import renew_due_channels
from connector.storage.request_counts import sweep as compact_request_counts
from connector.web.links import decision_link_provider

log = logging.getLogger(__name__)


def build_runtime(settings: Settings) -> Runtime:
    """The full runtime: the mapping files in MAPPINGS_DIR loaded, the pipeline attached."""
    return build_pipeline(settings).runtime


def build_pipeline(settings: Settings) -> Pipeline:
    """The same, for commands that drive the pipeline themselves (backfill): `.runtime` is it."""
    runtime = Runtime.from_settings(settings)
    mappings = MappingSet.load(settings.mappings_dir)
    for error in mappings.errors:
        log_mapping_error(error)
    return attach_pipeline(runtime, mappings)


def attach_pipeline(runtime: Runtime, mappings: MappingSet) -> Pipeline:
    """Make `runtime` judge events against `mappings`: the pipeline processes the inbox, the
    API votes through its approval service, and the sweep reloads mappings and expires approvals."""
    pipeline = Pipeline(runtime, mappings)
    timers = attach_step_timers(runtime, pipeline.approvals)
    runtime.processor = pipeline
    runtime.mappings = mappings
    runtime.approvals = pipeline.approvals
    runtime.sweep_jobs = [
        SweepJob("reload_mappings", lambda _rt: refresh_mappings(mappings)),
        SweepJob("expire", lambda rt: pipeline.approvals.expire_due(rt.sessions)),
        SweepJob("step_timers", lambda rt: timer_summary(timers.sweep(pipeline.approvals, rt.sessions))),
        SweepJob("drift_repair", DriftRepairJob.from_settings(runtime.settings)),
        SweepJob("zoho_channels", renew_due_channels),
        SweepJob("people", people_sweep),  # directory refresh, expiry warnings, notifications
        SweepJob("delegations", delegation_sweep),  # open steps of people away go to their deputies
        SweepJob("service_steps", service_steps.run_due),  # issue 12: checks retried, callbacks timed out
        SweepJob("request_counts", compact_request_counts),  # PostgreSQL's delta rows, one per key
    ]
    runtime.flush_jobs = [
        SweepJob("notifications", send_now),  # queued notifications go out promptly
        SweepJob("service_steps", service_steps.run_due),  # checks and duplicate checks just opened
        # Approval sheets and generated documents: rendered after each vote, attached to the record.
        SweepJob("documents", DocumentJob(runtime.settings.documents_templates_dir)),
    ]
    # "A step opens for you" messages carry one-click Approve / Reject links to the web app.
    runtime.link_providers = [decision_link_provider(runtime.settings)]
    return pipeline


def attach_step_timers(runtime: Runtime, approvals: ApprovalService) -> StepTimers:
    """Reminders, escalation and time-outs of open steps: scheduled with every saved request,
    acted on by the worker's sweep (connector/service/timers.py)."""
    timers = StepTimers(
        calendars=calendar_lookup(runtime.settings),
        orgs=lambda connection: DirectoryOrg(runtime.sessions, connection),
        notifications=NotificationQueue(runtime.settings),
        clock=approvals.clock,
    )
    approvals.timers = timers
    return timers
