"""Uniform quantization arithmetic, written once: the integer grid, the scale and zero point
for a range, and quantize–dequantize (with a straight-through gradient for training).

Used by the quantizers, GPTQ, SmoothQuant's α search, LayerNorm reparameterization, block
reconstruction and the integer-only ops. Ranges below 1e-8 are widened to it: a constant
input would otherwise divide by zero.
"""

from __future__ import annotations

import torch

MIN_RANGE = 1e-8


def int_range(bits: int, signed: bool) -> tuple[int, int]:
    """The integer grid of ``bits``: [−2^(b−1), 2^(b−1) − 1] signed, [0, 2^b − 1] unsigned.
    Python ints, so traced graphs see constants."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def symmetric_scale(absmax: torch.Tensor, qmax: int) -> torch.Tensor:
    """The step that maps ±``absmax`` onto ±``qmax`` (zero point 0)."""
    return absmax.clamp_min(MIN_RANGE) / qmax


def affine_params(lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that map [lo, hi] (widened to hold 0, so zero is exact) onto the
    grid [qmin, qmax]."""
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = (hi - lo).clamp_min(MIN_RANGE) / (qmax - qmin)
    return scale, torch.round(-lo / scale).clamp(qmin, qmax)


def uniform_fake_quant(x: torch.Tensor, scale: torch.Tensor | float, zero: torch.Tensor | float,
               qmin: int, qmax: int) -> torch.Tensor:
    """Quantize ``x`` to the grid (round to nearest, saturate) and dequantize it."""
    q = torch.clamp(torch.round(x / scale) + zero, qmin, qmax)
    return (q - zero) * scale


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity in the backward pass (straight-through estimator,
    Bengio et al. 2013), so a quantizer's scale can be trained."""
    return (x.round() - x).detach() + x


def absmax_symmetric_scale(w: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Per-row symmetric step of ``w`` (rows, cols) that holds the row's largest magnitude."""
    return symmetric_scale(w.abs().amax(dim=1, keepdim=True), qmax)


def mse_symmetric_scale(w: torch.Tensor, qmin: int, qmax: int, steps: int = 21) -> torch.Tensor:
    """Per-row symmetric step of ``w`` (rows, cols) whose clipping range (50-100 % of the row's
    absmax) gives the least squared rounding error: at 4 bits clipping a few large weights
    costs less than the coarser grid of the full range."""
    absmax = w.abs().amax(dim=1, keepdim=True)
    best_scale, best_err = symmetric_scale(absmax, qmax), None
    for alpha in torch.linspace(0.5, 1.0, steps).tolist():
        scale = symmetric_scale(absmax * alpha, qmax)
        err = (uniform_fake_quant(w, scale, 0, qmin, qmax) - w).pow(2).sum(1, keepdim=True)
        best_scale = scale if best_err is None else torch.where(err < best_err, scale, best_scale)
        best_err = err if best_err is None else torch.minimum(err, best_err)
    return best_scale


def uniform_fake_quant_ste(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                           qmin: int, qmax: int) -> torch.Tensor:
    """``uniform_fake_quant`` with a straight-through rounding gradient."""
    return (torch.clamp(round_ste(x / scale) + zero, qmin, qmax) - zero) * scale
