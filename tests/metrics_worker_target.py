"""Run as a separate process by the multiprocess /metrics test: a worker process that
processes the inbox once with the settings of an env file, counting into the shared
PROMETHEUS_MULTIPROC_DIR like `crm-approvals worker` does."""

from __future__ import annotations

import sys

from connector.config import Settings
from connector.server import prepare_metrics_dir

if __name__ == "__main__":
    settings = Settings.from_env({}, dotenv_path=sys.argv[1])
    prepare_metrics_dir(settings.metrics_dir)  # before prometheus_client is imported

    from connector.metrics import INBOX_EVENTS  # noqa: F401 - imported in multiprocess mode
    from connector.runtime import Runtime
    from connector.storage.inbox import process_pending
    from tests.processors import CountingProcessor

    runtime = Runtime.from_settings(settings)
    print(process_pending(runtime.sessions, CountingProcessor()).done)
