"""Apply a recipe's steps to a model: each config goes to its method family's verb."""

from __future__ import annotations

import copy

import torch
from torch import nn

from vitslim import registry
from vitslim.compress.recipes import Recipe


def apply_recipe(model: nn.Module, recipe: Recipe, calib: torch.Tensor) -> nn.Module:
    """A compressed PyTorch copy of ``model`` after the recipe's model-changing steps (the
    original is untouched). The export step is the artifact's format: see
    ``vitslim.deploy.build_artifact``, which saves what this returns."""
    out: nn.Module = copy.deepcopy(model).eval()
    for config in recipe.steps:
        out = registry.apply_(out, config, calib)
    return out
