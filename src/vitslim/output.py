"""Printing results and errors, and writing files: atomically, with the user's umask, and
only where the user said (output paths are checked before any long work starts).

Nothing user-supplied is ever parsed as rich markup or emoji codes: the consoles have both
off, and styled text is built with ``rich.text.Text``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import html
import json
import math
import os
import re
import shlex
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from vitslim.errors import OutputPathError

# Wide enough for the result tables when piped to a file or a CI log.
console = Console(width=None if sys.stdout.isatty() else 160, markup=False, emoji=False, highlight=False)
err_console = Console(stderr=True, markup=False, emoji=False, highlight=False)
MAX_MESSAGE_CHARS = 2000


def one_line(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``text`` as one printable line: whitespace runs (newlines too) become one space,
    control characters and undecodable bytes are escaped, and it is cut at ``limit``."""
    text = re.sub(r"\s+", " ", str(text)).strip()
    text = "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for c in text)
    if len(text) > limit:
        text = f"{text[:limit]}… ({len(text) - limit} more characters)"
    return text


def print_error(message: str) -> None:
    """``error: <message>`` on stderr, on one line, never interpreted as markup."""
    err_console.print(Text("error: ", style="bold red") + Text(one_line(message)), soft_wrap=True)


def print_warning(message: str) -> None:
    """``warning: <message>`` on stderr, on one line, never interpreted as markup."""
    err_console.print(Text("warning: ", style="yellow") + Text(one_line(message)), soft_wrap=True)


def styled(*parts: str | tuple[str, str]) -> Text:
    """Text from plain strings and (string, style) pairs: styles without markup parsing."""
    out = Text()
    for part in parts:
        out.append(*((part,) if isinstance(part, str) else part))
    return out


def fmt(value: Any, digits: int = 5) -> str:
    """Human formatting: ∞ for infinite SQNR, — for figures that do not apply."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        if math.isinf(value):
            return "∞" if value > 0 else "-∞"
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def significant(value: float | None, digits: int = 3) -> str:
    """``value`` to ``digits`` significant digits without an exponent (1237.2 -> 1237,
    31.234 -> 31.2, 0.5 -> 0.500); ``fmt``'s signs for None and infinities."""
    if value is None or not math.isfinite(value) or value == 0:
        return fmt(value)
    return f"{value:.{max(0, digits - 1 - math.floor(math.log10(abs(value))))}f}"


def print_table(title: str, rows: Sequence[dict], columns: dict[str, str], caption: str | None = None) -> None:
    """Print ``rows`` (dicts) with ``columns`` mapping row key -> header; columns that
    apply to no row (e.g. top-1 without labels) are left out."""
    shown = [k for k in columns if any(row.get(k) is not None for row in rows)]
    table = Table(title=Text(title), caption=Text(caption) if caption else None)
    for key in shown:
        numeric = all(isinstance(row.get(key), (int, float, type(None))) for row in rows)
        table.add_column(Text(columns[key]), justify="right" if numeric else "left")
    for row in rows:
        table.add_row(*(Text(fmt(row.get(key))) for key in shown))
    console.print(table)


def json_safe(obj: Any) -> Any:
    """JSON has no infinity: non-finite floats become the strings "inf"/"-inf"/"nan" (readers
    map them back where a figure may be infinite, e.g. the SQNR of an exact copy)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def markdown_text(text: Any) -> str:
    """User-derived text for Markdown prose: no raw HTML, no links or images, no table breaks,
    one line."""
    text = html.escape(" ".join(str(text).split()), quote=False)
    return re.sub(r"([\\`*_\[\]()!|#~{}])", r"\\\1", text)


def markdown_code(text: Any) -> str:
    """User-derived text as Markdown inline code, on one line (a fence longer than any run of
    backticks inside)."""
    text = " ".join(str(text).split())
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    return f"`{text}`" if fence == "`" else f"{fence} {text} {fence}"


def vitslim_command(*args: Any) -> str:
    """``vitslim ARGS`` as a line that runs as printed, started as this process was:
    ``uv run vitslim`` under ``uv run`` (the environment's scripts are on PATH only inside it),
    ``vitslim`` when it is on PATH, else the environment's own script by its full path. Each
    argument is quoted for the shell, on one line (whitespace runs collapsed)."""
    if os.environ.get("UV_RUN_RECURSION_DEPTH"):
        program = ("uv", "run", "vitslim")
    elif shutil.which("vitslim"):
        program = ("vitslim",)
    else:
        program = (Path(sys.executable).parent / "vitslim",)
    return " ".join(shlex.quote(" ".join(str(arg).split())) for arg in (*program, *args))


def json_text(data: Any) -> str:
    """Strict JSON (every reader accepts it: no NaN or Infinity tokens, see ``json_safe``)."""
    return json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n"


def write_json(path: str | Path, data: Any) -> None:
    """Write strict JSON through a temporary file and a rename: never a half-written file."""
    write_text_atomic(path, json_text(data))


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write text through a temporary file and a rename."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write bytes through a temporary file and a rename."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def publish(tmp: str | Path, path: str | Path) -> None:
    """Rename a finished temporary file or folder into place, with the permissions a normally
    created one would have (temporary files are private to their owner)."""
    os.chmod(tmp, (0o777 if Path(tmp).is_dir() else 0o666) & ~_umask())
    os.replace(tmp, path)


def replace_path(src: Path, dst: Path) -> None:
    """Move ``src`` (file or folder) to ``dst``, replacing what is there; ``dst`` is never
    half-written (a file is replaced in one rename; an old folder is moved aside first). Runs
    replacing paths in one folder at once take turns (a lock on the folder), so each ends with
    a whole result in place, the last one's."""
    src, dst = Path(src), Path(dst)
    with _folder_lock(dst.parent):
        if src.is_file() and (dst.is_file() or not dst.exists()):
            publish(src, dst)
            return
        aside = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        if dst.exists():
            os.replace(dst, aside)
        publish(src, dst)
    if aside.is_dir():
        shutil.rmtree(aside)
    else:
        aside.unlink(missing_ok=True)


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """A temporary folder beside ``path`` to fill; on success it replaces ``path`` in one move
    (``replace_path``). On any error nothing appears under ``path`` and the temporary is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        yield tmp
        replace_path(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Errors of the file system the user chose (full, read-only, no permission), not vitslim bugs.
_USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                errno.EISDIR, errno.ENAMETOOLONG, errno.EFBIG, errno.EIO}


def is_user_fault(err: BaseException) -> bool:
    """Whether ``err`` is a fault of the file system the user chose (full, too large a file,
    read-only, no permission, I/O error): the run fails with one line, nothing is recorded."""
    return isinstance(err, OutputPathError) or (isinstance(err, OSError) and err.errno in _USER_ERRNOS)


def os_error(number: int, path: str | Path) -> OutputPathError:
    """The one-line error for OS error ``number`` while writing ``path``."""
    return OutputPathError(f"cannot write {str(path)!r}: {os.strerror(number)}; free space or choose another path")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary file beside ``path`` to write; on success it is renamed to ``path`` with
    the permissions a new file gets under the umask. Until then (error, Ctrl-C, SIGKILL)
    nothing exists under the final name: only a hidden ``.NAME.*.tmp`` file may be left."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:100]}.", suffix=".tmp")
        os.close(fd)
    except OSError as err:
        raise OutputPathError(f"cannot write {str(path)!r}: {err.strerror or err}; choose another path") from err
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        if err.errno in _USER_ERRNOS:
            raise os_error(err.errno, path) from err
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def safe_filename(name: str, suffix: str = "") -> str:
    """A file name made from user text (e.g. a recipe's name) that cannot leave its folder:
    only letters, digits, ``.``, ``_`` and ``-``, no leading dot, at most 64 characters; a
    short hash of the original keeps names that had to be changed distinct."""
    clean = re.sub(r"[^A-Za-z0-9._-]+", "_", name).lstrip(".")[:64] or "unnamed"
    if clean != name:
        clean = f"{clean[:55]}-{hashlib.sha256(name.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"
    return clean + suffix


def _nearest_existing(path: Path) -> Path:
    for parent in [path, *path.parents]:
        if os.path.lexists(parent):
            return parent
    return Path(".")


def _check_parent_writable(path: Path, what: str) -> None:
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        raise OutputPathError(f"{what} {str(path)!r} cannot be created: {str(base)!r} is a file, not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise OutputPathError(f"{what} {str(path)!r} cannot be created: folder {str(base)!r} is not writable; "
                              "choose another path")


def check_output_file(path: str | Path, what: str = "output file") -> Path:
    """Fail now, before long work, if ``path`` cannot be written as a file."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{what} {str(path)!r} is a folder; give a file name")
    if path.exists() and not path.is_file():
        raise OutputPathError(f"{what} {str(path)!r} exists and is not a regular file; give another name")
    _check_parent_writable(path, what)
    return path


def check_output_dir(path: str | Path, what: str = "output folder") -> Path:
    """Fail now, before long work, if ``path`` cannot be used as a folder to write into."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{what} {str(path)!r} exists and is not a folder; give a folder path")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputPathError(f"{what} {str(path)!r} is not writable; choose another folder")
        return path
    _check_parent_writable(path, what)
    return path
