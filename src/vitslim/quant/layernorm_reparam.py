"""Post-LayerNorm reparameterization: channel-wise quantization at layer-wise cost.

Li et al., "RepQ-ViT: Scale Reparameterization for Post-Training Quantization of Vision
Transformers", ICCV 2023, used as the smooth optimization strategy's first step in I&S-ViT
(2023). Post-LayerNorm activations have a few channels with huge ranges, so one per-tensor
scale wastes most levels. Calibrate per-channel affine parameters (s_c, z_c), pick layer-wise
targets (s̃, z̃) = their means, and fold r1 = s/s̃, r2 = z − z̃ into the model:

    LN:     γ' = γ / r1,   β' = (β + s·r2) / r1       (so X' = (X + s·r2) / r1)
    Linear: W' = W · r1 (per input column),  b' = b − W · (s·r2)

W'X' + b' = WX + b exactly in real arithmetic; X' has near-uniform channel ranges, so a
layer-wise quantizer then works as well as the channel-wise one would have.
"""

from __future__ import annotations

import torch
from torch import nn

from vitslim.quant.primitives import affine_params, int_range


def channel_params(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel asymmetric scale and zero point for ranges [lo, hi]."""
    return affine_params(lo, hi, *int_range(bits, signed=False))


@torch.no_grad()
def reparameterize(norm: nn.LayerNorm, linear: nn.Linear, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> None:
    """Fold channel-wise quantization parameters of ``norm``'s output into ``norm`` and the
    ``linear`` that consumes it (in place)."""
    scale, zero = channel_params(lo.float(), hi.float(), bits)
    r1 = scale / scale.mean()
    r2 = zero - zero.mean().round()
    shift = scale * r2
    if linear.bias is None:  # qkv_bias=False models: the fold needs a bias
        linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype))
    linear.bias.sub_(linear.weight.double().matmul(shift.double()).to(linear.bias.dtype))
    linear.weight.mul_(r1[None, :])
    norm.bias.add_(shift).div_(r1)
    norm.weight.div_(r1)
