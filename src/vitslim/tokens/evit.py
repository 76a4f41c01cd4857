"""EViT: keep the attentive tokens, fuse the inattentive ones.

Liang et al., "Not All Patches are What You Need: Expediting Vision Transformers via Token
Reorganizations", ICLR 2022. In a few blocks, between attention and MLP, the tokens the class
token attends to most (a ``keep_rate`` fraction) are kept; the rest are fused into one token,
their average weighted by that attention. Without retraining this is the paper's
"off-the-shelf" setting; the default keeps 70% in blocks 4, 7 and 10 of a 12-block ViT.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vitslim.models import BlockParts, vit_parts
from vitslim.registry import register
from vitslim.tokens.common import TokenState, attn_residual, check_blocks, class_attention, mlp_residual, patch
from vitslim.tokens.config import EViTConfig


def evit_keep(x: torch.Tensor, cls_attn: torch.Tensor, keep: int, num_prefix: int) -> torch.Tensor:
    """Keep the ``keep`` most-attended non-prefix tokens of (B, N, C) and append the fused rest."""
    scores = cls_attn[:, num_prefix:]
    order = scores.argsort(dim=1, descending=True)
    top, rest = order[:, :keep], order[:, keep:]
    tokens = x[:, num_prefix:]
    gather = lambda idx: tokens.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))  # noqa: E731
    weights = scores.gather(1, rest)
    fused = (gather(rest) * weights[..., None]).sum(1, keepdim=True) / weights.sum(1, keepdim=True)[..., None]
    return torch.cat([x[:, :num_prefix], gather(top), fused], dim=1)


def _block_forward(bp: BlockParts, x: torch.Tensor, state: TokenState) -> torch.Tensor:
    x, q, k, _ = attn_residual(bp, x, state, prop_attn=False)
    if bp.index in state.params["blocks"]:
        n = x.shape[1] - state.num_prefix
        keep = math.ceil(state.params["keep_rate"] * n)
        if keep < n - 1:  # fusing a single token into "the rest" would change nothing
            cls_attn = class_attention(q, k, bp.attn.scale, None).mean(1)
            x = evit_keep(x, cls_attn, keep, state.num_prefix)
    return mlp_residual(bp, x)


def default_evit_blocks(depth: int) -> list[int]:
    """The paper's blocks 4, 7, 10 of 12 (0-based 3, 6, 9), scaled to other depths."""
    return sorted({round(b * depth / 12) for b in (3, 6, 9)})


@register(EViTConfig, step="tokens", stage=1, method="evit")
def evit_(model: nn.Module, config: EViTConfig) -> nn.Module:
    """Patch ``model`` in place with EViT (Liang et al., "Not All Patches are What You Need",
    2022): keep ``config.keep_rate`` of the tokens in ``config.blocks``, fuse the rest."""
    blocks = default_evit_blocks(len(vit_parts(model).blocks)) if config.blocks is None else list(config.blocks)
    blocks = check_blocks("evit", model, blocks)
    return patch(model, "evit", {"keep_rate": config.keep_rate, "blocks": blocks}, _block_forward)
