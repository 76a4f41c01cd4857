"""Shape changes: a pruned ViT is a smaller dense timm model, not a masked one.

Heads: the q, k and v rows of each removed head leave ``qkv``, its columns leave ``proj``, and
the attention's ``num_heads``/``attn_dim`` follow (timm's ``Attention.forward`` reshapes with
them; ``head_dim`` and the softmax scale are unchanged). MLP channels: ``fc1`` rows and
``fc2`` columns (and a relative position bias table its head columns, BEiT). Blocks: dropped
from ``model.blocks``. LayerScale (DINOv2) and the norms act
on the embedding dimension, which pruning keeps, so they stay valid as they are.
"""

from __future__ import annotations

import torch
from timm.layers import Mlp
from torch import nn

from vitslim.models import BlockParts, UnsupportedModelError, vit_parts
from vitslim.models.attention import route_attention
from vitslim.prune.allocate import Plan

SHAPES_ATTR = "vitslim_prune"
# which original heads / MLP channels every kept block keeps (what the recovery refit starts from)
INDEX_KEYS = ("head_index", "channel_index")


def _sliced(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    weight = linear.weight.detach()
    weight = weight[rows] if rows is not None else weight
    weight = weight[:, cols] if cols is not None else weight
    bias = linear.bias.detach() if linear.bias is not None else None
    bias = bias[rows] if bias is not None and rows is not None else bias
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def check_prunable(bp: BlockParts) -> None:
    """Refuse blocks whose extra parts would not follow the new shapes, naming the part."""
    extras = {"attention output norm (scale_norm)":
              not isinstance(getattr(bp.attn, "norm", nn.Identity()), nn.Identity),
              "gated attention": getattr(bp.attn, "gate", None) is not None,
              "non-standard MLP (GLU/SwiGLU)": type(bp.mlp) is not Mlp,
              "MLP hidden norm": not isinstance(getattr(bp.mlp, "norm", nn.Identity()), nn.Identity)}
    found = [name for name, present in extras.items() if present]
    if found:
        raise UnsupportedModelError(f"block {bp.index} has {', '.join(found)}; vitslim.prune handles plain "
                                    "timm ViT blocks (ViT, DeiT, DINOv2) for now")


def head_channels(keep: list[int], head_dim: int) -> torch.Tensor:
    """The attention channels (``proj`` columns) of heads ``keep``."""
    return torch.tensor([h * head_dim + i for h in keep for i in range(head_dim)], dtype=torch.long)


def prune_heads(bp: BlockParts, keep: list[int]) -> None:
    attn = bp.attn
    head_dim = bp.proj.in_features // attn.num_heads
    channels = head_channels(keep, head_dim)
    attn_dim = bp.proj.in_features
    rows = torch.cat([channels + s * attn_dim for s in range(3)])  # q, k, v sections of qkv
    attn.qkv = _sliced(bp.qkv, rows=rows)
    attn.proj = _sliced(bp.proj, cols=channels)
    attn.num_heads = len(keep)
    attn.head_dim = head_dim
    if getattr(attn, "position_bias", None) is not None:  # BEiT: one bias column per head
        attn.position_bias.keep_heads(keep)
    if hasattr(attn, "attn_dim"):
        attn.attn_dim = len(keep) * head_dim
    else:  # older timm reshapes with the input width: use vitslim's attention path
        route_attention(attn)


def prune_channels(bp: BlockParts, keep: list[int]) -> None:
    idx = torch.tensor(keep, dtype=torch.long)
    bp.mlp.fc1 = _sliced(bp.fc1, rows=idx)
    bp.mlp.fc2 = _sliced(bp.fc2, cols=idx)


def apply_plan(model: nn.Module, plan: Plan) -> nn.Module:
    """Make ``model`` (in place) the smaller model ``plan`` describes; records its shapes on
    ``model.vitslim_prune`` (what ``vitslim.save`` records)."""
    parts = vit_parts(model)
    for bp in parts.blocks:
        check_prunable(bp)
    for b in plan.blocks:
        bp = parts.blocks[b]
        if len(plan.heads[b]) != bp.num_heads:
            prune_heads(bp, list(plan.heads[b]))
        if len(plan.channels[b]) != bp.fc1.out_features:
            prune_channels(bp, list(plan.channels[b]))
    if len(plan.blocks) != len(parts.blocks):
        model.blocks = nn.Sequential(*(model.blocks[b] for b in plan.blocks))
        if len(getattr(model, "feature_info", [])) == len(parts.blocks):  # one entry per block (timm ViT)
            model.feature_info = [dict(info, module=f"blocks.{i}") for i, info in
                                  enumerate(model.feature_info[b] for b in plan.blocks)]
    previous = getattr(model, SHAPES_ATTR, None)
    original_blocks = previous["blocks"] if previous else list(range(len(parts.blocks)))
    info = shapes(model, [original_blocks[b] for b in plan.blocks])
    if previous is None:
        info.update(head_index=[list(plan.heads[b]) for b in plan.blocks],
                    channel_index=[list(plan.channels[b]) for b in plan.blocks])
    elif INDEX_KEYS[0] in previous:  # pruned again: indices into the already pruned model, mapped back
        info.update(head_index=[[previous["head_index"][b][h] for h in plan.heads[b]] for b in plan.blocks],
                    channel_index=[[previous["channel_index"][b][c] for c in plan.channels[b]] for b in plan.blocks])
    setattr(model, SHAPES_ATTR, info)
    return model


def shapes(model: nn.Module, original_blocks: list[int]) -> dict:
    """The shapes that define a pruned model: which original blocks it keeps, and per kept
    block its heads and MLP width."""
    parts = vit_parts(model)
    return {"blocks": list(original_blocks), "heads": [bp.num_heads for bp in parts.blocks],
            "mlp": [bp.fc1.out_features for bp in parts.blocks]}
