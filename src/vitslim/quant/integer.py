"""Integer-only non-linear ops of I-ViT: Shiftmax, ShiftGELU and I-LayerNorm.

Reference: Z. Li and Q. Gu, "I-ViT: Integer-only Quantization for Efficient Vision Transformer
Inference", ICCV 2023 (official code: github.com/zkkli/I-ViT, models/quantization_utils).

Each op takes an integer tensor ``q`` with its float scale ``s`` (x ≈ q·s) and returns an integer
tensor with its scale. Inside, arithmetic is int64 only: +, −, *, shifts, comparisons, clamp,
select, and integer division where I-ViT divides (the softmax/sigmoid normalisation, once per row
or element, and the Newton square root). Float appears only at the boundary: turning the float
scales (and LayerNorm's γ, β, eps) into integer constants, i.e. dyadic multipliers m/2^k, which a
deployment computes once, offline. Deviations from the official code, all for accuracy at 8-bit
inputs, are noted per function. ``IntegerSoftmax``/``IntegerGELU``/``IntegerLayerNorm`` wrap the
ops as fake-quant modules (float in, float out) so they can be dropped into a PyTorch model.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitslim.quant.primitives import int_range

FRAC_BITS = 12  # fraction bits of the fixed-point exponent inside the exp routine
EXP_RANGE = 15  # I-ViT's n: exp(x) is clamped below at 2^-n
DIV_BITS = 62  # reciprocal numerator 2^62: e·(2^62 // total) < 2^63 whenever e <= total
NORM_BITS = 40  # fraction bits of the normalised LayerNorm value
NEWTON_ITERS = 6  # from a start within 2x above the root, 5 are exact on int64; one spare


def dyadic(scale: float, bits: int = 16) -> tuple[int, int]:
    """Integers (m, k) with scale ≈ m / 2^k, |m| in [2^(bits-1), 2^bits): x·scale ≈ (x·m) >> k.

    The requantization multiplier of integer-only inference (Jacob et al. 2018; I-ViT, Li & Gu,
    ICCV 2023). Float: this *is* the boundary; call it offline on the float scales. k >= 1 (scales
    >= 2^(bits-1) get a wider m); scales too small to move an int64 product give (0, 1).
    """
    if scale == 0:
        return 0, 1
    _, exp = math.frexp(abs(scale))  # |scale| = frac·2^exp, frac in [0.5, 1)
    k = max(bits - exp, 1)
    if k > 62:
        return 0, 1
    m = round(abs(scale) * 2**k)
    return (m if scale > 0 else -m), k


def round_shift(x: Tensor, k: Tensor | int) -> Tensor:
    """x / 2^k rounded to nearest (ties up), k >= 1: (x + 2^(k-1)) >> k."""
    return (x + (1 << (k - 1))) >> k


def _to_fixed(x: Tensor, scale: float) -> Tensor:
    """x·scale as fixed point with FRAC_BITS fraction bits (dyadic multiply)."""
    m, k = dyadic(scale * 2**FRAC_BITS)
    return round_shift(x * m, k)


def _exp_of_fixed(t: Tensor) -> Tensor:
    """e^t for fixed-point t <= 0, in units of 2^-(FRAC_BITS+1+EXP_RANGE), I-ViT's shift form.

    t·log2(e) ≈ t + t>>1 − t>>4; write −t·log2(e) = z + p (integer z, fraction p in [0,1)) and
    2^-(z+p) ≈ 2^-z·(1 − p/2), i.e. (2 − p) << (n − z) with n = EXP_RANGE.
    """
    t = t + (t >> 1) - (t >> 4)
    t = t.clamp(min=-(EXP_RANGE << FRAC_BITS))
    z = (-t) >> FRAC_BITS
    p = -t - (z << FRAC_BITS)
    return ((2 << FRAC_BITS) - p) << (EXP_RANGE - z)


EXP_ONE = 1 << (FRAC_BITS + 1 + EXP_RANGE)  # e^0 in _exp_of_fixed's units


def _normalise(e: Tensor, total: Tensor, bits: int) -> Tensor:
    """round(e / total · 2^bits) for 0 <= e <= total: one division per total, then a multiply."""
    return round_shift(e * ((1 << DIV_BITS) // total), DIV_BITS - bits)


def shiftmax(q: Tensor, scale: float, out_bits: int = 8, dim: int = -1) -> tuple[Tensor, float]:
    """Integer softmax of ``q·scale`` along ``dim``: Shiftmax of I-ViT (Li & Gu, ICCV 2023).

    Returns (p, 2^-out_bits) with p unsigned in [0, 2^out_bits − 1] (p = 1 saturates one level
    short). Deviation from the official code, which divides by x0 = floor(−1/s): the input is
    first moved to a fixed point of 12 fraction bits by a dyadic multiply, so "−1" is exact even
    for coarse 8-bit scales, and the output is rounded, not floored. Float only in ``dyadic``.
    """
    x = q.long()
    e = _exp_of_fixed(_to_fixed(x - x.amax(dim, keepdim=True), scale))
    p = _normalise(e, e.sum(dim, keepdim=True), out_bits)
    return p.clamp(max=int_range(out_bits, signed=False)[1]).int(), 2.0**-out_bits


def shift_gelu(q: Tensor, scale: float, out_bits: int = 8) -> tuple[Tensor, float]:
    """Integer GELU of ``q·scale``: ShiftGELU of I-ViT (Li & Gu, ICCV 2023), x·σ(1.702x).

    1.702x ≈ x + x>>1 + x>>3 + x>>4 (= 1.6875x); the sigmoid uses the Shiftmax exp routine and
    σ is quantized to out_bits unsigned, σ·2^(out_bits−1) in [0, 2^(out_bits−1)] (I-ViT's
    output_bit). Returns (q·σ_int, scale·2^(1−out_bits)); the next layer requantizes. Deviation:
    σ(y) is computed per element as σ(−|y|) = e/(e + 1) (and 1 − that for y >= 0) instead of
    against the row maximum, so no exponent exceeds 0 and the clamp at 2^-n never bites.
    Float only in ``dyadic``.
    """
    x = q.long()
    t = _to_fixed(-x.abs(), scale)
    e = _exp_of_fixed(t + (t >> 1) + (t >> 3) + (t >> 4))
    half = _normalise(e, e + EXP_ONE, out_bits - 1)  # σ(−1.702|x|)
    sigma = torch.where(x >= 0, (1 << (out_bits - 1)) - half, half)
    return (x * sigma).int(), scale * 2.0 ** (1 - out_bits)


def _floor_log2(v: Tensor) -> Tensor:
    """floor(log2 v) for int64 v >= 1, by a binary search of shifts and comparisons."""
    e, t = torch.zeros_like(v), v
    for s in (32, 16, 8, 4, 2, 1):
        big = t >= (1 << s)
        t, e = torch.where(big, t >> s, t), e + big.long() * s
    return e


def isqrt_newton(v: Tensor, iters: int = NEWTON_ITERS) -> Tensor:
    """floor(√max(v, 1)) for int64 v by a fixed number of integer Newton steps.

    I-ViT iterates 10 times from 2^16; we start from 2^(floor(log2 v)//2 + 1), which lies within 2x
    above the root, and keep the minimum so the iteration cannot oscillate; 5 steps are exact, we take 6.
    """
    v = v.clamp(min=1)
    k = 1 << ((_floor_log2(v) >> 1) + 1)
    for _ in range(iters):
        k = torch.minimum(k, (k + v // k) >> 1)
    return k


def layernorm_constants(channels: int, scale: float, weight: Tensor | None, bias: Tensor | None,
                        out_scale: float, eps: float) -> tuple[Tensor, Tensor, Tensor, int]:
    """The offline (float) part of I-LayerNorm: per-channel dyadic (m, k) of γ·√C/(2^40·s_out),
    the integer bias round(β/s_out) and the integer eps (eps·C³/s², in units of Σ(C·(x−μ))²)."""
    gamma = weight.tolist() if weight is not None else [1.0] * channels
    beta = bias.tolist() if bias is not None else [0.0] * channels
    mk = [dyadic(g * math.sqrt(channels) / (2**NORM_BITS * out_scale)) for g in gamma]
    m, k = (torch.tensor(col, dtype=torch.int64) for col in zip(*mk))
    b = torch.tensor([round(x / out_scale) for x in beta], dtype=torch.int64)
    return m, k, b, round(eps * channels**3 / scale**2)


def i_layernorm(q: Tensor, scale: float, weight: Tensor | None, bias: Tensor | None, out_bits: int = 8,
                eps: float = 1e-5, out_scale: float | None = None) -> tuple[Tensor, float]:
    """Integer LayerNorm over the last dim: I-LayerNorm of I-ViT (Li & Gu, ICCV 2023).

    y = C·x − Σx (exactly C·(x − μ): I-ViT rounds the mean instead), std = isqrt(Σy² + eps) by
    Newton, r = y·(2^40 // std) = (x − μ)/(σ√C)·2^40, then the affine is a dyadic requantization
    (r·m_c >> k_c) + b_c to signed out_bits with scale ``out_scale`` (default: no clipping
    possible, max |γ|·√(C−1) + |β|; pass a calibrated one for accuracy). The input scale cancels
    except in eps. Integers stay < 2^63 for |q| < 2^15. Float only in ``layernorm_constants``.
    """
    c, lim = int(q.shape[-1]), int_range(out_bits, signed=True)[1]  # int: a plain constant when traced for export
    if out_scale is None:
        g = weight.abs() if weight is not None else torch.ones(c)
        bound = g * math.sqrt(c - 1) + (bias.abs() if bias is not None else 0)
        out_scale = float(bound.max()) / lim
    m, k, b, eps_int = layernorm_constants(c, scale, weight, bias, out_scale, eps)
    x = q.long()
    y = c * x - x.sum(-1, keepdim=True)
    std = isqrt_newton((y * y).sum(-1, keepdim=True) + eps_int)
    r = y * ((1 << NORM_BITS) // std)
    out = round_shift(r * m.to(q.device), k.to(q.device)) + b.to(q.device)
    return out.clamp(-lim, lim).int(), out_scale


class _IntegerOp(nn.Module):
    """Fake-quant wrapper: x → q = round(x/s) (symmetric, s = calibrated absmax/(2^(b−1)−1)) →
    integer op → dequantize. While ``calibrating`` it records absmax and runs the float op."""

    def __init__(self, bits: int = 8) -> None:
        super().__init__()
        self.bits, self.calibrating = bits, False
        self.register_buffer("absmax", torch.zeros(()))

    def quantize(self, x: Tensor) -> tuple[Tensor, float]:
        if float(self.absmax) == 0:
            raise RuntimeError(f"{type(self).__name__} is not calibrated: run data under calibrating(model)")
        lim = int_range(self.bits, signed=True)[1]
        scale = float(self.absmax) / lim
        return torch.round(x / scale).clamp(-lim, lim).long(), scale

    def forward(self, x: Tensor) -> Tensor:
        if self.calibrating:
            self.absmax = torch.maximum(self.absmax, x.detach().abs().amax().float())
            return self.float_op(x)
        out, out_scale = self.integer_op(*self.quantize(x))
        return out.to(x.dtype) * out_scale

    def float_op(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def integer_op(self, q: Tensor, scale: float) -> tuple[Tensor, float]:
        raise NotImplementedError


class IntegerSoftmax(_IntegerOp):
    """Softmax through ``shiftmax`` (8-bit input, out_bits unsigned output)."""

    def __init__(self, dim: int = -1, bits: int = 8, out_bits: int = 8) -> None:
        super().__init__(bits)
        self.dim, self.out_bits = dim, out_bits

    def float_op(self, x: Tensor) -> Tensor:
        return x.softmax(self.dim)

    def integer_op(self, q: Tensor, scale: float) -> tuple[Tensor, float]:
        return shiftmax(q, scale, self.out_bits, self.dim)


class IntegerGELU(_IntegerOp):
    """GELU through ``shift_gelu``."""

    def __init__(self, bits: int = 8, out_bits: int = 8) -> None:
        super().__init__(bits)
        self.out_bits = out_bits

    def float_op(self, x: Tensor) -> Tensor:
        return F.gelu(x)

    def integer_op(self, q: Tensor, scale: float) -> tuple[Tensor, float]:
        return shift_gelu(q, scale, self.out_bits)


class IntegerLayerNorm(_IntegerOp):
    """A LayerNorm through ``i_layernorm``; its output scale is calibrated too (absmax/127).
    It re-derives the integer constants each call (cheap); a deployment would store them."""

    def __init__(self, norm: nn.LayerNorm, bits: int = 8, out_bits: int = 8) -> None:
        super().__init__(bits)
        self.norm, self.out_bits = norm, out_bits
        self.register_buffer("out_absmax", torch.zeros(()))

    def float_op(self, x: Tensor) -> Tensor:
        out = self.norm(x)
        self.out_absmax = torch.maximum(self.out_absmax, out.detach().abs().amax().float())
        return out

    def integer_op(self, q: Tensor, scale: float) -> tuple[Tensor, float]:
        out_scale = float(self.out_absmax) / int_range(self.out_bits, signed=True)[1]
        return i_layernorm(q, scale, self.norm.weight, self.norm.bias, self.out_bits, self.norm.eps, out_scale)


@contextmanager
def calibrating(model: nn.Module) -> Iterator[nn.Module]:
    """Within this block the model's integer ops record ranges and compute in float."""
    ops = [m for m in model.modules() if isinstance(m, _IntegerOp)]
    for op in ops:
        op.calibrating = True
    try:
        yield model
    finally:
        for op in ops:
            op.calibrating = False


def use_integer_ops(model: nn.Module, bits: int = 8) -> nn.Module:
    """Swap each block's LayerNorms, GELU and attention softmax for I-ViT's integer ops (Li &
    Gu, "I-ViT: Integer-only Quantization for Efficient Vision Transformer Inference", 2023), in
    place; works on float and on vitslim-quantized or token-reduced models. Calibrate their
    input ranges by running images ``with calibrating(model):`` before use."""
    from vitslim.models import UnsupportedModelError, vit_parts
    from vitslim.models.attention import route_attention

    for bp in vit_parts(model).blocks:
        if not isinstance(bp.norm1, nn.LayerNorm):
            raise UnsupportedModelError(f"block {bp.index} has no LayerNorm (a rotated model's norms are RMSNorm); "
                                        "I-ViT's integer ops need an unrotated model")
        bp.block.norm1, bp.block.norm2 = IntegerLayerNorm(bp.norm1, bits), IntegerLayerNorm(bp.norm2, bits)
        bp.mlp.act = IntegerGELU(bits)
        bp.attn.softmax_op = IntegerSoftmax(bits=bits)
        route_attention(bp.attn)
    return model
