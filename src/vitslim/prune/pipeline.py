"""``prune_(model, config, calib_images)``: structured pruning of a ViT, in place."""

from __future__ import annotations

import copy
import time
import warnings

import torch
from torch import nn

from vitslim.errors import ConfigError
from vitslim.models import vit_parts
from vitslim.prune.allocate import allocate, model_macs
from vitslim.prune.compensate import compensate_
from vitslim.prune.config import PruneConfig
from vitslim.prune.importance import compensated_scores, importance_scores
from vitslim.prune.surgery import SHAPES_ATTR, apply_plan, check_prunable
from vitslim.registry import register


def _check_plain(model: nn.Module) -> None:
    if any(hasattr(m, "quant_sites") for m in model.modules()) or hasattr(model, "_vitslim_tokens"):
        raise ConfigError("prune the FP32 model first, then reduce tokens or quantize "
                          "(this model is already quantized or token-reduced)")


@register(PruneConfig, step="prune", stage=0, calibrated=True)
def prune_(model: nn.Module, config: PruneConfig, calib_images: torch.Tensor) -> nn.Module:
    """Remove attention heads, MLP channels and (optionally) whole blocks from a timm ViT,
    in place, keeping ``config.macs`` of its MACs; returns the model, now a smaller dense model.

    Every unit is scored on the unlabeled ``calib_images`` ((N, 3, H, W), preprocessed) against
    the model's own outputs (``config.importance``), units are removed globally by least score
    per MAC (NViT, "Global Vision Transformer Pruning with Hessian-Aware Saliency", Yang et al.
    2023; with ``refit_aware``, scored by what they cost after the refit: greedy OBS per layer as
    in ZipLM, Kurtić et al. 2023), the shapes change for real (``vitslim.prune.surgery``), and the layers consuming the
    removed units are refit by least squares (Kwon et al., "A Fast Post-Training Pruning
    Framework for Transformers", 2022). The shapes and config are kept on
    ``model.vitslim_prune`` for ``vitslim.save``.
    """
    if not isinstance(config, PruneConfig):
        raise ConfigError(f"prune_ takes a PruneConfig (e.g. PruneConfig(macs=0.7)), got {type(config).__name__}")
    parts = vit_parts(model)  # names unsupported models before anything changes
    for bp in parts.blocks:
        check_prunable(bp)
    _check_plain(model)
    if (config.importance != "magnitude" or config.compensate) and len(calib_images) < 2:
        raise ConfigError(f"importance {config.importance!r} with compensate={config.compensate} needs calibration "
                          f"images (got {len(calib_images)}); give 32 or more")
    if len(calib_images) < 16:
        warnings.warn(f"only {len(calib_images)} calibration images; the refits overfit few images: give 128 or more",
                      stacklevel=2)
    start = time.perf_counter()
    model.eval()
    before = model_macs(parts)
    teacher = copy.deepcopy(model) if config.compensate else None
    scores = importance_scores(model, calib_images, config.importance, config.batch_size, config.probes)
    if config.refit_aware and config.compensate:  # costs after a refit only hold if the refit is made
        scores = compensated_scores(model, parts, calib_images, scores, config.batch_size)
    plan = allocate(parts, scores, config)
    apply_plan(model, plan)
    if teacher is not None:
        compensate_(model, teacher, calib_images, plan, mirrors=config.mirror_refit)
    info = getattr(model, SHAPES_ATTR)
    info["config"] = config.to_dict()
    info["macs_kept"] = model_macs(vit_parts(model)) / before
    model.vitslim_prune_seconds = time.perf_counter() - start
    return model
