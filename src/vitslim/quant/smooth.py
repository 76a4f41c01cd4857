"""SmoothQuant with bias and a per-layer scale-ratio search.

Tai et al., "MPTQ-ViT: Mixed-Precision Post-Training Quantization for Vision Transformer",
2024 (its SmoothQuant with bias, SQ-b, after Xiao et al., "SmoothQuant", ICML 2023). A linear
input X with a few wide and off-centre channels is shifted by a per-channel bias z (the centre
of each channel's range) and divided by a per-channel smoothing factor

    s_j = max|X_j − z_j|^α / max|W_:,j|^(1−α)

which moves part of the range into the weights (W' = W·diag(s), b' = b + W·z). α is searched
per layer (MPTQ-ViT's "optimal scaling factor ratio search") for the lowest output error of
the quantized layer on calibration inputs. Everything is folded into the model, so inference
stays layer-wise and exact in floating point before rounding:

* qkv and fc1 inputs: into the preceding LayerNorm's affine (γ' = γ/s, β' = (β − z)/s);
* proj input (attn·v): into the v rows of qkv — softmax rows sum to 1, so attn·((v − z)/s) =
  (attn·v − z)/s.

The fc2 input follows GELU, which nothing linear precedes, so SQ-b does not apply there.
"""

from __future__ import annotations

import torch
from torch import nn

from vitslim.quant.primitives import affine_params, int_range, symmetric_scale, uniform_fake_quant

ALPHAS = tuple(a / 10 for a in range(0, 11))  # the ratio grid; α = 0 leaves only the bias shift


def smoothing(x_lo: torch.Tensor, x_hi: torch.Tensor, weight: torch.Tensor, alpha: float,
              bias: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-input-channel (scale s, shift z) for channel ranges [x_lo, x_hi] and ``weight`` (out, in)."""
    zero = (x_lo + x_hi) / 2 if bias else torch.zeros_like(x_lo)
    act = torch.maximum(x_hi - zero, zero - x_lo).clamp_min(1e-5)
    wmax = weight.detach().abs().amax(0).clamp_min(1e-5)
    return (act.pow(alpha) / wmax.pow(1 - alpha)).clamp_min(1e-5), zero


def _quantized_output_error(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                            a_bits: int, w_bits: int) -> float:
    """Output MSE of the smoothed layer with per-tensor asymmetric inputs and per-channel weights."""
    xs = (x - zero) / scale
    ws = weight * scale
    a_min, a_max = int_range(a_bits, signed=False)
    a_step, a_zero = affine_params(xs.min(), xs.max(), a_min, a_max)
    xq = uniform_fake_quant(xs, a_step, a_zero, a_min, a_max)
    w_min, w_max = int_range(w_bits, signed=True)
    wq = uniform_fake_quant(ws, symmetric_scale(ws.abs().amax(1, keepdim=True), w_max), 0, w_min, w_max)
    return (xq @ wq.T - xs @ ws.T).pow(2).mean().item()


def search_alpha(x: torch.Tensor, weight: torch.Tensor, a_bits: int, w_bits: int, bias: bool = True) -> float:
    """The α of ``ALPHAS`` with the lowest quantized output error on sampled inputs ``x`` (rows, in)."""
    lo, hi = x.amin(0), x.amax(0)
    w = weight.detach().float()
    errors = {a: _quantized_output_error(x, w, *smoothing(lo, hi, w, a, bias), a_bits, w_bits) for a in ALPHAS}
    return min(errors, key=errors.get)


@torch.no_grad()
def fold_into_norm(norm: nn.LayerNorm, linear: nn.Linear, scale: torch.Tensor, zero: torch.Tensor) -> None:
    """X' = (X − z)/s through ``norm``'s affine, compensated in ``linear`` (in place)."""
    _compensate(linear, scale, zero)
    norm.bias.sub_(zero).div_(scale)
    norm.weight.div_(scale)


@torch.no_grad()
def fold_into_values(qkv: nn.Linear, proj: nn.Linear, scale: torch.Tensor, zero: torch.Tensor) -> None:
    """X' = (X − z)/s for proj's input through the v rows of ``qkv`` (in place)."""
    dim = proj.in_features
    _compensate(proj, scale, zero)
    if qkv.bias is None:
        qkv.bias = nn.Parameter(torch.zeros(qkv.out_features, dtype=qkv.weight.dtype))
    qkv.bias[2 * dim:].sub_(zero).div_(scale)
    qkv.weight[2 * dim:].div_(scale[:, None])


def _compensate(linear: nn.Linear, scale: torch.Tensor, zero: torch.Tensor) -> None:
    if linear.bias is None:
        linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype))
    linear.bias.add_(linear.weight.double().matmul(zero.double()).to(linear.bias.dtype))
    linear.weight.mul_(scale[None, :])
