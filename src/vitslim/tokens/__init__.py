"""Token reduction without retraining: fewer tokens in the later blocks of a trained ViT.

    from vitslim import tokens
    tokens.apply(model, "tome", r=8)      # patch in place
    tokens.remove(model)                  # the original model again, bit for bit

Methods: ``tome`` (Token Merging, 2023), ``evit`` (EViT, 2022), ``ats`` (Adaptive Token
Sampling, 2022), ``mctf`` (Multi-criteria Token Fusion, 2024). Each patches a timm ViT-family
model's blocks (see ``vitslim.vit_parts``); class and distillation tokens are never merged or
dropped.
"""

from __future__ import annotations

import copy
import inspect
import math
import typing
from typing import Any, Callable

from torch import nn

from vitslim.datafile import check_type
from vitslim.errors import ConfigError

from vitslim.tokens.ats import apply_ats
from vitslim.tokens.common import remove, token_state
from vitslim.tokens.evit import apply_evit
from vitslim.tokens.mctf import apply_mctf
from vitslim.tokens.support import refuse_unsupported
from vitslim.tokens.tome import apply_tome

METHODS: dict[str, Callable[..., nn.Module]] = {"tome": apply_tome, "evit": apply_evit, "ats": apply_ats,
                                                "mctf": apply_mctf}

__all__ = ["apply", "check_params", "remove", "token_state", "METHODS", "apply_tome", "apply_evit", "apply_ats",
           "apply_mctf"]

# Ranges that do not depend on the model (r against a block's tokens and block indices are
# checked when the method is applied).
FRACTIONS = ("keep_rate", "budget")
NON_NEGATIVE = ("r", "blocks")


def check_params(method: str, params: dict[str, Any]) -> None:
    """Method name, knob names, types and model-independent ranges: a ``ConfigError`` naming
    the first wrong one (before any model is loaded)."""
    if method not in METHODS:
        raise ConfigError(f"unknown token reduction method {method!r}; choose one of {sorted(METHODS)}")
    hints = typing.get_type_hints(METHODS[method])
    knobs = [p for p in inspect.signature(METHODS[method]).parameters if p != "model"]
    unknown = sorted(str(k) for k in set(params) - set(knobs))
    if unknown:
        raise ConfigError(f"{method}: unknown knob(s) {unknown}; its knobs are {knobs}")
    for name, value in params.items():
        if name.startswith("tau_"):  # the same wording as apply_mctf's own check
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"{method}: {name} must be a finite number >= 0 (0 turns the criterion off), "
                                  f"got {value!r}")
            continue
        value = check_type(value, hints[name], f"{method}: {name}")
        if value is None:  # the method's default (e.g. blocks=None: 1/4, 1/2, 3/4 depth)
            continue
        values = value if isinstance(value, list) else [value]
        if name in FRACTIONS and not 0 < value <= 1:
            raise ConfigError(f"{method}: {name} must be in (0, 1], got {value}")
        negative = [i for i, v in enumerate(values) if v < 0]
        if name in NON_NEGATIVE and negative:
            raise ConfigError(f"{method}: {name} must be >= 0, got {values[negative[0]]} at block {negative[0]}"
                              if name == "r" else f"{method}: {name} must be >= 0, got {value}")


def apply(model: nn.Module, method: str, inplace: bool = True, **params: Any) -> nn.Module:
    """Patch ``model`` with a token-reduction ``method`` and its knobs (see each method's
    ``apply_*``); with ``inplace=False`` the original stays untouched and a patched copy is
    returned. Applying a second method without ``remove`` first is an error."""
    check_params(method, params)
    refuse_unsupported(model, method)
    return METHODS[method](model if inplace else copy.deepcopy(model), **params)
