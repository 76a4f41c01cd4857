"""The floating-point formats a model can run in, by the names the CLI and recipes use."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vitslim.datafile import brief
from vitslim.errors import ConfigError
from vitslim.registry import register

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``; an unknown name is a ``ConfigError`` listing the valid ones."""
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


@dataclass(frozen=True)
class DtypeConfig:
    """Run the whole model in ``dtype`` (weights and activations), e.g. bfloat16 on CPUs with
    native bfloat16 (AVX-512 BF16, AMX)."""

    dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if not isinstance(self.dtype, str) or self.dtype not in DTYPES:
            raise ConfigError(f"dtype {brief(self.dtype)} is not one of {list(DTYPES)}")


@register(DtypeConfig, step="dtype", stage=2)
def to_dtype_(model: nn.Module, config: DtypeConfig) -> nn.Module:
    """Cast ``model`` to ``config.dtype``, in place."""
    return model.to(DTYPES[config.dtype])
