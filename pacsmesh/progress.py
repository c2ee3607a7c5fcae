"""Progress with rate and time left for the long operations (put, get, drill,
`scrub --now`, `gc --now`), on stderr, only when a person is watching: silent
when stdout is not a terminal or with --json, so scripts and pipes see exactly
what they saw before. rich is imported only then (progress_bar.py): every other
run of the CLI starts without it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol


class Meter(Protocol):
    def total(self, n: float) -> None: ...
    def advance(self, n: float = 1) -> None: ...
    def set(self, done: float) -> None: ...


class _Silent:
    def total(self, n: float) -> None:
        pass

    def advance(self, n: float = 1) -> None:
        pass

    def set(self, done: float) -> None:
        pass


def watching(json_out: bool) -> bool:
    """A person at a terminal, not a script."""
    return not json_out and sys.stdout.isatty() and sys.stderr.isatty()


@contextmanager
def meter(what: str, total: float | None, json_out: bool, unit: str = "items"
          ) -> Iterator[Meter]:
    """A progress bar for `what`; unit "bytes" shows sizes and a transfer rate, any
    other unit counts items (M/N and items/s)."""
    if not watching(json_out):
        yield _Silent()
        return
    from pacsmesh.progress_bar import bar

    with bar(what, total, unit) as shown:
        yield shown
