"""Progress bars on stderr (hidden when not a terminal or when quiet)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

T = TypeVar("T")

_stderr = Console(stderr=True, markup=False, emoji=False)  # descriptions hold user text (recipe names)


def progress_bar(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar and ETA; silent when VITSLIM_QUIET=1 or not a terminal."""
    if os.environ.get("VITSLIM_QUIET") == "1" or not _stderr.is_terminal:
        yield from items
        return
    total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
    columns = (TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=_stderr, transient=True) as progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task)
