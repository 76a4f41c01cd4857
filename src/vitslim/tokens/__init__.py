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
from typing import Any, Callable

from torch import nn

from vitslim.tokens.ats import apply_ats
from vitslim.tokens.common import remove, token_state
from vitslim.tokens.evit import apply_evit
from vitslim.tokens.mctf import apply_mctf
from vitslim.tokens.tome import apply_tome

METHODS: dict[str, Callable[..., nn.Module]] = {"tome": apply_tome, "evit": apply_evit, "ats": apply_ats,
                                                "mctf": apply_mctf}

__all__ = ["apply", "remove", "token_state", "METHODS", "apply_tome", "apply_evit", "apply_ats", "apply_mctf"]


def apply(model: nn.Module, method: str, inplace: bool = True, **params: Any) -> nn.Module:
    """Patch ``model`` with a token-reduction ``method`` and its knobs (see each method's
    ``apply_*``); with ``inplace=False`` the original stays untouched and a patched copy is
    returned. Applying a second method without ``remove`` first is an error."""
    if method not in METHODS:
        raise ValueError(f"unknown token reduction method {method!r}; choose one of {sorted(METHODS)}")
    signature = inspect.signature(METHODS[method])
    unknown = sorted(set(params) - set(signature.parameters) - {"model"})
    if unknown:
        knobs = [p for p in signature.parameters if p != "model"]
        raise ValueError(f"{method}: unknown knob(s) {unknown}; its knobs are {knobs}")
    return METHODS[method](model if inplace else copy.deepcopy(model), **params)
