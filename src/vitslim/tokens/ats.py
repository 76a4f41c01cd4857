"""ATS: adaptive token sampling, parameter-free.

Fayyaz et al., "Adaptive Token Sampling for Efficient Vision Transformers", ECCV 2022. Each
token's significance is the class token's attention to it times the norm of its value vector,
summed over heads; tokens are drawn by inverse-transform sampling of the cumulative
significance at ``K`` evenly spaced points. Points that land on the same token select it once,
so an image with a few dominant tokens keeps fewer: the token count adapts per image.

Batches: images keep different numbers of tokens, so the batch is padded to the largest count
and padded tokens are masked out of every later attention (keys get −inf). Padding rather
than per-image loops keeps one batched matrix product per layer, which is what makes a CPU
fast; the price is that a batch runs at its largest image's token count (batch 1 pays nothing).
"""

from __future__ import annotations

import torch
from torch import nn

from vitslim.models import BlockParts, vit_parts
from vitslim.registry import register
from vitslim.tokens.common import TokenState, attn_residual, check_blocks, class_attention, mlp_residual, patch
from vitslim.tokens.config import ATSConfig
from vitslim.tokens.evit import default_evit_blocks


def ats_sample(x: torch.Tensor, significance: torch.Tensor, budget: float, num_prefix: int,
               pad_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample non-prefix tokens of (B, N, C) at ceil(budget × real tokens) points per image;
    return (tokens padded to the batch's largest count, real-token mask)."""
    b, n, c = x.shape
    scores = significance[:, num_prefix:]
    real = torch.ones_like(scores, dtype=torch.bool) if pad_mask is None else pad_mask[:, num_prefix:]
    scores = scores * real
    cdf = (scores / scores.sum(1, keepdim=True)).cumsum(1).contiguous()
    points_per_image = (budget * real.sum(1)).ceil().long()  # (B,)
    ar = torch.arange(int(points_per_image.max()), device=x.device)
    points = (ar[None] + 0.5) / points_per_image[:, None]
    picked = torch.searchsorted(cdf, points.to(cdf.dtype).contiguous()).clamp(max=n - num_prefix - 1)
    valid = ar[None] < points_per_image[:, None]
    selected = torch.zeros_like(real).scatter_(1, picked, valid) & real
    counts = selected.sum(1)
    width = int(counts.max())
    order = (~selected).to(torch.int8).argsort(dim=1, stable=True)[:, :width]  # selected first, in order
    tokens = x[:, num_prefix:].gather(1, order[..., None].expand(-1, -1, c))
    kept = torch.arange(width, device=x.device)[None] < counts[:, None]
    prefix_mask = torch.ones(b, num_prefix, dtype=torch.bool, device=x.device)
    return torch.cat([x[:, :num_prefix], tokens], 1), torch.cat([prefix_mask, kept], 1)


def _block_forward(bp: BlockParts, x: torch.Tensor, state: TokenState) -> torch.Tensor:
    x, q, k, v = attn_residual(bp, x, state, prop_attn=False)
    if bp.index in state.params["blocks"] and state.params["budget"] < 1:
        cls_attn = class_attention(q, k, bp.attn.scale, state.pad_mask)  # (B, H, N)
        significance = (cls_attn * v.norm(dim=-1)).sum(1)
        x, state.pad_mask = ats_sample(x, significance, state.params["budget"], state.num_prefix, state.pad_mask)
    return mlp_residual(bp, x)


@register(ATSConfig, step="tokens", stage=1, method="ats")
def ats_(model: nn.Module, config: ATSConfig) -> nn.Module:
    """Patch ``model`` in place with ATS (Fayyaz et al., "Adaptive Token Sampling for Efficient
    Vision Transformers", 2022): at each of ``config.blocks``, sample at most ``config.budget``
    × the tokens present."""
    blocks = default_evit_blocks(len(vit_parts(model).blocks)) if config.blocks is None else list(config.blocks)
    blocks = check_blocks("ats", model, blocks)
    return patch(model, "ats", {"budget": config.budget, "blocks": blocks}, _block_forward)
