"""`crm-approvals sandbox`: serve the built-in sandbox CRM."""

from __future__ import annotations

from dataclasses import replace
from urllib.parse import urlsplit

import click

from connector.cli import Context, pass_context
from connector.config import ConfigError


@click.command()
@click.option(
    "--reset", is_flag=True, help="Delete every sandbox record and queued webhook, seed afresh, then serve."
)
@click.option("--bind", default=None, help="HOST:PORT to listen on [default: from SANDBOX_URL].")
@click.option(
    "--connection", "connection_name", default=None, help="The sandbox connection to serve, if several."
)
@pass_context
def sandbox(ctx: Context, reset: bool, bind: str | None, connection_name: str | None) -> None:
    """Serve the sandbox CRM: a local CRM to try the whole flow without an account anywhere.

    Its page lists deals and companies; editing one sends a signed webhook to this
    service. Data lives in SANDBOX_DB_PATH (var/sandbox.db), seeded on first start.
    """
    from werkzeug.serving import run_simple

    from connector.sandbox.app import SandboxConfig, create_sandbox_app

    settings = ctx.settings
    try:
        config = SandboxConfig.from_settings(settings, connection_name)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    host, port = bind_address(bind or settings.sandbox_url)
    # It answers to SANDBOX_URL's host and the loopback names; with --bind, to that host too.
    config = replace(config, hosts=(*config.hosts, f"{host}:{port}".lower()))
    app = create_sandbox_app(config, reset=reset)
    click.echo(
        f"Sandbox CRM on http://{host}:{port}/ (data: {config.db_path}); webhooks go to {config.webhook_url}"
    )
    # One process, many threads: the store and its webhook queue stay in one place.
    run_simple(host, port, app, threaded=True, use_reloader=False)


def bind_address(value: str) -> tuple[str, int]:
    """`http://127.0.0.1:8001` or `127.0.0.1:8001` -> ("127.0.0.1", 8001)."""
    parts = urlsplit(value if "://" in value else f"//{value}")
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise click.BadParameter(f"{value!r} is not HOST:PORT", param_hint="--bind / SANDBOX_URL")
    return parts.hostname, port


COMMANDS = [sandbox]
