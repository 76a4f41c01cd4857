"""W8A8 for any conv/attention model (Swin, EfficientFormer, MobileViT, EfficientViT, ...) that
exports to ONNX Runtime's int8 kernels, with Q-HyViT's per-layer granularity choice.

    from vitslim.quant.hybrid import HybridQuantConfig, quantize_hybrid_
    quantize_hybrid_(model, HybridQuantConfig(), calib_images)   # in place
    vitslim.export.export_onnx(qmodel, "model.int8.onnx")

What is quantized: the input and weight of every ``nn.Linear`` and ``nn.Conv2d`` (int8 weights
per output channel, symmetric; uint8 activations per tensor, asymmetric), and every conv's
output (ORT fuses DequantizeLinear → Conv → QuantizeLinear into QLinearConv only with that
output Q). BatchNorms and layer scales that follow a conv are folded into it first, and a SiLU
or Hardswish that follows a conv gets its gate on an 8-bit grid (``QuantSiLU``,
``QuantHardswish``) so the chain stays int8 in ORT.
Attention's activation–activation matmuls, norms, softmax and other activations stay in float.

Granularity (Li et al., "Q-HyViT: Post-Training Quantization of Hybrid Vision Transformers With
Bridge Block Reconstruction for IoT Systems", 2023/2024): hybrid models' bridge and conv blocks
have activations whose channel ranges differ by orders of magnitude, where one per-tensor scale
fails, while elsewhere layer-wise is enough. For each group of layers reading the same input we
measure the layers' output error on calibration images for layer-wise ranges (min-max,
percentile, MSE-clipped) and for channel-wise ranges, and keep the best. Int8 kernels take one
input scale, so channel-wise is made deployable the way RepQ-ViT does it (Li et al., "RepQ-ViT:
Scale Reparameterization for Post-Training Quantization of Vision Transformers", ICCV 2023): the
per-channel scale and zero point are folded into the affine norm (LayerNorm / BatchNorm) that
produces the input and into the consuming weights, which makes the layer-wise quantizer exact
for them. It is a candidate only where such a norm feeds the layers directly, and a fold is kept
only if the FP32 model's output is unchanged by it (checked, not assumed).
"""

from __future__ import annotations

import copy
import itertools
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vitslim.errors import ConfigError, UnsupportedModelError
from vitslim.progress import progress_bar
from vitslim.quant.layernorm_reparam import channel_params
from vitslim.quant.modules import QuantLinear, quantizers, set_mode
from vitslim.quant.quantizers import UniformQuantizer, WeightQuantizer
from vitslim.registry import register

RANGE_METHODS = ("minmax", "percentile", "mse")
GRANULARITIES = ("auto", "layer", "channel")
CONFIG_ATTR = "vitslim_hybrid_config"
# A fold is exact in real arithmetic; in float32 the model's output moves by rounding only.
FOLD_TOLERANCE = 1e-3
SEARCH_SAMPLE = 1 << 14  # values a range search looks at (the error is then measured on whole inputs)
# Modules that may sit between a norm and the layers it feeds without breaking a fold.
PASS_THROUGH = (nn.Identity, nn.Dropout)


@dataclass(frozen=True)
class HybridQuantConfig:
    """W8A8 for hybrid models. ``granularity``: ``auto`` (Q-HyViT's per-layer choice by output
    error), ``layer`` (per tensor everywhere) or ``channel`` (channel-wise wherever a norm can
    absorb it). ``ranges``: layer-wise range methods the choice tries. ``keep_float``: module
    name prefixes left in FP32. ``error_images``: images whose layer inputs the choice is
    measured on (the ranges themselves come from every calibration image)."""

    granularity: str = "auto"
    ranges: tuple[str, ...] = ("minmax", "percentile", "mse")
    weight_calibration: str = "mse"
    keep_float: tuple[str, ...] = ()
    error_images: int = 4
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        bad = [r for r in self.ranges if r not in RANGE_METHODS]
        if bad or not self.ranges:
            raise ConfigError(f"ranges must be a non-empty subset of {RANGE_METHODS}, got {self.ranges!r}")
        if self.weight_calibration not in ("minmax", "mse"):
            raise ConfigError(f"weight_calibration must be minmax or mse, got {self.weight_calibration!r}")
        if self.error_images < 1 or self.batch_size < 1:
            raise ConfigError("error_images and batch_size must be >= 1")


class QuantConv2d(nn.Module):
    """A conv with fake-quantized input, weight (per output channel) and output."""

    def __init__(self, conv: nn.Conv2d, name: str, weight_calibration: str) -> None:
        super().__init__()
        self.conv = conv
        self.input_quantizer = UniformQuantizer(8, name=f"{name}.input")
        self.weight_quantizer = WeightQuantizer(8, weight_calibration, name=f"{name}.weight")
        self.output_quantizer = UniformQuantizer(8, method="mse", name=f"{name}.output")
        self.register_buffer("qweight", None)

    @property
    def weight(self) -> torch.Tensor:
        return self.conv.weight

    def quantize_weight(self) -> None:
        w = self.conv.weight.detach()
        self.weight_quantizer.calibrate_weight(w.flatten(1))
        self.qweight = self.weight_quantizer.fake_quant(w.flatten(1)).view_as(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.conv.weight
        if self.qweight is not None and self.weight_quantizer.mode == "quant":
            weight = self.qweight
            if self.weight_quantizer.lowered is not None:
                weight = self.weight_quantizer.lowered(self.qweight)  # int8 weights in the ONNX file
        c = self.conv
        y = F.conv2d(self.input_quantizer(x), weight, c.bias, c.stride, c.padding, c.dilation, c.groups)
        return self.output_quantizer(y)


# ---------------------------------------------------------------------------- model structure


def _is_plain(module: nn.Module, base: type) -> bool:
    """An instance of ``base`` whose forward is ``base``'s (timm's Linear only adds a dtype cast)."""
    forward = type(module).forward
    if forward is base.forward:
        return True
    try:
        from timm.layers import Linear as TimmLinear
    except ImportError:
        return False
    return base is nn.Linear and forward is TimmLinear.forward


def unsupported_modules(model: nn.Module) -> list[str]:
    """Names of modules with weights this quantizer cannot put on an int8 kernel faithfully:
    other convs, convs whose forward is not ``nn.Conv2d``'s (weight standardization, 'same'
    padding), non-zero padding modes, ``nn.MultiheadAttention`` and recurrent layers."""
    bad = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            ok = _is_plain(m, nn.Conv2d) and m.padding_mode == "zeros" and not isinstance(m.padding, str)
        elif isinstance(m, nn.Linear):
            ok = _is_plain(m, nn.Linear)
        else:
            ok = not isinstance(m, (nn.modules.conv._ConvNd, nn.MultiheadAttention, nn.RNNBase, nn.Bilinear))
        if not ok:
            bad.append(f"{name} ({type(m).__name__})")
    return bad


def _is_norm(m: nn.Module) -> bool:
    """An affine per-channel norm whose output is its affine result (BatchNorm without an
    activation inside, LayerNorm incl. timm's LayerNorm2d)."""
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        act = getattr(m, "act", nn.Identity())
        return m.affine and isinstance(act, nn.Identity)
    return isinstance(m, nn.LayerNorm) and m.elementwise_affine and m.bias is not None


def _norm_channels(m: nn.Module) -> int:
    return m.weight.numel()


def _in_channels(m: nn.Module) -> int:
    return m.in_features if isinstance(m, nn.Linear) else m.in_channels


@dataclass
class _Group:
    """Layers that read one tensor, and the norm that writes it (when one does directly)."""

    layers: list[str]
    norm: str | None


@torch.no_grad()
def _trace(model: nn.Module, image: torch.Tensor) -> tuple[list[tuple[str, nn.Module]], dict[str, tuple]]:
    """Leaf-module call order of one forward and each call's (input key, output key), where a
    key identifies a tensor's storage (the tensors are kept alive so storage is not reused)."""
    calls, keys, alive = [], {}, []

    def key(t):
        return (t.data_ptr(), t.numel()) if isinstance(t, torch.Tensor) else None

    def hook(name):
        def fn(module, inputs, output):
            alive.extend([inputs, output])
            calls.append((name, module))
            keys.setdefault(name, (key(inputs[0]) if inputs else None, key(output)))
        return fn

    watched = [(n, m) for n, m in model.named_modules() if not list(m.children()) or _is_norm(m)
               or isinstance(m, nn.modules.batchnorm._BatchNorm)]
    handles = [m.register_forward_hook(hook(n)) for n, m in watched]
    try:
        model(image)
    finally:
        for h in handles:
            h.remove()
    return calls, keys


def _layer_groups(model: nn.Module, image: torch.Tensor, layers: dict[str, nn.Module]) -> list[_Group]:
    """Group the layers by the tensor they read; a group's norm is the last norm called before
    it with nothing but pass-through modules in between (functional reshapes such as Swin's
    window partition may be: whether a fold through them is exact is checked later)."""
    calls, keys = _trace(model, image)
    order = [n for n, _ in calls]
    modules = dict(model.named_modules())
    groups: dict[tuple, _Group] = {}
    for name in dict.fromkeys(n for n in order if n in layers):
        in_key = keys[name][0]
        if in_key in groups:
            groups[in_key].layers.append(name)
            continue
        norm = None
        for prev in reversed(order[: order.index(name)]):
            m = modules[prev]
            if _is_norm(m):
                if _norm_channels(m) == _in_channels(layers[name]):
                    norm = prev
                break
            if not isinstance(m, PASS_THROUGH) and not (prev in layers and keys[prev][0] == in_key):
                break
        groups[in_key] = _Group([name], norm)
    return list(groups.values())


def _adjacent_pairs(model: nn.Module, image: torch.Tensor, first: type,
                    second: type | tuple[type, ...]) -> list[tuple[str, str]]:
    """(a, b) module pairs, a of type ``first`` and b of type(s) ``second``, where b is called
    right after a on a's output (identities between them skipped)."""
    calls, keys = _trace(model, image)
    # timm's BatchNormAct2d runs its act/drop children inside its forward, so their hooks fire
    # before the norm's own: leave them out, or the conv would never be followed by its norm.
    norms = [n for n, m in calls if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    calls = [(n, m) for n, m in calls
             if not isinstance(m, PASS_THROUGH) and not any(n.startswith(f"{norm}.") for norm in norms)]
    return [(a, b) for (a, ma), (b, mb) in itertools.pairwise(calls)
            if isinstance(ma, first) and isinstance(mb, second) and keys[b][0] == keys[a][1]]


def _conv_bn_pairs(model: nn.Module, image: torch.Tensor) -> list[tuple[str, str]]:
    """(conv, batchnorm) pairs where the BatchNorm is called right after the conv on its output."""
    return [(a, b) for a, b in _adjacent_pairs(model, image, nn.Conv2d, nn.modules.batchnorm._BatchNorm)
            if model.get_submodule(b).affine and model.get_submodule(b).track_running_stats]


class _QuantGated(nn.Module):
    """x · q(gate(x)): an activation whose gate sits on an 8-bit grid, so that after an int8
    conv ONNX Runtime runs it on integer kernels (the product as QLinearMul) and the chain to
    the next conv stays int8, instead of a float gate and Mul between DequantizeLinear and
    QuantizeLinear (and the layout transposes around them)."""

    def __init__(self, gate_quantizer: UniformQuantizer) -> None:
        super().__init__()
        self.gate_quantizer = gate_quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate_quantizer(self.gate(x))


class QuantSiLU(_QuantGated):
    """SiLU, x·σ(x) (MobileViT's conv blocks): ORT runs σ as QLinearSigmoid."""

    gate = staticmethod(torch.sigmoid)

    def __init__(self, name: str) -> None:
        super().__init__(UniformQuantizer(8, name=f"{name}.gate"))


class _UnitGridQuantizer(UniformQuantizer):
    """8-bit unsigned grid fixed on [0, 1], a hard gate's whole range, whatever calibration saw."""

    def calibrate(self) -> None:
        self.scale, self.zero_point = self.params_for_range(torch.tensor(0.0), torch.tensor(1.0))


class QuantHardswish(_QuantGated):
    """Hardswish, x·hardsigmoid(x) (EfficientViT's, MobileNetV3's): on the [0, 1] grid the gate's
    codes are x + 3 on a grid 6× as coarse, which the exporter writes as one QLinearAdd
    (``vitslim.export.int8_gates``; ORT has no quantized HardSigmoid)."""

    gate = staticmethod(F.hardsigmoid)

    def __init__(self, name: str) -> None:
        super().__init__(_UnitGridQuantizer(8, name=f"{name}.gate"))


# Activations whose gate goes on an 8-bit grid when they follow a conv.
GATED: dict[type, type] = {nn.SiLU: QuantSiLU, nn.Hardswish: QuantHardswish}


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


# ---------------------------------------------------------------------------- exact folds


@torch.no_grad()
def _output(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    out = model(images)
    return out if isinstance(out, torch.Tensor) else out[0]


def _unchanged(model: nn.Module, images: torch.Tensor, reference: torch.Tensor) -> bool:
    out = _output(model, images)
    return bool(((out - reference).abs().max() <= FOLD_TOLERANCE * reference.abs().max().clamp_min(1e-6)).item())


def _keep_exact(model: nn.Module, images: torch.Tensor, folds: list, apply) -> list:
    """Apply every fold; if the model's output moved, undo them and keep, one at a time, only
    those that leave it unchanged. ``apply(fold)`` changes the model and returns an undo."""
    reference = _output(model, images)
    undos = [apply(f) for f in folds]
    if _unchanged(model, images, reference):
        return folds
    for undo in reversed(undos):
        undo()
    kept = []
    for f in folds:
        undo = apply(f)
        if _unchanged(model, images, reference):
            kept.append(f)
        else:
            undo()
    return kept


def _snapshot(*modules: nn.Module):
    states = [(m, copy.deepcopy(m.state_dict())) for m in modules]

    def undo():
        for m, s in states:
            m.load_state_dict(s)
    return undo


@torch.no_grad()
def _fold_bn_into_conv(model: nn.Module, conv_name: str, bn_name: str):
    conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
    undo_params = _snapshot(conv, bn)
    had_bias = conv.bias is not None
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    if not had_bias:
        conv.bias = nn.Parameter(torch.zeros(conv.out_channels, dtype=conv.weight.dtype))
    conv.weight.mul_(scale.view(-1, 1, 1, 1))
    conv.bias.copy_((conv.bias - bn.running_mean) * scale + bn.bias)
    rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
    _set_module(model, bn_name, nn.Sequential(*rest) if rest else nn.Identity())

    def undo():
        _set_module(model, bn_name, bn)
        if not had_bias:
            conv.bias = None
        undo_params()
    return undo


def _is_channel_scale(m: nn.Module) -> bool:
    """timm's LayerScale2d (EfficientFormer(V2)): x · γ per channel, γ its only parameter."""
    return type(m).__name__ == "LayerScale2d" and [n for n, _ in m.named_parameters()] == ["gamma"]


@torch.no_grad()
def _fold_channel_scale_into_conv(model: nn.Module, conv_name: str, scale_name: str):
    """conv(x) · γ = conv with weight and bias scaled by γ per output channel: the float Mul
    between the int8 conv and the residual add goes."""
    conv, layer_scale = model.get_submodule(conv_name), model.get_submodule(scale_name)
    undo_params = _snapshot(conv)
    gamma = layer_scale.gamma.detach()
    conv.weight.mul_(gamma.view(-1, 1, 1, 1))
    if conv.bias is not None:
        conv.bias.mul_(gamma)
    _set_module(model, scale_name, nn.Identity())

    def undo():
        _set_module(model, scale_name, layer_scale)
        undo_params()
    return undo


def _input_index(layer: nn.Module) -> torch.Tensor:
    """For each weight entry's input position, the input channel it reads (grouped convs)."""
    if isinstance(layer, nn.Linear):
        return torch.arange(layer.in_features)[None, :]
    per_group_in = layer.in_channels // layer.groups
    group = torch.arange(layer.out_channels) // (layer.out_channels // layer.groups)
    return group[:, None] * per_group_in + torch.arange(per_group_in)[None, :]


def _fold_shift_allowed(layers: list[nn.Module]) -> bool:
    """A zero-point shift folds exactly only where no zero padding meets it."""
    return all(isinstance(m, nn.Linear) or all(p == 0 for p in m.padding) for m in layers)


def _reparam_params(lo: torch.Tensor, hi: torch.Tensor, shift_ok: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """RepQ-ViT's r1 (per-channel scale over the layer-wise one) and the shift s·r2."""
    scale, zero = channel_params(lo, hi, 8)
    r1 = scale / scale.mean()
    shift = scale * (zero - zero.mean().round()) if shift_ok else torch.zeros_like(scale)
    return r1, shift


def _reparam_weight(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, r1: torch.Tensor,
                    shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W' = W·r1 per input channel, b' = b − W·shift: W'X' + b' = WX + b for X' = (X + shift)/r1."""
    idx = _input_index(layer)
    view = idx.shape + (1,) * (weight.dim() - 2)
    bias = torch.zeros(weight.shape[0], dtype=weight.dtype) if bias is None else bias
    spatial = weight if weight.dim() == 2 else weight.sum(dim=(2, 3))
    return weight * r1[idx].view(view), bias - (spatial * shift[idx]).sum(1)


@torch.no_grad()
def _fold_channel_scale(model: nn.Module, group: _Group, lo: torch.Tensor, hi: torch.Tensor):
    norm = model.get_submodule(group.norm)
    layers = [model.get_submodule(n) for n in group.layers]
    undo_params = _snapshot(norm, *layers)
    had_bias = [m.bias is not None for m in layers]
    r1, shift = _reparam_params(lo, hi, _fold_shift_allowed(layers))
    for m in layers:
        w, b = _reparam_weight(m, m.weight, m.bias, r1, shift)
        m.weight.copy_(w)
        if m.bias is None:
            m.bias = nn.Parameter(b)
        else:
            m.bias.copy_(b)
    norm.bias.add_(shift).div_(r1)
    norm.weight.div_(r1)

    def undo():
        for m, had in zip(layers, had_bias):
            if not had:
                m.bias = None
        undo_params()
    return undo


# ---------------------------------------------------------------------------- the measured choice


@torch.no_grad()
def _input_stats(model: nn.Module, layers: dict[str, nn.Module], images: torch.Tensor, config: HybridQuantConfig):
    """Per-channel min/max of each layer's input over all images (``lo``, ``hi``: what is
    deployed) and over all but the last ``error_images`` (``lo_fit``, ``hi_fit``), and those
    last images' inputs (``sample``; Linear: up to 2048 rows). The choice fits ranges on the
    first part and measures on the held-out second: channel-wise ranges fitted on a few images
    clip unseen ones, and that must count against them."""
    stats: dict[str, dict] = {}
    gen = torch.Generator().manual_seed(0)
    held = min(config.error_images, max(len(images) // 2, 1))
    fit_images, error_images = (images[:-held], images[-held:]) if len(images) > 1 else (images, images)
    phase = {"fit": True}

    def hook(name):
        def fn(module, inputs):
            x = inputs[0].detach().float()
            xc = x.movedim(1, -1) if isinstance(module, nn.Conv2d) else x
            flat = xc.reshape(-1, xc.shape[-1])
            lo, hi = flat.amin(0), flat.amax(0)
            s = stats.setdefault(name, {"lo": lo, "hi": hi, "lo_fit": lo, "hi_fit": hi, "sample": []})
            s["lo"], s["hi"] = torch.minimum(s["lo"], lo), torch.maximum(s["hi"], hi)
            if phase["fit"]:
                s["lo_fit"], s["hi_fit"] = torch.minimum(s["lo_fit"], lo), torch.maximum(s["hi_fit"], hi)
            else:
                rows = flat[torch.randperm(len(flat), generator=gen)[:2048 // held]]
                s["sample"].append(x if isinstance(module, nn.Conv2d) else rows)
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    try:
        for batch in progress_bar(fit_images.split(config.batch_size), "hybrid: layer input ranges"):
            model(batch)
        phase["fit"] = False
        model(error_images)
    finally:
        for h in handles:
            h.remove()
    for s in stats.values():
        s["sample"] = torch.cat(s["sample"])
    return stats


def _apply_layer(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, bias)
    return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def _quantized_weight(weight: torch.Tensor, method: str) -> torch.Tensor:
    wq = WeightQuantizer(8, method)
    wq.calibrate_weight(weight.flatten(1))
    return wq.fake_quant(weight.flatten(1)).view_as(weight)


def _quantized_input(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, method: str) -> torch.Tensor:
    """``x`` through a per-tensor uint8 quantizer whose range comes from [lo, hi] and ``method``."""
    q = UniformQuantizer(8, method=method)
    q.min_val, q.max_val = lo.min(), hi.max()
    q.sample = x.flatten()[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))[:SEARCH_SAMPLE]]
    q.calibrate()
    return q.fake_quant(x)


def _channel_view(t: torch.Tensor, conv: bool) -> torch.Tensor:
    return t.view(1, -1, 1, 1) if conv else t


@torch.no_grad()
def _candidate_errors(layers: list[nn.Module], stats: list[dict], foldable: bool,
                      config: HybridQuantConfig) -> dict[str, float]:
    """Relative output error (MSE / mean square of the output), summed over the group's
    layers, of each quantization candidate: ``layer:<range method>`` and ``channel``."""
    s0 = stats[0]
    conv = isinstance(layers[0], nn.Conv2d)
    x, lo, hi = s0["sample"], s0["lo_fit"], s0["hi_fit"]
    refs = [_apply_layer(m, x, m.weight, m.bias) for m in layers]
    norms = [r.pow(2).mean().clamp_min(1e-12) for r in refs]

    def error(xq: torch.Tensor, weights_biases) -> float:
        return sum(float((_apply_layer(m, xq, w, b) - r).pow(2).mean() / n)
                   for m, (w, b), r, n in zip(layers, weights_biases, refs, norms))

    plain = [(_quantized_weight(m.weight, config.weight_calibration), m.bias) for m in layers]
    errors = {}
    if config.granularity != "channel" or not foldable:
        for method in config.ranges:
            errors[f"layer:{method}"] = error(_quantized_input(x, lo, hi, method), plain)
    if foldable and config.granularity != "layer":
        r1, shift = _reparam_params(lo, hi, _fold_shift_allowed(layers))
        x2 = (x + _channel_view(shift, conv)) / _channel_view(r1, conv)
        folded = [_reparam_weight(m, m.weight, m.bias, r1, shift) for m in layers]
        folded = [(_quantized_weight(w, config.weight_calibration), b) for w, b in folded]
        errors["channel"] = error(_quantized_input(x2, (lo + shift) / r1, (hi + shift) / r1, "minmax"), folded)
    return errors


# ---------------------------------------------------------------------------- quantize


def _quantizable_layers(model: nn.Module, config: HybridQuantConfig) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
            and not any(n == p or n.startswith(p + ".") for p in config.keep_float)}


@register(HybridQuantConfig, step="quantize_hybrid", stage=2, calibrated=True)
def quantize_hybrid_(model: nn.Module, config: HybridQuantConfig, calib_images: torch.Tensor) -> nn.Module:
    """W8A8 post-training quantization of any timm conv/attention model (Swin, EfficientFormer(V2),
    MobileViT, EfficientViT, Next-ViT, TinyViT, ConvNeXt, ...) for ONNX Runtime's int8 kernels.

    Q-HyViT (Li et al., "Q-HyViT: Post-Training Quantization of Hybrid Vision Transformers With
    Bridge Block Reconstruction for IoT Systems", 2023/2024): per layer group, layer-wise or
    channel-wise activation ranges, whichever gives the lower output error on calibration images;
    channel-wise ranges are folded into the producing norm (RepQ-ViT, Li et al., ICCV 2023), so
    every int8 kernel keeps one input scale. Steps: name unsupported modules (error), choose and
    fold, fold BatchNorms into their convs, wrap every Linear/Conv2d, calibrate the activation
    ranges on ``calib_images`` ((N, 3, H, W), preprocessed) and round the weights. The choice per
    group is stored in ``model.vitslim_hybrid_choices``. In place (every vitslim verb is): the
    model is returned, quantized.
    """
    if not isinstance(config, HybridQuantConfig):
        raise ConfigError(f"quantize_hybrid_ takes a HybridQuantConfig, got {type(config).__name__}")
    if len(calib_images) == 0:
        raise ConfigError("quantize_hybrid_ needs at least one calibration image")
    bad = unsupported_modules(model)
    if bad:
        more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
        raise UnsupportedModelError(f"hybrid W8A8 supports plain nn.Linear and nn.Conv2d (zero padding) only; "
                                    f"{type(model).__name__} has {', '.join(bad[:4])}{more}")
    if any(isinstance(m, UniformQuantizer) for m in model.modules()):
        raise ConfigError("model is already quantized; pass the FP32 model")
    if len(calib_images) < 8:
        warnings.warn(f"only {len(calib_images)} calibration images; 32 or more give stabler ranges", stacklevel=2)
    start = time.perf_counter()
    qmodel = model.eval()
    probe = calib_images[:2]
    layers = _quantizable_layers(qmodel, config)
    groups = _layer_groups(qmodel, calib_images[:1], layers)
    stats = _input_stats(qmodel, layers, calib_images, config)
    choices = {}
    for g in progress_bar(groups, "hybrid: granularity choice"):
        errors = _candidate_errors([layers[n] for n in g.layers], [stats[n] for n in g.layers], g.norm is not None,
                                   config)
        choices[tuple(g.layers)] = {"norm": g.norm, "errors": errors, "choice": min(errors, key=errors.get)}
    channel = [g for g in groups if choices[tuple(g.layers)]["choice"] == "channel"]
    kept = _keep_exact(qmodel, probe, channel, lambda g: _fold_channel_scale(
        qmodel, g, stats[g.layers[0]]["lo"], stats[g.layers[0]]["hi"]))
    for g in channel:
        if g not in kept:  # the fold would change the model: best layer-wise range instead
            c = choices[tuple(g.layers)]
            c["choice"] = min((k for k in c["errors"] if k != "channel"), key=c["errors"].get, default="layer:minmax")
    pairs = [(a, b) for a, b in _conv_bn_pairs(qmodel, calib_images[:1]) if a in layers]
    _keep_exact(qmodel, probe, pairs, lambda p: _fold_bn_into_conv(qmodel, *p))
    scales = [(a, b) for a, b in _adjacent_pairs(qmodel, calib_images[:1], nn.Conv2d, nn.Module)
              if a in layers and _is_channel_scale(qmodel.get_submodule(b))]
    _keep_exact(qmodel, probe, scales, lambda p: _fold_channel_scale_into_conv(qmodel, *p))
    gated = [b for a, b in _adjacent_pairs(qmodel, calib_images[:1], nn.Conv2d, tuple(GATED)) if a in layers]
    _install(qmodel, layers, choices, config)
    for name in gated:
        _set_module(qmodel, name, GATED[type(qmodel.get_submodule(name))](name))
    _calibrate(qmodel, calib_images, config.batch_size)
    qmodel.vitslim_hybrid_choices = {",".join(k): v for k, v in choices.items()}
    setattr(qmodel, CONFIG_ATTR, config)
    qmodel.vitslim_calibration_seconds = time.perf_counter() - start
    return qmodel


def _install(model: nn.Module, layers: dict[str, nn.Module], choices: dict, config: HybridQuantConfig) -> None:
    method = {n: c["choice"] for names, c in choices.items() for n in names}
    for name, layer in layers.items():
        if isinstance(layer, nn.Conv2d):
            wrapped = QuantConv2d(layer, name, config.weight_calibration)
        else:
            wrapped = QuantLinear(layer, UniformQuantizer(8, name=f"{name}.input"),
                                  WeightQuantizer(8, config.weight_calibration, name=f"{name}.weight"))
        choice = method.get(name, "layer:minmax")  # layers the trace did not reach
        wrapped.input_quantizer.method = "minmax" if choice == "channel" else choice.split(":")[1]
        _set_module(model, name, wrapped)


@torch.no_grad()
def _calibrate(model: nn.Module, images: torch.Tensor, batch_size: int) -> None:
    set_mode(model, "observe")
    for batch in progress_bar(images.split(batch_size), "hybrid: calibration"):
        model(batch)
    for q in quantizers(model):
        if not isinstance(q, WeightQuantizer):
            keep = torch.randperm(len(q.sample), generator=torch.Generator().manual_seed(0))[:SEARCH_SAMPLE]
            q.sample = q.sample[keep]
            q.calibrate()
    for m in model.modules():
        if isinstance(m, (QuantLinear, QuantConv2d)):
            m.quantize_weight()
    set_mode(model, "quant")
