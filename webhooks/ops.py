"""Endpoints for load balancers and monitoring (docs/operations.md):

* `/livez`: the process answers. Touches nothing else; for a liveness probe.
* `/healthz`: what the system looks like now, read from the database, the queue and the
  mapping files on disk (connector/service/health.py), the same from every process.
  503 only when the database is unreachable (then this instance cannot store webhooks);
  everything else that needs a person is 200 with `warnings`. For a load balancer.
* `/metrics`: Prometheus text format, every process's counters plus gauges read from the
  database at scrape time (connector/metrics.py).
"""

from __future__ import annotations

from flask import Blueprint, Response, jsonify
from flask.typing import ResponseReturnValue

from connector.crm.rate_limits import BucketStore, BudgetCollector, bucket_store
from connector.metrics import render
from connector.service.health import Health, HealthCollector, check
from webhooks.intake import intake

blueprint = Blueprint("ops", __name__)


@blueprint.get("/livez")
def livez() -> ResponseReturnValue:
    return jsonify(status="ok")


@blueprint.get("/healthz")
def healthz() -> ResponseReturnValue:
    health = _check()
    return jsonify(health.to_json()), 200 if health.ready else 503


@blueprint.get("/metrics")
def metrics() -> ResponseReturnValue:
    body, content_type = render([HealthCollector(_check), BudgetCollector(_budget_store)])
    return Response(body, 200, content_type=content_type)


def _budget_store() -> BucketStore | None:
    runtime = intake().runtime
    return bucket_store(runtime.settings.queue_url, runtime.sessions) if runtime is not None else None


def _check() -> Health:
    state = intake()
    tasks = state.tasks
    probe = tasks.huey.storage.queue_size if tasks is not None else None
    return check(state.runtime, probe)
