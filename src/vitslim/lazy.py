"""Packages whose API is imported on first use (PEP 562), so that ``import vitslim`` and the
command line's ``--help`` do not load PyTorch."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_api(package: str, api: dict[str, tuple[str, ...]]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``, whose public names ``api`` lists by the
    module defining them. The first use of any of them imports them all, as an eager
    ``__init__`` would (importing a family also registers its configs with ``vitslim.registry``)."""
    names = {name for exported in api.values() for name in exported}

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace = vars(sys.modules[package])
        for module, exported in api.items():
            defining = importlib.import_module(module)
            namespace.update({n: getattr(defining, n) for n in exported})
        return namespace[name]

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *names})

    return __getattr__, __dir__
