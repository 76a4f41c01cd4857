"""``quantize_(model, config, calib_images)``: post-training quantization of a ViT, in place."""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import replace

import torch
from torch import nn

from vitslim.datafile import brief, check_type
from vitslim.errors import CalibrationError, ConfigError
from vitslim.models import vit_parts
from vitslim.progress import progress_bar
from vitslim.quant.config import PRESETS, QuantConfig, preset
from vitslim.quant.gptq import HessianCollector, gptq_quantize_linears
from vitslim.quant.layernorm_reparam import reparameterize
from vitslim.quant.modules import QuantLinear, install_block, make_quantizer, quant_linears, quantizers, set_mode
from vitslim.quant.quantizers import WeightQuantizer
from vitslim.quant.reconstruct import reconstruct_blocks
from vitslim.quant.smooth import fold_into_norm, fold_into_values, search_alpha, smoothing
from vitslim.registry import register

CONFIG_ATTR = "vitslim_quant_config"


def _batches(images: torch.Tensor, batch_size: int):
    return [images[i : i + batch_size] for i in range(0, len(images), batch_size)]


@torch.no_grad()
def _run(model: nn.Module, images: torch.Tensor, batch_size: int, what: str) -> None:
    for batch in progress_bar(_batches(images, batch_size), what):
        model.forward_features(batch)


@torch.no_grad()
def _input_stats(model: nn.Module, linears: list[nn.Linear], images: torch.Tensor, batch_size: int,
                 rows_per_batch: int = 256) -> dict[nn.Module, dict]:
    """Per-channel min/max and a row sample of each linear's input (FP32 model)."""
    stats: dict[nn.Module, dict] = {}
    gen = torch.Generator().manual_seed(0)

    def hook(module, inputs):
        flat = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
        rows = flat[torch.randperm(len(flat), generator=gen)[:rows_per_batch]]
        lo, hi = flat.amin(0), flat.amax(0)
        if module in stats:
            s = stats[module]
            s["lo"], s["hi"] = torch.minimum(s["lo"], lo), torch.maximum(s["hi"], hi)
            s["rows"] = torch.cat([s["rows"], rows])
        else:
            stats[module] = {"lo": lo, "hi": hi, "rows": rows}

    handles = [m.register_forward_pre_hook(hook) for m in linears]
    _run(model, images, batch_size, "linear input ranges")
    for h in handles:
        h.remove()
    return stats


def _fold_channel_ranges(parts, config: QuantConfig, stats: dict) -> dict[str, float]:
    """LayerNorm reparameterization or SmoothQuant-with-bias, folded into every block;
    returns the α chosen per layer (SmoothQuant)."""
    alphas = {}
    for bp in parts.blocks:
        config_b = config.for_block(bp.index)
        folds = [(bp.norm1, bp.qkv, "qkv"), (bp.norm2, bp.fc1, "fc1")]
        if config.smooth_quant:
            folds.append((bp.qkv, bp.proj, "proj"))
        for prev, linear, name in folds:
            if not torch.isfinite(linear.weight).all():  # it would spread into the folded norm's output
                raise CalibrationError(f"the weights of blocks.{bp.index}.{name} contain NaN or Inf; check the "
                                       "model's checkpoint")
            st = stats[linear]
            if config.ln_reparam:
                reparameterize(prev, linear, st["lo"], st["hi"], config_b.post_ln.bits)
                continue
            bits = config_b.linear.bits if name == "proj" else config_b.post_ln.bits
            alpha = config.smooth_alpha if config.smooth_alpha is not None else \
                search_alpha(st["rows"], linear.weight, bits, config_b.weight_bits)
            scale, zero = smoothing(st["lo"], st["hi"], linear.weight, alpha)
            (fold_into_values if name == "proj" else fold_into_norm)(prev, linear, scale, zero)
            alphas[f"blocks.{bp.index}.{name}"] = alpha
    return alphas


@register(QuantConfig, step="quantize", stage=2, calibrated=True,
          to_knobs=lambda config: quant_step_knobs(config), from_knobs=lambda knobs: quant_step_config(knobs))
def quantize_(model: nn.Module, config: QuantConfig, calib_images: torch.Tensor, batch_size: int = 16) -> nn.Module:
    """Post-training quantization (simulated, fake-quant) of a timm ViT, in place.

    Calibrates on ``calib_images`` (a (N, 3, H, W) tensor of preprocessed images; the first
    ``config.calib_images`` of them when set), in order: Hadamard rotations folded into the
    weights (QuaRot 2024) if asked, LayerNorm reparameterization (RepQ-ViT 2023 / I&S-ViT 2023)
    or SmoothQuant with bias (MPTQ-ViT 2024) if asked, activation
    statistics, activation quantizers (uniform, log2, SULQ or AdaLog), weights (round to
    nearest, or GPTQ 2022), then block reconstruction (I&S-ViT/BRECQ-style) if asked.
    Returns ``model``, quantized, with its config attached.
    """
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"quantize_ takes a QuantConfig (e.g. vitslim.quant.preset('w8a8')), "
                          f"got {type(config).__name__}")
    calib_images = calib_images[:config.calib_images]
    if len(calib_images) == 0:
        raise ConfigError("quantize needs at least one calibration image")
    if len(calib_images) < 8:
        warnings.warn(f"only {len(calib_images)} calibration images; 32 or more give stabler ranges", stacklevel=2)
    qmodel = model.eval()
    if config.rotation:
        from vitslim.quant.rotate import rotate

        rotate(qmodel, config.rotation, config.rotation_seed)
    parts = vit_parts(qmodel)  # names unsupported block types before anything changes
    start = time.perf_counter()
    fp_model = copy.deepcopy(qmodel) if config.reconstruction_iters else None
    if config.ln_reparam or config.smooth_quant:
        linears = [m for bp in parts.blocks for m in (bp.qkv, bp.fc1, bp.proj)]
        stats = _input_stats(qmodel, linears, calib_images, batch_size)
        qmodel.vitslim_smooth_alphas = _fold_channel_ranges(parts, config, stats)
    install(qmodel, config)
    set_mode(qmodel, "observe")
    hessians = HessianCollector(quant_linears(qmodel)) if config.weight_method == "gptq" else None
    _run(qmodel, calib_images, batch_size, "calibration statistics")
    for q in quantizers(qmodel):
        if not isinstance(q, WeightQuantizer):  # weights are calibrated on the weights below
            q.calibrate()
    if hessians is not None:
        gptq_quantize_linears(hessians.finish(), config.gptq_group_size, config.gptq_act_order)
    else:
        for lin in quant_linears(qmodel).values():
            lin.quantize_weight()
    set_mode(qmodel, "quant")
    if config.reconstruction_iters:
        reconstruct_blocks(fp_model, qmodel, calib_images, config.reconstruction_iters,
                           learn_bias=config.reconstruction_bias)
    setattr(qmodel, CONFIG_ATTR, config)
    qmodel.vitslim_calibration_seconds = time.perf_counter() - start
    return qmodel


def quant_step_knobs(config: QuantConfig) -> dict:
    """A quantization config as a recipe step: a preset by name when it is one, else the full
    config; ``calib_images`` beside it."""
    base = replace(config, calib_images=None)
    name = next((n for n, p in PRESETS.items() if p == base), None)
    knobs: dict = {"preset": name} if name else {"config": base.to_dict()}
    if config.calib_images is not None:
        knobs["calib_images"] = config.calib_images
    return knobs


def quant_step_config(knobs: dict) -> QuantConfig:
    """The config of a recipe's ``quantize`` step: ``{preset: NAME}`` or ``{config: {...}}``,
    optionally with ``calib_images``."""
    unknown = sorted(str(k) for k in set(knobs) - {"preset", "config", "calib_images"})
    if unknown:
        raise ConfigError(f"unknown knob(s) {brief(unknown)}; valid knobs are ['calib_images', 'config', 'preset']")
    if ("preset" in knobs) == ("config" in knobs):
        raise ConfigError("give exactly one of `preset` (a name) or `config` (a QuantConfig mapping)")
    if "preset" in knobs and (not isinstance(knobs["preset"], str) or knobs["preset"] not in PRESETS):
        raise ConfigError(f"preset {brief(knobs['preset'])} is not one of {sorted(PRESETS)}")
    config = preset(knobs["preset"]) if "preset" in knobs else QuantConfig.from_dict(knobs["config"])
    if "calib_images" not in knobs:
        return config
    return replace(config, calib_images=check_type(knobs["calib_images"], int, "calib_images"))


def install(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Put (uncalibrated) quantizers and quantized modules into ``model``, in place."""
    for bp in vit_parts(model).blocks:
        install_block(bp, config.for_block(bp.index), f"blocks.{bp.index}")
    if config.quantize_head and isinstance(model.head, nn.Linear):
        model.head = QuantLinear(model.head, make_quantizer(config.linear, "head.input"),
                                 WeightQuantizer(config.weight_bits, config.weight_calibration, name="head.weight"))
    return model

