"""Deprecated: the CLI's shared workflows are in ``vitslim.workflows`` (this alias goes in the next release)."""

from __future__ import annotations

from typing import Any

from vitslim import workflows
from vitslim.deprecation import warn_deprecated

_RENAMED = {"evaluate_cli": "evaluate_on_folder", "bench_cli": "bench_side_by_side",
            "_preprocessing": "preprocessing_for"}


def __getattr__(name: str) -> Any:
    new = _RENAMED.get(name, name)
    if new.startswith("__") or not hasattr(workflows, new):
        raise AttributeError(f"module 'vitslim.api' has no attribute {name!r}")
    warn_deprecated(f"vitslim.api.{name}", f"vitslim.workflows.{new}")
    return getattr(workflows, new)
