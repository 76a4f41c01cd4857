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

from torch import nn

from vitslim import registry
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
