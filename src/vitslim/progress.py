"""Progress of long phases, on stderr: a rich bar on a terminal; elsewhere (CI logs, ``nohup``)
plain lines, one per step once a phase has run ``PLAIN_EVERY`` seconds, at most one per
``PLAIN_EVERY`` seconds, and its last; nothing with ``VITSLIM_QUIET=1``."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

T = TypeVar("T")

PLAIN_EVERY = 5.0  # seconds: shorter phases print nothing, longer ones a line this often at most

_stderr = Console(stderr=True, markup=False, emoji=False)  # descriptions hold user text (recipe names)


def progress_bar(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate over ``items`` showing how many are done, the time spent and the time left."""
    if os.environ.get("VITSLIM_QUIET") == "1":
        yield from items
        return
    total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
    if not _stderr.is_terminal:
        yield from _plain_lines(items, description, total)
        return
    columns = (TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=_stderr, transient=True) as progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task)


def _plain_lines(items: Iterable[T], description: str, total: int | None) -> Iterator[T]:
    start = last = time.monotonic()
    printed = False
    for done, item in enumerate(items, 1):
        yield item
        now = time.monotonic()
        if now - last >= PLAIN_EVERY or (printed and done == total):
            print(_plain_line(description, done, total, now - start), file=sys.stderr, flush=True)
            last, printed = now, True


def _plain_line(description: str, done: int, total: int | None, seconds: float) -> str:
    """``description: 3/12 after 45 s, about 2 min left``."""
    line = f"{description}: {done}/{total if total is not None else '?'} after {_duration(seconds)}"
    if total and done < total:
        line += f", about {_duration(seconds / done * (total - done))} left"
    return line


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"
