"""Mixed precision: per-block bit widths chosen from measured sensitivity under a bit budget.

After MPTQ-ViT (Tai et al., "MPTQ-ViT: Mixed-Precision Post-Training Quantization for Vision
Transformer", 2024), whose Pareto-frontier-based mixed precision picks, for a size budget, the
bit widths that minimise the summed quantization sensitivity of the layers. LRP-QViT (Ranjan &
Savakis, "LRP-QViT: Mixed-Precision Vision Transformer Quantization via Layer-wise Relevance
Propagation", 2024) ranks layers by relevance propagated from the output instead; vitslim does
not implement LRP: it measures each block's sensitivity directly, which costs a few forward
passes over the calibration images and needs no relevance rules per layer type.

Granularity is the transformer block (its weights and quantized activation sites share one W=A
bit width), and the sensitivity of block b at c bits is the feature noise-to-signal ratio
‖f_q − f‖² / ‖f‖² on the calibration images with only block b quantized (the others in float).
Noise from different blocks adds roughly independently, so the allocation minimises the sum
exactly (a dynamic program over the blocks: the Pareto frontier at the asked budget).
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import torch
from torch import nn

from vitslim.errors import ConfigError
from vitslim.models import vit_parts
from vitslim.progress import progress_bar
from vitslim.quant.config import VALID_BITS, QuantConfig, preset
from vitslim.quant.modules import set_mode
from vitslim.quant.ptq import quantize_


@torch.no_grad()
def block_sensitivity(model: nn.Module, calib_images: torch.Tensor, config: QuantConfig,
                      candidates: tuple[int, ...], batch_size: int = 16) -> torch.Tensor:
    """(blocks, candidates) feature noise-to-signal ratio with one block quantized at each bit width.

    One calibration per bit width (statistics are observed on the float model, so a block's
    quantizers do not depend on the others), then one pass per block with the others switched
    off. Reconstruction is skipped here: it is for the final model."""
    model.eval()
    batches = calib_images.split(batch_size)
    reference = [model.forward_features(b) for b in batches]
    num_blocks = len(vit_parts(model).blocks)
    sensitivity = torch.zeros(num_blocks, len(candidates))
    for j, bits in enumerate(candidates):
        uniform = replace(config, block_bits=(bits,) * num_blocks, reconstruction_iters=0, quantize_head=False)
        qmodel = quantize_(copy.deepcopy(model), uniform, calib_images)
        blocks = [bp.block for bp in vit_parts(qmodel).blocks]
        for i in progress_bar(range(num_blocks), f"sensitivity at {bits} bits"):
            set_mode(qmodel, "off")
            set_mode(blocks[i], "quant")
            noise = sum(((qmodel.forward_features(b) - r) ** 2).sum() for b, r in zip(batches, reference))
            sensitivity[i, j] = noise / sum((r**2).sum() for r in reference)
    return sensitivity


def _check_budget(average_bits: float, candidates: tuple[int, ...]) -> None:
    if not math.isfinite(average_bits):
        raise ConfigError(f"average_bits={average_bits} is not a finite number of bits")
    if average_bits < min(candidates):
        raise ConfigError(f"average_bits={average_bits} is below the smallest candidate ({min(candidates)} bits); "
                          f"raise it or add a smaller bit width to the candidates {candidates}")


def allocate_bits(sensitivity: torch.Tensor, candidates: tuple[int, ...], average_bits: float) -> tuple[int, ...]:
    """Per-block bits from ``candidates`` whose mean is at most ``average_bits`` and whose summed
    ``sensitivity`` (blocks × candidates) is the smallest: exact, by dynamic programming over
    the blocks with the total bits spent as the state."""
    _check_budget(average_bits, candidates)
    num_blocks = len(sensitivity)
    budget = int(average_bits * num_blocks + 1e-9)
    best = {0: (0.0, ())}  # total bits spent -> (summed sensitivity, bits so far)
    for i in range(num_blocks):
        step: dict[int, tuple[float, tuple[int, ...]]] = {}
        for spent, (cost, chosen) in best.items():
            for j, bits in enumerate(candidates):
                total, new_cost = spent + bits, cost + float(sensitivity[i, j])
                if total <= budget and (total not in step or new_cost < step[total][0]):
                    step[total] = (new_cost, (*chosen, bits))
        best = step
    return min(best.values())[1]


def mixed_precision_config(model: nn.Module, calib_images: torch.Tensor, config: QuantConfig | str,
                           average_bits: float, candidates: tuple[int, ...] = (4, 5, 6, 8)) -> QuantConfig:
    """``config`` with per-block bits (``block_bits``) chosen for ``model``: the allocation of
    ``candidates`` averaging at most ``average_bits`` per block with the least summed measured
    sensitivity (MPTQ-ViT-style Pareto-frontier mixed precision, 2024). Quantize with it:
    ``quantize_(model, mixed_precision_config(model, calib_images, "w4a4", 6), calib_images)``."""
    config = preset(config) if isinstance(config, str) else config
    bad = [b for b in candidates if b not in VALID_BITS]
    if bad or not candidates:
        raise ConfigError(f"candidate bit widths {bad or candidates} not supported; choose from {VALID_BITS}")
    candidates = tuple(sorted(set(candidates)))
    _check_budget(average_bits, candidates)
    sensitivity = block_sensitivity(model, calib_images, config, candidates)
    return replace(config, block_bits=allocate_bits(sensitivity, candidates, average_bits))
