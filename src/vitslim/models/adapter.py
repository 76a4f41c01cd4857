"""A uniform view of a ViT-family model's parts, for the method families to hook into.

Methods (quantization, token reduction, pruning) never walk a timm model by hand: they ask
``vit_parts(model)`` for the blocks and, per block, the attention (qkv, proj and the softmax
site), the MLP (fc1, the GELU site, fc2), the norms and layer scales. New architectures
(Swin, EfficientFormer, MobileViT) plug in by registering an adapter for their block type.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from vitslim.errors import UnsupportedModelError


@dataclass(frozen=True)
class BlockParts:
    """The modules of one transformer block that methods act on.

    The softmax and GELU "sites" are where post-Softmax / post-GELU activations appear:
    ``attn`` owns the softmax (see ``vitslim.models.adapter.attention_softmax_site``),
    ``act`` is the GELU module between ``fc1`` and ``fc2``.
    """

    index: int
    block: nn.Module
    norm1: nn.LayerNorm
    attn: nn.Module
    qkv: nn.Linear
    proj: nn.Linear
    ls1: nn.Module
    norm2: nn.LayerNorm
    mlp: nn.Module
    fc1: nn.Linear
    act: nn.Module
    fc2: nn.Linear
    ls2: nn.Module

    @property
    def num_heads(self) -> int:
        return self.attn.num_heads


@dataclass(frozen=True)
class ViTParts:
    """The whole model seen by methods: embedding, blocks, final norm, head."""

    model: nn.Module
    patch_embed: nn.Module
    blocks: list[BlockParts]
    norm: nn.Module
    head: nn.Module
    num_prefix_tokens: int

    @property
    def linears(self) -> dict[str, nn.Linear]:
        """Every block linear by its qualified name (patch embedding and head excluded)."""
        names = {id(m): n for n, m in self.model.named_modules()}
        return {
            names[id(lin)]: lin
            for b in self.blocks
            for lin in (b.qkv, b.proj, b.fc1, b.fc2)
        }


_BLOCK_ADAPTERS: dict[type, Callable[[int, nn.Module], BlockParts]] = {}


def register_block_adapter(block_type: type) -> Callable:
    """Register a function mapping (index, block) to ``BlockParts`` for a block class."""

    def wrap(fn: Callable[[int, nn.Module], BlockParts]) -> Callable:
        _BLOCK_ADAPTERS[block_type] = fn
        return fn

    return wrap


def _timm_vit_block(index: int, block: nn.Module) -> BlockParts:
    return BlockParts(
        index=index,
        block=block,
        norm1=block.norm1,
        attn=block.attn,
        qkv=block.attn.qkv,
        proj=block.attn.proj,
        ls1=block.ls1,
        norm2=block.norm2,
        mlp=block.mlp,
        fc1=block.mlp.fc1,
        act=block.mlp.act,
        fc2=block.mlp.fc2,
        ls2=block.ls2,
    )


def _register_timm() -> None:
    from timm.models.vision_transformer import Block

    register_block_adapter(Block)(_timm_vit_block)


_register_timm()


def vit_parts(model: nn.Module) -> ViTParts:
    """Describe a ViT-family model for vitslim's methods.

    Raises ``UnsupportedModelError`` naming the block types it does not recognise, so a
    method never silently acts on part of a model.
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None or not isinstance(blocks, nn.Sequential) or len(blocks) == 0:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no `blocks` sequence of transformer blocks; vitslim "
            "supports timm VisionTransformer models (ViT, DeiT, DINOv2) for now."
        )
    unknown = sorted({type(b).__name__ for b in blocks if type(b) not in _BLOCK_ADAPTERS})
    if unknown:
        known = sorted(t.__name__ for t in _BLOCK_ADAPTERS)
        raise UnsupportedModelError(
            f"unsupported block type(s) {unknown} in {type(model).__name__}; "
            f"vitslim has adapters for {known}."
        )
    parts = [_BLOCK_ADAPTERS[type(b)](i, b) for i, b in enumerate(blocks)]
    return ViTParts(
        model=model,
        patch_embed=model.patch_embed,
        blocks=parts,
        norm=model.norm,
        head=model.head,
        num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 1)),
    )
