"""Fake-quantizers: uniform, log2, shift-uniform-log2 (SULQ) and adaptive-log-base (AdaLog).

Every quantizer is an ``nn.Module`` with three modes: ``observe`` (pass-through while it
collects calibration statistics: running min/max, per channel when asked, and a random sample
of values for the error searches), ``quant`` (quantize–dequantize) and ``off``. ``calibrate()``
turns the statistics into parameters. Uniform quantizers expose what an integer runtime needs:
``scale``, ``zero_point``, ``bits``, ``signed`` and ``axis``.

The log-domain quantizers share one grid, x̂ = scale · base^(−q) − shift with integer
q ∈ [0, 2^bits − 1] (the last code stands for 0), and differ in which parameters they fit:

* ``log2``: base 2, shift 0, scale = the observed maximum (FQ-ViT/RepQ-ViT style);
* ``sulq``: shift-uniform-log2 (Zhong et al., "I&S-ViT: An Inclusive & Stable Method for
  Pushing the Limit of Post-Training ViTs Quantization", 2023): the input is shifted by η,
  mapped to the log2 domain and quantized uniformly there (step s, i.e. base 2^s); η and s
  are searched for the lowest error;
* ``adalog``: adaptive log base (Wu et al., "AdaLog: Post-Training Quantization for Vision
  Transformers with Adaptive Logarithm Quantizer", ECCV 2024): base and scale searched with a
  coarse-to-fine progressive search (its Fast Progressive Combining Search); for post-GELU
  inputs a bias (shift) makes the values positive first (its bias reparameterization).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

from vitslim.errors import CalibrationError
from vitslim.quant.primitives import (
    absmax_symmetric_scale,
    affine_params,
    int_range,
    mse_symmetric_scale,
    symmetric_scale,
    uniform_fake_quant,
)

SAMPLE_SIZE = 1 << 16  # values kept per quantizer for the error searches
# A float (outlier) channel's calibration magnitude exceeds this many times that of the largest
# channel kept on the integer grid. DINOv2's post-GELU inputs: one channel at 4x in block 2, the
# other blocks' largest within 1.2-1.9x of their 5th largest.
OUTLIER_RATIO = 1.5


class Quantizer(nn.Module):
    """Base: observation of calibration statistics and the mode switch."""

    def __init__(self, bits: int, name: str = "") -> None:
        super().__init__()
        self.bits, self.name = bits, name
        self.mode = "off"
        self.sample: torch.Tensor | None = None
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None
        self.channel_axis: int | None = None  # per-channel statistics along the last dim

    def observe(self, x: torch.Tensor) -> None:
        x = self._checked(x)
        dims = tuple(range(x.dim() - 1)) if self.channel_axis is not None else tuple(range(x.dim()))
        lo, hi = x.amin(dim=dims), x.amax(dim=dims)
        self.min_val = lo if self.min_val is None else torch.minimum(self.min_val, lo)
        self.max_val = hi if self.max_val is None else torch.maximum(self.max_val, hi)
        flat = x.flatten()
        pick = flat[torch.randint(0, flat.numel(), (min(flat.numel(), SAMPLE_SIZE),), generator=_rng(flat.numel()))]
        self.sample = pick if self.sample is None else torch.cat([self.sample, pick])[-4 * SAMPLE_SIZE:]

    def _checked(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as float32, or an error naming this site if it holds NaN or Inf."""
        x = x.detach().float()
        if not torch.isfinite(x).all():
            raise CalibrationError(f"calibration activations at {self.name or 'a quantizer'} contain NaN or Inf; "
                                   "check the calibration images and the model in FP32")
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "observe":
            self.observe(x)
            return x
        if self.mode == "quant":
            return self.fake_quant(x)
        return x

    def check_observed(self) -> None:
        if self.sample is None:
            raise CalibrationError(f"quantizer {self.name!r} saw no calibration data")

    def calibrate(self) -> None:
        raise NotImplementedError

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{type(self).__name__.removesuffix('Quantizer').lower()} {self.bits}-bit, {self.name}"


def _rng(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed % (2**31))


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).pow(2).mean().item()


# ---------------------------------------------------------------------------- uniform


class UniformQuantizer(Quantizer):
    """Uniform affine quantizer: per-tensor or per-channel (last dim), symmetric or not, with
    the clipping range from min–max, a percentile, or an MSE search (OMSE-style)."""

    def __init__(self, bits: int, symmetric: bool = False, per_channel: bool = False,
                 method: str = "minmax", name: str = "", float_channels: int = 0) -> None:
        super().__init__(bits, name)
        self.symmetric, self.method = symmetric, method
        self.channel_axis = -1 if per_channel else None
        self.signed = symmetric
        self.qmin, self.qmax = int_range(bits, signed=symmetric)
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros(()))
        # Outlier channels whose part beyond the range stays in float (LLM.int8()-style
        # decomposition; ``QuantLinear`` adds it beside the integer matmul): their indices.
        self.float_channels = float_channels
        if float_channels:
            self.register_buffer("float_index", torch.zeros(0, dtype=torch.long))
        self.channel_absmax: torch.Tensor | None = None
        self.lowered: OnnxQDQ | None = None  # set by ``lowered_for_onnx`` while a model is exported

    @property
    def axis(self) -> int | None:
        return self.channel_axis

    def params_for_range(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.symmetric:
            scale = symmetric_scale(torch.maximum(lo.abs(), hi.abs()), self.qmax)
            return scale, torch.zeros_like(scale)
        return affine_params(lo, hi, self.qmin, self.qmax)

    def observe(self, x: torch.Tensor) -> None:
        super().observe(x)
        if self.float_channels:
            absmax = x.detach().float().abs().flatten(0, -2).amax(0)
            self.channel_absmax = absmax if self.channel_absmax is None else torch.maximum(self.channel_absmax, absmax)

    def calibrate(self) -> None:
        self.check_observed()
        lo, hi = self.min_val, self.max_val
        if self.float_channels:
            lo, hi = self._split_float_channels()
        if self.method == "percentile" and self.channel_axis is None:
            lo, hi = torch.quantile(self.sample, 0.0001), torch.quantile(self.sample, 0.9999)
        elif self.method == "mse":
            lo, hi = self._search_clipping(lo, hi)
        self.scale, self.zero_point = self.params_for_range(lo, hi)

    def _split_float_channels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Pick the ``float_channels`` channels with the largest calibration magnitude and
        return the range of the others: one outlier channel no longer sets every token's step."""
        k = min(self.float_channels, len(self.channel_absmax) - 1)
        top = self.channel_absmax.topk(k + 1)
        # Only true outliers: a channel well above the largest one that stays on the grid. A
        # layer without one keeps its plain integer matmul (the float path costs time).
        outlier = top.values[:k] > OUTLIER_RATIO * top.values[k]
        self.float_index = top.indices[:k][outlier].sort().values
        kept = self.channel_absmax.clone()
        kept[self.float_index] = 0
        return torch.maximum(self.min_val, -kept.max()), torch.minimum(self.max_val, kept.max())

    def saturation(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The lowest and highest value the grid represents: inputs beyond them saturate."""
        return (self.qmin - self.zero_point) * self.scale, (self.qmax - self.zero_point) * self.scale

    def _search_clipping(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shrink the range by the factor with the lowest quantization MSE on the sample
        (per-channel ranges shrink together; the sample is per tensor)."""
        best, best_err = 1.0, math.inf
        for alpha in torch.linspace(0.3, 1.0, 36).tolist():
            scale, zero = self.params_for_range(lo * alpha, hi * alpha)
            if self.channel_axis is not None:  # judge per-channel ranges on the observed extremes' scale
                scale, zero = scale.mean(), zero.float().mean().round()
            err = mse(uniform_fake_quant(self.sample, scale, zero, self.qmin, self.qmax), self.sample)
            if err < best_err:
                best, best_err = alpha, err
        return lo * best, hi * best

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        if self.lowered is not None:
            return self.lowered(x)
        return uniform_fake_quant(x, self.scale, self.zero_point, self.qmin, self.qmax)


class TokenQuantizer(Quantizer):
    """Dynamic per-token uniform quantizer: every token (row of the last dim) gets its own
    asymmetric range, computed from its values at run time and shrunk by a clipping ratio that
    calibration fixes (``mse``: the ratio with the least error on calibration tokens; ``minmax``:
    none). How QuaRot (Ashkboos et al., "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs",
    2024) quantizes activations at 4 bits: a few high-norm tokens (DINOv2 has them) no longer
    set the step of every other token. Exported to ONNX as float ops, not integer kernels."""

    ROWS, ROWS_PER_BATCH = 2048, 256  # calibration tokens kept for the ratio search

    def __init__(self, bits: int, method: str = "mse", name: str = "") -> None:
        super().__init__(bits, name)
        self.method = method
        self.qmin, self.qmax = int_range(bits, signed=False)
        self.register_buffer("clip", torch.ones(()))
        self.lowered: nn.Module | None = None  # set by ``lowered_for_onnx`` while a model is exported

    def observe(self, x: torch.Tensor) -> None:  # the sample holds whole tokens, (rows, channels)
        rows = self._checked(x).flatten(0, -2)
        rows = rows[torch.randperm(len(rows), generator=_rng(rows.numel()))[:self.ROWS_PER_BATCH]]
        self.sample = rows if self.sample is None else torch.cat([self.sample, rows])[-self.ROWS:]

    def calibrate(self) -> None:
        self.check_observed()
        if self.method != "mse":
            return
        ratios = torch.linspace(0.5, 1.0, 26).tolist()
        errors = {ratio: mse(self.quantize(self.sample, ratio), self.sample) for ratio in ratios}
        self.clip = torch.tensor(min(errors, key=errors.get))

    def quantize(self, x: torch.Tensor, ratio: float | torch.Tensor) -> torch.Tensor:
        """Quantize–dequantize each token on its own range shrunk by ``ratio``."""
        lo, hi = x.amin(-1, keepdim=True) * ratio, x.amax(-1, keepdim=True) * ratio
        scale, zero = affine_params(lo, hi, self.qmin, self.qmax)
        return uniform_fake_quant(x, scale, zero, self.qmin, self.qmax)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        if self.lowered is not None:
            return self.lowered(x)
        return self.quantize(x, self.clip)

    def extra_repr(self) -> str:
        return f"per-token {self.bits}-bit, clip {float(self.clip):.2f}, {self.name}"


class OnnxQDQ(nn.Module):
    """An 8-bit ``UniformQuantizer`` lowered for ONNX export: the same quantize–dequantize
    through PyTorch's fake-quant ops, which the exporter turns into QuantizeLinear /
    DequantizeLinear pairs that ONNX Runtime fuses into int8 kernels. A per-tensor scale is a
    Python number and a per-channel one a buffer: the exporter must not trace them."""

    def __init__(self, quantizer: UniformQuantizer) -> None:
        super().__init__()
        self.qmin, self.qmax, self.channel_axis = quantizer.qmin, quantizer.qmax, quantizer.channel_axis
        self.per_tensor = quantizer.scale.numel() == 1
        if self.per_tensor:
            self.scale, self.zero = float(quantizer.scale), int(quantizer.zero_point)
        else:
            self.register_buffer("scale", quantizer.scale.detach().flatten().float().clone(), persistent=False)
            self.register_buffer("zero", quantizer.zero_point.detach().flatten().to(torch.int64).clone(),
                                 persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.per_tensor:
            return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero, self.qmin, self.qmax)
        axis = x.dim() - 1 if self.channel_axis == -1 else self.channel_axis
        return torch.fake_quantize_per_channel_affine(x, self.scale, self.zero.to(torch.int32), axis, self.qmin,
                                                      self.qmax)


@contextlib.contextmanager
def lowered_for_onnx(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, every 8-bit uniform quantizer of ``model`` runs as its ``OnnxQDQ``,
    and every 8-bit per-token quantizer in front of a 4- or 8-bit linear as nothing: the graph
    then holds ``MatMul(x, W)`` with integer weights, which runs as ``MatMulNBits`` with int8
    compute, quantizing ``x`` at run time (``dynamic_token_quantizers``). Sub-8-bit and
    log-domain quantizers stay float arithmetic, which exports as it is. Afterwards the model
    is as before."""
    lowered = {q: OnnxQDQ(q) for q in model.modules() if isinstance(q, UniformQuantizer) and q.bits == 8}
    lowered |= dict.fromkeys(dynamic_token_quantizers(model), nn.Identity())
    for q, op in lowered.items():
        q.lowered = op
    try:
        yield model
    finally:
        for q in lowered:
            q.lowered = None


DYNAMIC_WEIGHT_BITS = (4, 8)  # MatMulNBits with int8 compute quantizes its input rows at run time


def dynamic_token_quantizers(model: nn.Module) -> list[TokenQuantizer]:
    """The 8-bit per-token quantizers whose linear has 4- or 8-bit weights: what ONNX Runtime's
    ``MatMulNBits`` with int8 compute (dynamic activation quantization) takes over in an
    exported graph."""
    return [m.input_quantizer for m in model.modules()
            if isinstance(getattr(m, "input_quantizer", None), TokenQuantizer) and m.input_quantizer.bits == 8
            and isinstance(getattr(m, "weight_quantizer", None), WeightQuantizer)
            and m.weight_quantizer.bits in DYNAMIC_WEIGHT_BITS]


class WeightQuantizer(UniformQuantizer):
    """Symmetric per-output-channel weight quantizer; the range is searched on the weight itself."""

    def __init__(self, bits: int, method: str = "mse", name: str = "") -> None:
        super().__init__(bits, symmetric=True, per_channel=True, method=method, name=name)
        self.channel_axis = 0

    def calibrate_weight(self, w: torch.Tensor) -> None:
        w = w.detach().float()
        scale_of = mse_symmetric_scale if self.method == "mse" else absmax_symmetric_scale
        self.scale = scale_of(w, self.qmin, self.qmax)
        self.zero_point = torch.zeros_like(self.scale)


# ---------------------------------------------------------------------------- log domain


def log_fake_quant(x: torch.Tensor, bits: int, base: float | torch.Tensor, scale: float | torch.Tensor,
                   shift: float | torch.Tensor = 0.0) -> torch.Tensor:
    """x̂ = scale · base^(−q) − shift, q = round(−log_base((x + shift) / scale)) in [0, 2^bits − 2];
    values whose code would be 2^bits − 1 or more (and x + shift ≤ 0) dequantize to −shift."""
    levels = int_range(bits, signed=False)[1]
    y = (x + shift).clamp_min(1e-30) / scale
    q = torch.round(-torch.log(y) / torch.log(torch.as_tensor(base, dtype=y.dtype))).clamp_min(0)
    out = scale * torch.pow(base, -q)
    return torch.where((q >= levels) | (x + shift <= 0), torch.zeros_like(out), out) - shift


class LogQuantizer(Quantizer):
    """Log-domain quantizer for non-negative, power-law activations (post-Softmax, or
    post-GELU with a shift). ``variant`` picks which parameters are fitted: log2, sulq, adalog."""

    VARIANTS = ("log2", "sulq", "adalog")

    def __init__(self, bits: int, variant: str = "log2", shift: bool = False, name: str = "") -> None:
        super().__init__(bits, name)
        if variant not in self.VARIANTS:
            raise ValueError(f"unknown log quantizer {variant!r}; choose one of {self.VARIANTS}")
        self.variant, self.fit_shift = variant, shift
        self.signed, self.axis = False, None
        # Buffers so a saved model carries them: x̂ = scale · base^(−q) − shift.
        for name, value in (("base", 2.0), ("scale", 1.0), ("shift", 0.0)):
            self.register_buffer(name, torch.tensor(value))

    def _error(self, base: float, scale: float, shift: float) -> float:
        return mse(log_fake_quant(self.sample, self.bits, base, scale, shift), self.sample)

    def calibrate(self) -> None:
        self.check_observed()
        # Post-GELU: shift by −min so every value is ≥ 0 (AdaLog's bias reparameterization).
        shift = max(0.0, -float(self.min_val.min())) if self.fit_shift else 0.0
        top = float(self.max_val.max()) + shift
        if self.variant == "log2":
            params = 2.0, top, shift
        elif self.variant == "sulq":
            params = self._search_sulq(top, shift)
        else:
            params = self._search_adalog(top, shift)
        self.base, self.scale, self.shift = (torch.tensor(float(p)) for p in params)

    def _search_sulq(self, top: float, shift: float) -> tuple[float, float, float]:
        """Grid over the shift η and the log-domain step s (base 2^s); scale = top + η."""
        best = (math.inf, 2.0, top, shift)
        for eta in (0.0, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2):
            # Step 1 (base 2, no shift) is in the grid: SULQ can always fall back to log2.
            for step in [1.0, *torch.logspace(math.log10(0.02), math.log10(2.0), 40).tolist()]:
                base, scale = 2.0**step, top + eta
                err = self._error(base, scale, shift + eta)
                if err < best[0]:
                    best = (err, base, scale, shift + eta)
        return best[1:]

    def _search_adalog(self, top: float, shift: float) -> tuple[float, float, float]:
        """Fast Progressive Combining Search: a coarse grid over the base, then the scale
        around the best base, then a fine grid over the base around it."""
        def best_of(candidates):
            return min(candidates, key=lambda bs: self._error(bs[0], bs[1], shift))

        base, scale = best_of([(b, top) for b in [2.0, *(1 + torch.logspace(-2, 0.18, 20)).tolist()]])
        base, scale = best_of([(base, top * f) for f in torch.linspace(0.5, 1.2, 15).tolist()])
        base, scale = best_of([(1 + (base - 1) * f, scale) for f in torch.linspace(0.8, 1.25, 11).tolist()])
        return base, scale, shift

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        return log_fake_quant(x, self.bits, self.base, self.scale, self.shift)

    def extra_repr(self) -> str:
        return (f"{self.variant} {self.bits}-bit base={float(self.base):.3f} scale={float(self.scale):.3g} "
                f"shift={float(self.shift):.3g}, {self.name}")
