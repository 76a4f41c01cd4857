"""Printing results as tables and writing them as JSON (atomically)."""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.table import Table

# Wide enough for the result tables when piped to a file or a CI log.
console = Console(width=None if sys.stdout.isatty() else 160)


def fmt(value: Any, digits: int = 5) -> str:
    """Human formatting: ∞ for infinite SQNR, — for figures that do not apply."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        if math.isinf(value):
            return "∞" if value > 0 else "-∞"
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def print_table(title: str, rows: Sequence[dict], columns: dict[str, str], caption: str | None = None) -> None:
    """Print ``rows`` (dicts) with ``columns`` mapping row key -> header; columns that
    apply to no row (e.g. top-1 without labels) are left out."""
    shown = [k for k in columns if any(row.get(k) is not None for row in rows)]
    table = Table(title=title, caption=caption)
    for key in shown:
        numeric = all(isinstance(row.get(key), (int, float, type(None))) for row in rows)
        table.add_column(columns[key], justify="right" if numeric else "left")
    for row in rows:
        table.add_row(*(fmt(row.get(key)) for key in shown))
    console.print(table)


def _json_safe(obj: Any) -> Any:
    """JSON has no infinity: non-finite floats become the strings "inf"/"-inf"/"nan"."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename: never a half-written file."""
    write_text_atomic(path, json.dumps(_json_safe(data), indent=2) + "\n")


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write text through a temporary file and a rename."""
    write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write bytes through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    publish(tmp, path)


def publish(tmp: str | Path, path: str | Path) -> None:
    """Rename a finished temporary file or folder into place, with the permissions a normally
    created one would have (temporary files are private to their owner)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, (0o777 if Path(tmp).is_dir() else 0o666) & ~umask)
    os.replace(tmp, path)
