"""One mechanism for every method family: a frozen config type names its in-place verb.

    from vitslim import registry, tokens, quant
    registry.apply_(model, tokens.ToMeConfig(r=8))              # = tokens.reduce_tokens_(model, cfg)
    registry.apply_(model, quant.preset("w8a8"), calib_images)  # = quant.quantize_(model, cfg, calib)

Each family registers its configs next to its verb (``@register(ToMeConfig, step="tokens", ...)``);
a recipe is an ordered list of registered configs. ``step`` is the key a config is written
under in recipe files (``- tokens: {method: tome, r: 8}``), ``method`` tells configs that
share a key apart, and ``stage`` is where in a recipe it may stand.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vitslim.datafile import brief, check_fields, check_mapping
from vitslim.errors import ConfigError

# Recipes run these stages in order: each consumes what the one before produces (tokens are
# reduced in the PyTorch model, a model cannot be quantized after it has been exported).
STAGES = ("pruning", "token reduction", "numeric format (dtype or quantize)", "export")

Verb = Callable[..., nn.Module]  # verb(model, config) or, when calibrated, verb(model, config, calib)


@dataclass(frozen=True)
class Method:
    """How one config type is applied and written down."""

    config_type: type
    verb: Verb | None  # None: the config chooses the artifact's format, it does not change the model
    step: str
    stage: int
    method: str | None = None  # the ``method:`` knob that selects this config among those of its step
    calibrated: bool = False  # the verb takes calibration images
    to_knobs: Callable[[Any], dict] | None = None  # default: the config's non-default fields
    from_knobs: Callable[[dict], Any] | None = None  # default: ``config_type(**knobs)``, names checked


_METHODS: dict[type, Method] = {}


def register(config_type: type, *, step: str, stage: int, method: str | None = None, calibrated: bool = False,
             to_knobs: Callable[[Any], dict] | None = None,
             from_knobs: Callable[[dict], Any] | None = None) -> Callable[[Verb | None], Verb | None]:
    """Decorate a family's verb to make it the one applied for ``config_type``."""

    def decorate(verb: Verb | None) -> Verb | None:
        _METHODS[config_type] = Method(config_type, verb, step, stage, method, calibrated, to_knobs, from_knobs)
        return verb

    return decorate


def method_of(config: Any) -> Method:
    """The registration of ``config``'s type; a ``ConfigError`` for anything else."""
    method = _METHODS.get(type(config))
    if method is None:
        known = sorted(t.__name__ for t in _METHODS)
        raise ConfigError(f"{type(config).__name__} is not a vitslim method config; known configs are {known}")
    return method


def apply_(model: nn.Module, config: Any, calib: torch.Tensor | None = None) -> nn.Module:
    """Apply ``config``'s method to ``model`` in place (calibrating on ``calib`` where the
    method needs images) and return the model."""
    method = method_of(config)
    if method.verb is None:
        return model
    if method.calibrated:
        return method.verb(model, config, calib)
    return method.verb(model, config)


def step_kinds() -> list[str]:
    """The step keys recipe files may use, in stage order."""
    return list(dict.fromkeys(m.step for m in sorted(_METHODS.values(), key=lambda m: m.stage)))


def non_default_fields(config: Any) -> dict:
    """The fields a config file needs to rebuild ``config``: its first field (the amount of
    compression, so a recipe reads as what it does) and every field not at its default."""
    fields = dataclasses.fields(config)
    knobs = {}
    for i, f in enumerate(fields):
        value = getattr(config, f.name)
        if i == 0 or f.default is dataclasses.MISSING or value != f.default:
            knobs[f.name] = list(value) if isinstance(value, tuple) else value
    return knobs


def to_step(config: Any) -> dict:
    """``config`` in its recipe-file form, e.g. ``{"tokens": {"method": "tome", "r": 8}}``."""
    method = method_of(config)
    knobs = (method.to_knobs or non_default_fields)(config)
    return {method.step: {"method": method.method, **knobs} if method.method else knobs}


def from_step(kind: Any, knobs: Any) -> Any:
    """The config a recipe file's step ``{kind: knobs}`` describes; a ``ConfigError`` naming the
    first wrong key or value otherwise."""
    kinds = step_kinds()
    if not isinstance(kind, str) or kind not in kinds:
        raise ConfigError(f"unknown step {brief(kind)}; valid steps are {sorted(kinds)}")
    knobs = dict(check_mapping(knobs or {}, f"step {kind!r}"))
    candidates = [m for m in _METHODS.values() if m.step == kind]
    if candidates[0].method is not None:  # several configs share this step: ``method`` chooses
        names = sorted(m.method for m in candidates)
        chosen = knobs.pop("method", None)
        if not isinstance(chosen, str) or chosen not in names:
            raise ConfigError(f"step {kind!r}: method {brief(chosen)} is not one of {names}")
        candidates = [m for m in candidates if m.method == chosen]
    method = candidates[0]
    try:
        return method.from_knobs(knobs) if method.from_knobs else _from_fields(method, knobs)
    except ConfigError as err:
        raise ConfigError(f"step {kind!r}: {err}") from None


def _from_fields(method: Method, knobs: dict) -> Any:
    names = [f.name for f in dataclasses.fields(method.config_type)]
    unknown = sorted(str(k) for k in set(knobs) - set(names))
    if unknown:
        valid = sorted([*names, "method"] if method.method else names)
        raise ConfigError(f"unknown knob(s) {brief(unknown)}; valid knobs are {valid}")
    required = [f.name for f in dataclasses.fields(method.config_type) if f.name not in knobs
                and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if required:
        raise ConfigError(f"missing knob(s) {required}; e.g. {{{required[0]}: ...}}")
    return method.config_type(**check_fields(method.config_type, knobs, ""))  # heads: 'no' is not True
