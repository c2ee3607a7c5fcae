"""The rich progress bar behind progress.meter, for a person at a terminal."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text


class _Bar:
    def __init__(self, progress: Progress, task: TaskID) -> None:
        self.progress, self.task = progress, task

    def total(self, n: float) -> None:
        self.progress.update(self.task, total=n)

    def advance(self, n: float = 1) -> None:
        self.progress.advance(self.task, n)

    def set(self, done: float) -> None:
        self.progress.update(self.task, completed=done)


class _Rate(ProgressColumn):
    """Items a second (rich's own rate column is for bytes)."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} {self.unit}/s" if speed else f"- {self.unit}/s")


@contextmanager
def bar(what: str, total: float | None, unit: str) -> Iterator[_Bar]:
    """A progress bar for `what`; unit "bytes" shows sizes and a transfer rate, any
    other unit counts items (M/N and items/s)."""
    columns: tuple[ProgressColumn, ...]
    if unit == "bytes":
        columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                   TransferSpeedColumn(), TextColumn("eta"), TimeRemainingColumn())
    else:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   _Rate(unit), TimeElapsedColumn(), TextColumn("eta"),
                   TimeRemainingColumn())
    with Progress(*columns, console=Console(file=sys.stderr), transient=True,
                  refresh_per_second=4) as progress:
        yield _Bar(progress, progress.add_task(what, total=total))
