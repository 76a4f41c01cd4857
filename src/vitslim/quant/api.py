"""``quantize(model, calib_images, config)``: post-training quantization of a ViT."""

from __future__ import annotations

import copy
import time
import warnings

import torch
from torch import nn

from vitslim.models import vit_parts
from vitslim.progress import progress_bar
from vitslim.quant.config import QuantConfig, preset
from vitslim.quant.layernorm_reparam import reparameterize
from vitslim.quant.modules import QuantLinear, install_block, make_quantizer, quant_linears, quantizers, set_mode
from vitslim.quant.quantizers import WeightQuantizer

CONFIG_ATTR = "vitslim_quant_config"


def _batches(images: torch.Tensor, batch_size: int):
    return [images[i : i + batch_size] for i in range(0, len(images), batch_size)]


@torch.no_grad()
def _run(model: nn.Module, images: torch.Tensor, batch_size: int, what: str) -> None:
    for batch in progress_bar(_batches(images, batch_size), what):
        model.forward_features(batch)


@torch.no_grad()
def _post_ln_ranges(model: nn.Module, images: torch.Tensor, batch_size: int) -> dict[nn.Module, list]:
    """Per-channel min/max of every block's two LayerNorm outputs (FP32 model)."""
    ranges: dict[nn.Module, list] = {}

    def hook(module, _inputs, out):
        flat = out.reshape(-1, out.shape[-1])
        lo, hi = flat.amin(0), flat.amax(0)
        if module in ranges:
            ranges[module] = [torch.minimum(ranges[module][0], lo), torch.maximum(ranges[module][1], hi)]
        else:
            ranges[module] = [lo, hi]

    parts = vit_parts(model)
    handles = [n.register_forward_hook(hook) for bp in parts.blocks for n in (bp.norm1, bp.norm2)]
    _run(model, images, batch_size, "LayerNorm ranges")
    for h in handles:
        h.remove()
    return ranges


def quantize(
    model: nn.Module,
    calib_images: torch.Tensor,
    config: QuantConfig | str = "w8a8",
    inplace: bool = False,
    batch_size: int = 16,
) -> nn.Module:
    """Post-training quantization (simulated, fake-quant) of a timm ViT.

    Calibrates on ``calib_images`` (a (N, 3, H, W) tensor of preprocessed images), in order:
    LayerNorm reparameterization (RepQ-ViT 2023 / I&S-ViT 2023) if asked, activation
    statistics, activation quantizers (uniform, log2, SULQ or AdaLog), weights (round to
    nearest, or GPTQ 2022), then block reconstruction (I&S-ViT/BRECQ-style) if asked.
    Returns the quantized model (a copy unless ``inplace``), with its config attached.
    """
    config = preset(config) if isinstance(config, str) else config
    if len(calib_images) == 0:
        raise ValueError("quantize needs at least one calibration image")
    if len(calib_images) < 8:
        warnings.warn(f"only {len(calib_images)} calibration images; 32 or more give stabler ranges")
    qmodel = model if inplace else copy.deepcopy(model)
    qmodel.eval()
    parts = vit_parts(qmodel)  # names unsupported block types before anything changes
    start = time.perf_counter()
    ln_ranges = _post_ln_ranges(qmodel, calib_images, batch_size) if config.ln_reparam else {}
    fp_model = copy.deepcopy(qmodel) if config.reconstruction_iters else None
    for bp in parts.blocks:
        if config.ln_reparam:
            bits = config.post_ln.bits
            reparameterize(bp.norm1, bp.qkv, *ln_ranges[bp.norm1], bits)
            reparameterize(bp.norm2, bp.fc1, *ln_ranges[bp.norm2], bits)
    install(qmodel, config)
    set_mode(qmodel, "observe")
    hessians = _collect_hessians(qmodel) if config.weight_method == "gptq" else None
    _run(qmodel, calib_images, batch_size, "calibration statistics")
    for q in quantizers(qmodel):
        if not isinstance(q, WeightQuantizer):  # weights are calibrated on the weights below
            q.calibrate()
    if hessians is not None:
        from vitslim.quant.gptq import gptq_quantize_linears

        gptq_quantize_linears(hessians.finish(), config.gptq_group_size)
    else:
        for lin in quant_linears(qmodel).values():
            lin.quantize_weight()
    set_mode(qmodel, "quant")
    if config.reconstruction_iters:
        from vitslim.quant.reconstruct import reconstruct_blocks

        reconstruct_blocks(fp_model, qmodel, calib_images, config.reconstruction_iters)
    setattr(qmodel, CONFIG_ATTR, config)
    qmodel.vitslim_calibration_seconds = time.perf_counter() - start
    return qmodel


def install(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Put (uncalibrated) quantizers and quantized modules into ``model``, in place."""
    for bp in vit_parts(model).blocks:
        install_block(bp, config, config.weight_bits, f"blocks.{bp.index}")
    if config.quantize_head and isinstance(model.head, nn.Linear):
        model.head = QuantLinear(model.head, make_quantizer(config.linear, "head.input"),
                                 WeightQuantizer(config.weight_bits, config.weight_calibration, name="head.weight"))
    return model


def _collect_hessians(model: nn.Module):
    from vitslim.quant.gptq import HessianCollector

    return HessianCollector(quant_linears(model))
