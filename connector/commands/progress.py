"""Progress of a long CLI job: a rich progress bar on a terminal, plain lines otherwise
(a pipe, a log file, cron), so that output stays greppable where nobody watches it."""

from __future__ import annotations

import sys
from types import TracebackType
from typing import IO

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)


class JobProgress:
    """`with JobProgress() as progress:` then `task`, `advance`, `line`.

    On a terminal (`sys.stdout.isatty()`) a bar per task with a count, the lines printed
    above it; otherwise every line and a line per task, nothing else."""

    def __init__(self, *, interactive: bool | None = None, file: IO[str] | None = None) -> None:
        self.interactive = sys.stdout.isatty() if interactive is None else interactive
        self._file = file
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> JobProgress:
        if self.interactive:
            console = Console(file=self._file, force_terminal=True) if self._file else None
            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
            )
            self._progress.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._progress is not None:
            self._progress.stop()

    def task(self, description: str, total: int | None = None) -> None:
        """Start counting a new piece of work (total None: unknown, the bar pulses)."""
        if self._progress is None:
            self.line(description)
            return
        self._task = self._progress.add_task(description, total=total)

    def advance(self, n: int = 1) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, n)

    def line(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            click.echo(text, file=self._file)
