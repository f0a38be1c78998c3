"""Process wiring: a Runtime that judges events, as the server, the worker and the ops
commands use it. The collaborators it attaches are typed attributes of the Runtime."""

from __future__ import annotations

import logging

from connector.config import Settings
from connector.documents.service import DocumentJob
from connector.notify.sender import send_now
from connector.notify.sender import sweep as people_sweep
from connector.rules import MappingSet
from connector.runtime import Runtime, SweepJob
from connector.service.drift import DriftRepairJob
from connector.service.pipeline import Pipeline, log_mapping_error, refresh_mappings
from connector.service.zoho_channels import renew_due_channels
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
    runtime.processor = pipeline
    runtime.mappings = mappings
    runtime.approvals = pipeline.approvals
    runtime.sweep_jobs = [
        SweepJob("reload_mappings", lambda _rt: refresh_mappings(mappings)),
        SweepJob("expire", lambda rt: pipeline.approvals.expire_due(rt.sessions)),
        SweepJob("drift_repair", DriftRepairJob.from_settings(runtime.settings)),
        SweepJob("zoho_channels", renew_due_channels),
        SweepJob("people", people_sweep),  # directory refresh, expiry warnings, notifications
    ]
    runtime.flush_jobs = [SweepJob("notifications", send_now)]  # queued notifications go out promptly
    # Approval sheets and generated documents: rendered after each vote, attached to the record.
    runtime.flush_jobs.append(SweepJob("documents", DocumentJob(runtime.settings.documents_templates_dir)))
    # "A step opens for you" messages carry one-click Approve / Reject links to the web app.
    runtime.link_providers = [decision_link_provider(runtime.settings)]
    return pipeline
