"""timm's BEiT (``timm.models.beit.Beit``) in vitslim's block layout.

timm's BEiT attention adds its q/v biases outside its ``qkv`` Linear (``F.linear`` with a bias
concatenated on the fly, the key's part a zero buffer), so a quantizer put on ``qkv`` would be
bypassed. ``rewire_beit_`` replaces each block, in place, by a timm ViT block that reuses the
block's norms, MLP, projection and layer scales, with one ``qkv`` Linear carrying [q_bias, 0,
v_bias], and the relative position bias (the block's own table plus the model's shared one:
one index reads both, so their sum is one table) as ``attn.position_bias``. The model keeps
timm's embedding, pooling (mean of patches + ``fc_norm``, or CLS) and head. ``load_model``
rewires timm BEiTs itself.

Bao et al., "BEiT: BERT Pre-Training of Image Transformers", 2022.
"""

from __future__ import annotations

import torch
from timm.layers import Mlp
from timm.models.beit import Beit
from timm.models.vision_transformer import Block
from torch import nn

from vitslim.errors import UnsupportedModelError
from vitslim.models.adapter import (
    ViTParts,
    _timm_vit_block,
    block_parts,
    present_tensors,
    register_block_adapter,
    register_model_adapter,
)
from vitslim.models.attention import RelativePositionBias, route_attention


class BeitBlock(Block):
    """A timm ViT block that timm's ``Beit`` can call: the shared relative position bias it
    passes is already folded into each block's own table by ``rewire_beit_``."""

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if shared_rel_pos_bias is not None:
            raise UnsupportedModelError("this BEiT block already holds the shared relative position bias; "
                                        "the model's rel_pos_bias must be None after rewire_beit_")
        return super().forward(x, **kwargs)


register_block_adapter(BeitBlock)(_timm_vit_block)


def _fused_qkv(attn: nn.Module) -> nn.Linear:
    qkv = nn.Linear(attn.qkv.in_features, attn.qkv.out_features, bias=attn.q_bias is not None)
    with torch.no_grad():
        qkv.weight.copy_(attn.qkv.weight)
        if attn.q_bias is not None:
            qkv.bias.copy_(torch.cat((attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias)))
    return qkv


def _position_bias(attn: nn.Module, shared: nn.Module | None) -> RelativePositionBias | None:
    owners = [m for m in (attn, shared) if m is not None and getattr(m, "relative_position_bias_table", None)
              is not None]
    if not owners:
        return None
    return RelativePositionBias(sum(m.relative_position_bias_table.detach() for m in owners),
                                owners[0].relative_position_index)


def _vitslim_block(block: nn.Module, shared: nn.Module | None) -> BeitBlock:
    attn = block.attn
    dim = block.norm1.normalized_shape[0]
    if attn.qkv.in_features * 3 != attn.qkv.out_features:
        raise UnsupportedModelError(f"BEiT with attn_head_dim × heads ≠ embed_dim ({dim}) is not supported")
    if type(block.mlp) is not Mlp:
        raise UnsupportedModelError(f"BEiT with a {type(block.mlp).__name__} MLP is not supported: only timm's Mlp")
    if attn.qkv_bias_separate:
        raise UnsupportedModelError("BEiT with qkv_bias_separate is not supported")
    layer_scale = block.gamma_1 is not None
    new = BeitBlock(dim, attn.num_heads, mlp_ratio=block.mlp.fc1.out_features / dim, qkv_bias=True,
                    init_values=1.0 if layer_scale else None)
    new.norm1, new.norm2, new.mlp = block.norm1, block.norm2, block.mlp
    new.attn.qkv, new.attn.proj, new.attn.scale = _fused_qkv(attn), attn.proj, attn.scale
    new.drop_path1, new.drop_path2 = block.drop_path1, block.drop_path2
    if layer_scale:
        new.ls1.gamma, new.ls2.gamma = block.gamma_1, block.gamma_2
    position_bias = _position_bias(attn, shared)
    if position_bias is not None:
        new.attn.position_bias = position_bias
        route_attention(new.attn)  # timm's own forward would not add it
    return new.train(block.training)


def rewire_beit_(model: Beit) -> Beit:
    """Put ``model``'s blocks (in place) into vitslim's layout (see module doc); returns it."""
    if isinstance(model.blocks, nn.Sequential) and all(type(b) is BeitBlock for b in model.blocks):
        return model  # already rewired
    shared = model.rel_pos_bias
    model.blocks = nn.Sequential(*(_vitslim_block(b, shared) for b in model.blocks))
    model.rel_pos_bias = None
    return model


@register_model_adapter(Beit)
def _beit_parts(model: Beit) -> ViTParts:
    if not (isinstance(model.blocks, nn.Sequential) and all(type(b) is BeitBlock for b in model.blocks)):
        raise UnsupportedModelError(
            "timm Beit blocks add their q/v bias outside the qkv Linear, so methods cannot act on them as they "
            "are: call vitslim.models.beit.rewire_beit_(model) first (vitslim.models.load_model does)")

    def embed(images: torch.Tensor) -> torch.Tensor:  # Beit.forward_features' start
        x = model.patch_embed(images)
        x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return model.pos_drop(x + model.pos_embed if model.pos_embed is not None else x)

    return ViTParts(
        model=model,
        embed=embed,
        patch_proj=model.patch_embed.proj,
        num_patches=model.patch_embed.num_patches,
        blocks=block_parts(model.blocks, "timm Beit"),
        norm=model.norm,
        head=model.head,
        num_prefix_tokens=model.num_prefix_tokens,
        stream_tensors=present_tensors(model, ("cls_token", "pos_embed")),
    )
