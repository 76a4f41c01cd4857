"""Apply a recipe's steps to a model: each step kind calls its method family's public API."""

from __future__ import annotations

import copy

import torch
from torch import nn

from vitslim.compress.recipes import Recipe


def _prune(model: nn.Module, knobs: dict, calib: torch.Tensor) -> nn.Module:
    from vitslim import prune

    return prune.prune_(model, calib, prune.PruneConfig(**knobs))


def _tokens(model: nn.Module, knobs: dict, calib: torch.Tensor) -> nn.Module:
    from vitslim import tokens

    params = {k: v for k, v in knobs.items() if k != "method"}
    return tokens.apply(model, knobs["method"], **params)


def _dtype(model: nn.Module, knobs: dict, calib: torch.Tensor) -> nn.Module:
    from vitslim.dtype import DTYPES

    return model.to(DTYPES[knobs.get("dtype", "bfloat16")])


def _quantize(model: nn.Module, knobs: dict, calib: torch.Tensor) -> nn.Module:
    from vitslim import quant

    config = quant.QuantConfig.from_dict(knobs["config"]) if "config" in knobs else quant.preset(knobs["preset"])
    n = int(knobs.get("calib_images", len(calib)))
    return quant.quantize(model, calib[:n], config)


STEP_FUNCTIONS = {"prune": _prune, "tokens": _tokens, "dtype": _dtype, "quantize": _quantize}


def apply_recipe(model: nn.Module, recipe: Recipe, calib: torch.Tensor) -> nn.Module:
    """A compressed PyTorch copy of ``model`` after the recipe's model-changing steps (the
    original is untouched). The export step is the artifact's format: see
    ``vitslim.deploy.build_artifact``, which saves what this returns."""
    out: nn.Module = copy.deepcopy(model).eval()
    for step in recipe.steps:
        if step.kind in STEP_FUNCTIONS:
            out = STEP_FUNCTIONS[step.kind](out, step.knobs, calib)
    return out
