"""Where results go: ``--out`` never replaces what vitslim did not write, and one run at a time.

A path may be written when it does not exist, is an empty folder, or holds what vitslim wrote:
an artifact (``vitslim.json`` folder, or an ``.onnx`` file carrying a vitslim contract), a
folder of an earlier vitslim format, or a results folder with vitslim's marker file
``.vitslim-output``. Anything else is refused with one line, before any work starts, unless
the user passes ``--force``. A results folder is held with an exclusive lock on its marker for
the whole run, so a second run into it stops at once with an "in use" error.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from vitslim.artifact.store import FORCE_HINT, MARKER, claim_artifact_path, written_by_vitslim
from vitslim.errors import OutputPathError
from vitslim.output import check_output_dir

__all__ = ["MARKER", "claim_artifact_path", "claim_results_dir", "mark_as_ours", "results_dir", "written_by_vitslim"]
_HELD: set[Path] = set()  # results folders this process holds (a holder may claim its own again)


def claim_results_dir(path: str | Path, force: bool = False, what: str = "--out") -> Path:
    """Fail now unless ``path`` may receive a run's results: absent, empty, or a results folder
    vitslim made (its marker file), or ``force``."""
    path = check_output_dir(path, what)
    if path.is_dir() and any(path.iterdir()) and not (path / MARKER).is_file() and not force:
        raise OutputPathError(f"{what} {str(path)!r} holds files vitslim did not write there (no {MARKER} marker); "
                              f"{FORCE_HINT} (files of the same names are replaced)")
    return path


def mark_as_ours(path: Path) -> Path:
    """Create the folder ``path`` with vitslim's marker (e.g. for a run's resumable state), so
    a rerun may write into it."""
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).touch()
    return path


@contextlib.contextmanager
def results_dir(path: str | Path, force: bool = False, what: str = "--out") -> Iterator[Path]:
    """Claim ``path`` (``claim_results_dir``), create it with vitslim's marker, and hold it for
    the duration: another run that claims it meanwhile gets an "in use" ``OutputPathError``.
    Within one run, holding it again (the CLI, then ``compress``) is allowed."""
    if Path(path).resolve() in _HELD:
        yield Path(path)
        return
    path = claim_results_dir(path, force, what)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / MARKER, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise OutputPathError(f"cannot write {what} {str(path)!r}: {err.strerror}; choose another path") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputPathError(f"{what} {str(path)!r} is in use by another vitslim run; wait for it to finish "
                                  "or choose another folder") from None
        if not os.fstat(fd).st_size:  # a new marker says what it is; an old one is left as it is
            os.write(fd, b"This folder holds results written by vitslim; vitslim may replace them.\n")
        _HELD.add(path.resolve())
        yield path
    finally:
        _HELD.discard(path.resolve())
        os.close(fd)  # releases the lock
