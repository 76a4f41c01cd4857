"""One wording for the old Python API: it keeps working for one release, with a warning."""

from __future__ import annotations

import warnings


def warn_deprecated(old: str, new: str) -> None:
    """A ``DeprecationWarning`` pointing the caller's line from ``old`` to ``new``."""
    warnings.warn(f"{old} is deprecated and will be removed in the next vitslim release; use {new}",
                  DeprecationWarning, stacklevel=3)
