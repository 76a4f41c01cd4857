"""Building an artifact: a recipe applied to a model, saved ready to deploy (``vitslim.save``).

A recipe with an ``export`` step gives one ``.onnx`` file: for ONNX Runtime (int8 kernels when
quantized), or, when the export step names OpenVINO, the portable Q/DQ graph that OpenVINO runs
at the precision hint the step records. Any other recipe gives a folder that ``vitslim.load``
rebuilds (see ``vitslim.artifact``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from vitslim.artifact import ModelSource, save
from vitslim.artifact.store import claim_artifact_path
from vitslim.errors import ConfigError
from vitslim.export.config import export_step
from vitslim.recipes import Recipe, apply_recipe


def artifact_name(recipe: Recipe, stem: str = "model") -> str:
    """``model.onnx`` for exported recipes, the folder ``model`` otherwise."""
    return f"{stem}.onnx" if recipe.exports else stem


def check_out_path(out: str | Path, recipe: Recipe) -> Path:
    """``out`` must say the format the recipe makes: NAME.onnx when it exports, a folder otherwise."""
    out = Path(out)
    if recipe.exports and out.suffix != ".onnx":
        raise ConfigError(f"recipe {recipe.name!r} exports to ONNX: give --out NAME.onnx (got {str(out)!r})")
    if not recipe.exports and out.suffix == ".onnx":
        raise ConfigError(f"recipe {recipe.name!r} has no export step, so it makes a PyTorch model saved as a "
                          f"folder: give --out DIR (got {str(out)!r}), or add `- export: {{format: onnx}}`")
    return out


def build_artifact(model: nn.Module, recipe: Recipe, calib: torch.Tensor, out: str | Path,
                   source: ModelSource, calibration: dict | None = None, key: str = "",
                   applied: nn.Module | None = None, force: bool = False) -> Path:
    """Apply ``recipe`` to a copy of ``model`` (calibrating on ``calib``) and save the result at
    ``out`` (replacing only what vitslim wrote, unless ``force``): the one code path behind
    ``vitslim apply`` and every candidate of ``vitslim compress``. ``applied``: the recipe's
    steps already applied to ``model`` (one build saved for several runtimes)."""
    out = claim_artifact_path(check_out_path(out, recipe), force)
    compressed = applied if applied is not None else apply_recipe(model, recipe, calib)
    ort_kernels = export_step(recipe.steps).runtime == "onnxruntime"
    return save(compressed, out, source, recipe, calibration, key, ort_kernels=ort_kernels, force=force)
