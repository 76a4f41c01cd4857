"""One frozen config per token-reduction method, checked when it is built.

Ranges that depend on the model (``r`` against the tokens a block has, block indices against
its depth) are checked when the config is applied.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

from vitslim.datafile import check_type
from vitslim.errors import ConfigError

FRACTIONS = ("keep_rate", "budget")
NON_NEGATIVE = ("r", "blocks")


def _validate(config: Any) -> None:
    """Types (lists become tuples) and model-independent ranges: a ``ConfigError`` naming the
    method and the first wrong knob."""
    method = config.method
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        name, value = f.name, getattr(config, f.name)
        if name.startswith("tau_"):
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"{method}: {name} must be a finite number >= 0 (0 turns the criterion off), "
                                  f"got {value!r}")
            object.__setattr__(config, name, float(value))
            continue
        value = check_type(value, hints[name], f"{method}: {name}")
        object.__setattr__(config, name, value)
        if value is None:  # the method's default (e.g. blocks=None: 1/4, 1/2, 3/4 depth)
            continue
        values = value if isinstance(value, tuple) else [value]
        if name in FRACTIONS and not 0 < value <= 1:
            raise ConfigError(f"{method}: {name} must be in (0, 1], got {value}")
        negative = [i for i, v in enumerate(values) if v < 0]
        if name in NON_NEGATIVE and negative:
            raise ConfigError(f"{method}: {name} must be >= 0, got {values[negative[0]]} at block {negative[0]}"
                              if name == "r" else f"{method}: {name} must be >= 0, got {list(values)}")


class _TokenConfig:
    """Validation and construction from plain data, shared by the token configs."""

    method: ClassVar[str]

    def __post_init__(self) -> None:
        _validate(self)

    @classmethod
    def from_dict(cls, knobs: dict[str, Any]) -> Any:
        """A config from knob names and values (CLI, YAML/JSON); unknown knobs are an error."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(str(k) for k in set(knobs) - set(names))
        if unknown:
            raise ConfigError(f"{cls.method}: unknown knob(s) {unknown}; its knobs are {names}")
        return cls(**knobs)


@dataclass(frozen=True)
class ToMeConfig(_TokenConfig):
    """ToMe (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023): merge ``r``
    tokens per block (``r[i]`` in block ``i``), with proportional attention (``prop_attn``)."""

    method: ClassVar[str] = "tome"
    r: int | tuple[int, ...] = 8
    prop_attn: bool = True


@dataclass(frozen=True)
class EViTConfig(_TokenConfig):
    """EViT (Liang et al., "Not All Patches are What You Need: Expediting Vision Transformers
    via Token Reorganizations", ICLR 2022): keep the ``keep_rate`` most attended tokens in
    ``blocks`` (default 1/4, 1/2, 3/4 depth) and fuse the rest."""

    method: ClassVar[str] = "evit"
    keep_rate: float = 0.7
    blocks: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ATSConfig(_TokenConfig):
    """ATS (Fayyaz et al., "Adaptive Token Sampling for Efficient Vision Transformers", ECCV
    2022): at each of ``blocks``, sample at most ``budget`` × the tokens present."""

    method: ClassVar[str] = "ats"
    budget: float = 0.5
    blocks: tuple[int, ...] | None = None


@dataclass(frozen=True)
class MCTFConfig(_TokenConfig):
    """MCTF (Lee et al., "Multi-criteria Token Fusion with One-step-ahead Attention for
    Efficient Vision Transformers", CVPR 2024): fuse ``r`` tokens per block (``r[i]`` in block
    ``i``); ``tau_*`` (>= 0, 0 turns a criterion off) temper the similarity, informativeness
    and size criteria; ``one_step_ahead`` scores on the block's own attention; ``bidirectional``
    matches A→B then B→A (False: ToMe's one-way step)."""

    method: ClassVar[str] = "mctf"
    r: int | tuple[int, ...] = 8
    tau_sim: float = 1.0
    tau_info: float = 20.0
    tau_size: float = 40.0
    one_step_ahead: bool = True
    bidirectional: bool = True


TokenConfig = ToMeConfig | EViTConfig | ATSConfig | MCTFConfig
TOKEN_CONFIGS = (ToMeConfig, EViTConfig, ATSConfig, MCTFConfig)


def token_config(method: str, **knobs: Any) -> TokenConfig:
    """The config of a method named in text (the CLI's ``--method``): ``token_config("tome", r=8)``."""
    by_name = {c.method: c for c in TOKEN_CONFIGS}
    if method not in by_name:
        raise ConfigError(f"unknown token reduction method {method!r}; choose one of {sorted(by_name)}")
    return by_name[method].from_dict(knobs)
