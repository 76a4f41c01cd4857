"""Token reduction without retraining: fewer tokens in the later blocks of a trained ViT.

    from vitslim import tokens
    tokens.reduce_tokens_(model, tokens.ToMeConfig(r=8))   # patch in place
    tokens.remove(model)                                   # the original model again, bit for bit

Methods, one frozen config each: ``ToMeConfig`` (Token Merging, 2023), ``EViTConfig`` (EViT,
2022), ``ATSConfig`` (Adaptive Token Sampling, 2022), ``MCTFConfig`` (Multi-criteria Token
Fusion, 2024). Each patches a timm ViT-family model's blocks (see ``vitslim.vit_parts``); class
and distillation tokens are never merged or dropped.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from torch import nn

from vitslim import registry
from vitslim.deprecation import warn_deprecated
from vitslim.errors import ConfigError
from vitslim.tokens.ats import ats_
from vitslim.tokens.common import remove, token_state
from vitslim.tokens.config import (
    TOKEN_CONFIGS,
    ATSConfig,
    EViTConfig,
    MCTFConfig,
    TokenConfig,
    ToMeConfig,
    token_config,
)
from vitslim.tokens.evit import evit_
from vitslim.tokens.mctf import mctf_
from vitslim.tokens.support import refuse_unsupported
from vitslim.tokens.tome import tome_

__all__ = [
    "TOKEN_CONFIGS",
    "ATSConfig",
    "EViTConfig",
    "MCTFConfig",
    "ToMeConfig",
    "TokenConfig",
    "ats_",
    "evit_",
    "mctf_",
    "reduce_tokens_",
    "remove",
    "token_config",
    "token_state",
    "tome_",
]


def reduce_tokens_(model: nn.Module, config: TokenConfig) -> nn.Module:
    """Patch ``model`` in place with the token-reduction method ``config`` describes and return
    it. Applying a second method without ``remove`` first is an error."""
    if not isinstance(config, TOKEN_CONFIGS):
        raise ConfigError(f"reduce_tokens_ takes one of {[c.__name__ for c in TOKEN_CONFIGS]}, "
                          f"got {type(config).__name__}")
    refuse_unsupported(model, config.method)
    return registry.apply_(model, config)


def apply(model: nn.Module, method: str, inplace: bool = True, **params: Any) -> nn.Module:
    """Deprecated: ``reduce_tokens_(model, token_config(method, **params))``."""
    warn_deprecated("vitslim.tokens.apply(model, method, **knobs)",
                    "vitslim.tokens.reduce_tokens_(model, ToMeConfig(...)) (or EViTConfig, ATSConfig, MCTFConfig)")
    return reduce_tokens_(model if inplace else copy.deepcopy(model), token_config(method, **params))


def check_params(method: str, params: dict[str, Any]) -> None:
    """Deprecated: building the config checks its knobs (``token_config(method, **params)``)."""
    warn_deprecated("vitslim.tokens.check_params", "vitslim.tokens.token_config(method, **knobs)")
    token_config(method, **params)


_OLD_VERBS = {"apply_tome": ToMeConfig, "apply_evit": EViTConfig, "apply_ats": ATSConfig, "apply_mctf": MCTFConfig}


def __getattr__(name: str) -> Any:
    """The old per-method functions (``apply_tome(model, r=8)``), with a deprecation warning."""
    if name == "METHODS":
        warn_deprecated("vitslim.tokens.METHODS", "vitslim.tokens.TOKEN_CONFIGS")
        return {c.method: _old_verb(c) for c in TOKEN_CONFIGS}
    if name in _OLD_VERBS:
        new = f"vitslim.tokens.reduce_tokens_(model, {_OLD_VERBS[name].__name__}(...))"
        warn_deprecated(f"vitslim.tokens.{name}", new)
        return _old_verb(_OLD_VERBS[name])
    raise AttributeError(f"module 'vitslim.tokens' has no attribute {name!r}")


def _old_verb(config_type: type) -> Any:
    names = [f.name for f in dataclasses.fields(config_type)]

    def apply_method(model: nn.Module, *args: Any, **knobs: Any) -> nn.Module:
        return reduce_tokens_(model, config_type(**dict(zip(names, args)), **knobs))

    return apply_method
