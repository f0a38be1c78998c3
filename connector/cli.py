"""The `crm-approvals` command line."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any

import click

from connector.config import MAIL_CATCHER_HOST, ConfigError, Settings
from connector.logs import configure_logging


class Context:
    """Settings are read once per command, lazily, so `--help` works without any configuration."""

    def __init__(self, env_file: str) -> None:
        self.env_file = env_file
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            try:
                self._settings = Settings.from_env(dotenv_path=self.env_file)
            except ConfigError as exc:
                raise click.ClickException(str(exc)) from None
            configure_logging(self._settings)
        return self._settings


pass_context = click.make_pass_decorator(Context)


class Commands(click.Group):
    """A configuration problem ends any command with its message, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--env-file", default=".env", show_default=True, help="Read settings from this .env file too.")
@click.pass_context
def main(ctx: click.Context, env_file: str) -> None:
    """Approval processes for CRM records.

    A CRM webhook arrives, is stored in the inbox, is judged against the mapping files,
    runs an approval chain, and the outcome is written back to the CRM record.
    Settings come from the environment and .env (see .env.example).
    """
    ctx.obj = Context(env_file)


@main.command()
@click.option("--bind", default=None, help="HOST:PORT to listen on [default: HOST:PORT from settings].")
@click.option("--workers", default=2, show_default=True, help="gunicorn worker processes.")
@click.option(
    "--threads", default=4, show_default=True, help="Threads per worker process (waitress, gthread)."
)
@click.option(
    "--worker-class",
    type=click.Choice(["waitress", "gthread", "gevent"]),
    default="waitress",
    show_default=True,
    help="gunicorn worker class. waitress reads each request whole before a thread takes it, so "
    "slow clients cannot starve the server; gthread gives a thread to each request while it is "
    "still being read (fine behind a buffering proxy); gevent also survives slow clients but "
    "costs ingest throughput (docs/decisions.md, docs/benchmarks.md).",
)
@pass_context
def serve(ctx: Context, bind: str | None, workers: int, threads: int, worker_class: str) -> None:
    """Serve the webhook receiver and the API under gunicorn.

    Webhooks are written to the inbox and acknowledged; the `worker` command processes them.
    """
    from connector.server import prepare_metrics_dir, serve_app

    settings = ctx.settings  # from --env-file, which the app must use too
    prepare_metrics_dir(settings.metrics_dir)  # before anything imports prometheus_client

    from connector.wiring import build_runtime
    from webhooks.app import create_app

    serve_app(
        lambda: create_app(build_runtime(settings)),
        bind or f"{settings.host}:{settings.port}",
        workers,
        threads,
        worker_class,
    )


@main.command()
@click.option("--workers", default=2, show_default=True, help="Worker threads taking tasks from the queue.")
@pass_context
def worker(ctx: Context, workers: int) -> None:
    """Process the inbox and flush the outbox (huey consumer).

    Runs a sweep at start-up and every minute, so nothing a lost task left is forgotten.
    """
    from connector.server import prepare_metrics_dir

    prepare_metrics_dir(ctx.settings.metrics_dir)  # before anything imports prometheus_client

    from connector.wiring import build_runtime
    from connector.worker import Tasks, make_huey, run_consumer

    runtime = build_runtime(ctx.settings)
    run_consumer(Tasks(runtime, make_huey(ctx.settings.queue_url)), workers=workers)


@main.group()
def db() -> None:
    """Database schema commands."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Alembic revision to upgrade to.")
@pass_context
def db_upgrade(ctx: Context, revision: str) -> None:
    """Create or migrate the tables in DATABASE_URL (SQLite file by default)."""
    from connector.storage.migrate import current, upgrade

    upgrade(ctx.settings.database_url, revision)
    click.echo(f"database at revision {current(ctx.settings.database_url)}")


@main.command()
@click.option("--env-example", default=".env.example", show_default=True, help="Template for a new .env.")
@pass_context
def init(ctx: Context, env_example: str) -> None:
    """Create .env from .env.example with fresh random webhook secrets (keeps an existing .env)."""
    from connector.envfile import write_env_file

    target = Path(ctx.env_file)
    if target.exists():
        click.echo(f"{target} exists; leaving it as it is")
        return
    if not Path(env_example).is_file():
        raise click.ClickException(
            f"{env_example} not found: run this in the project folder, or name the template "
            "with --env-example PATH"
        )
    write_env_file(Path(env_example), target)
    click.echo(f"wrote {target} with fresh secrets")


@main.command()
@click.option("--no-sandbox", is_flag=True, help="Do not start the sandbox CRM even without CRM credentials.")
@pass_context
def run(ctx: Context, no_sandbox: bool) -> None:
    """Migrate, then run the server, the worker and (with no CRM configured) the sandbox CRM.

    With no SMTP_HOST set, a local mail catcher receives the e-mail the worker sends.

    This is what `make run` calls. Ctrl-C stops everything.
    """
    from connector.storage.migrate import upgrade

    settings = ctx.settings
    children = plan_children(settings, with_sandbox=not no_sandbox)
    for child in children:
        for host, port, variable in child.listens:
            _require_free_port(host, port, variable)
    upgrade(settings.database_url)
    base = [sys.executable, "-m", "connector", "--env-file", ctx.env_file]
    # `kill PID` (SIGTERM) stops everything just like Ctrl-C does.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    processes = {child.name: subprocess.Popen([*base, child.command]) for child in children}
    try:
        for child in children:
            if child.probe_url:
                _wait_until_answering(child.name, child.probe_url, processes)
    except (click.ClickException, KeyboardInterrupt):
        _stop(processes)
        raise
    click.echo("")
    for child in children:
        if child.banner:
            click.echo(f"  {child.banner}")
    click.echo("  Stop with Ctrl-C.\n")
    _supervise(processes)


@dataclass(frozen=True)
class Child:
    """One process `run` starts: what it listens on (and which variable moves it), the URL
    that answers once it is up, and its line in the banner."""

    name: str
    command: str
    listens: tuple[tuple[str, int, str], ...] = ()
    probe_url: str | None = None
    banner: str | None = None


def plan_children(settings: Settings, *, with_sandbox: bool) -> list[Child]:
    """The processes of `crm-approvals run` for these settings."""
    from connector.commands.sandbox import bind_address

    server = f"http://{settings.host}:{settings.port}"
    children = [
        Child(
            "server",
            "serve",
            ((settings.host, settings.port, "PORT (and PUBLIC_BASE_URL)"),),
            f"{server}/livez",
            f"Webhooks + API:  {settings.public_base_url}/healthz",
        ),
        Child("worker", "worker"),
    ]
    if with_sandbox and settings.uses_sandbox:
        host, port = bind_address(settings.sandbox_url)
        children.append(
            Child(
                "sandbox",
                "sandbox",
                ((host, port, "SANDBOX_URL"),),
                f"{settings.sandbox_url}/",
                f"Sandbox CRM:     {settings.sandbox_url}/   (edit a deal to send a webhook)",
            )
        )
    notify = settings.notify
    if notify.uses_mail_catcher:  # no SMTP_HOST: mail goes to a local catcher
        page = f"http://{MAIL_CATCHER_HOST}:{notify.mail_catcher_port}/"
        children.append(
            Child(
                "mailcatcher",
                "mailcatcher",
                (
                    (MAIL_CATCHER_HOST, notify.mail_catcher_smtp_port, "MAIL_CATCHER_SMTP_PORT"),
                    (MAIL_CATCHER_HOST, notify.mail_catcher_port, "MAIL_CATCHER_PORT"),
                ),
                page,
                f"Mail catcher:    {page}   (e-mail sent)",
            )
        )
    return children


STARTUP_TIMEOUT = 60.0  # seconds a child may take to answer its first request


def _require_free_port(host: str, port: int, variable: str) -> None:
    """Fail before starting anything when another program already listens there."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        # As the servers do: a port in TIME_WAIT is free, one with a listener is not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise click.ClickException(
                f"cannot listen on {host}:{port}: {exc.strerror or exc}. "
                f"Stop the program using it, or set {variable} in .env to a free port."
            ) from None


def _wait_until_answering(name: str, url: str, processes: dict[str, subprocess.Popen[Any]]) -> None:
    """Return once `url` answers; fail as soon as a child exits or the time-out passes."""
    import requests

    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        exited = [n for n, p in processes.items() if p.poll() is not None]
        if exited:
            raise click.ClickException(f"{', '.join(exited)} exited during start-up; see its messages above")
        try:
            requests.get(url, timeout=1)
            return
        except requests.RequestException:
            time.sleep(0.2)
    raise click.ClickException(f"the {name} did not answer at {url} within {STARTUP_TIMEOUT:.0f} s")


def _raise_keyboard_interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def _supervise(processes: dict[str, subprocess.Popen[Any]]) -> None:
    try:
        while all(p.poll() is None for p in processes.values()):
            time.sleep(0.5)
        failed = [name for name, p in processes.items() if p.poll() is not None]
        click.echo(f"{', '.join(failed)} stopped; stopping the rest", err=True)
    except KeyboardInterrupt:
        pass
    finally:
        _stop(processes)


def _stop(processes: dict[str, subprocess.Popen[Any]]) -> None:
    for p in processes.values():
        if p.poll() is None:
            p.terminate()  # SIGTERM: gunicorn and huey shut down; the inbox keeps what was pending
    deadline = time.time() + 10
    for p in processes.values():
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()


# Commands contributed by feature modules: each module's COMMANDS lists its click commands.
COMMAND_MODULES = (
    "connector.commands.sandbox",
    "connector.commands.validate",
    "connector.commands.approvals",
    "connector.commands.ops",
    "connector.commands.dead_letters",
    "connector.commands.audit",
    "connector.commands.sync",
    "connector.commands.requests",
    "connector.commands.people",
    "connector.commands.delegation",
    "connector.commands.report",
    "connector.commands.simulate",
)


def _register_commands() -> None:
    for module_name in COMMAND_MODULES:
        for command in import_module(module_name).COMMANDS:
            main.add_command(command)


_register_commands()
