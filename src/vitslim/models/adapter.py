"""A uniform view of a ViT-family model's parts, for the method families to hook into.

Methods (quantization, token reduction, pruning) never walk a model by hand: they ask
``vit_parts(model)`` for the token embedding, the blocks and, per block, the attention (qkv,
proj and the softmax site), the MLP (fc1, the GELU site, fc2), the norms and layer scales.
Two registries make a new architecture pluggable: ``register_block_adapter`` maps a block
class to its ``BlockParts``; ``register_model_adapter`` maps a model class to its
``ViTParts`` (timm's ``VisionTransformer`` layout is the default; Hugging Face models register
theirs in ``vitslim.models.hf``, timm's BEiT in ``vitslim.models.beit``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from vitslim.errors import UnsupportedModelError


@dataclass(frozen=True)
class BlockParts:
    """The modules of one transformer block that methods act on.

    The softmax and GELU "sites" are where post-Softmax / post-GELU activations appear:
    ``attn`` owns the softmax (see ``vitslim.models.adapter.attention_softmax_site``),
    ``act`` is the GELU module between ``fc1`` and ``fc2``. A block computes
    ``x + drop_path1(ls1(attn(norm1(x))))`` then ``x + drop_path2(ls2(mlp(norm2(x))))``: methods that
    run a block themselves (token reduction) compose these parts.
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
    drop_path1: nn.Module = field(default_factory=nn.Identity)  # stochastic depth (training only)
    drop_path2: nn.Module = field(default_factory=nn.Identity)

    @property
    def num_heads(self) -> int:
        return self.attn.num_heads


@dataclass(frozen=True)
class ViTParts:
    """The whole model seen by methods: embedding, blocks, final norm, head.

    ``embed(images)`` gives the tokens entering the first block (prefix tokens first);
    ``patch_proj`` is the patch embedding's convolution (for MAC counts); ``num_patches`` is
    the patch-token count at the model's input size; ``stream_tensors`` are the parameters the
    embedding adds to the token stream besides ``patch_proj`` (class, register, distillation
    and mask tokens, position embeddings): what a rotation of the stream must rotate too.
    """

    model: nn.Module
    embed: Callable[[torch.Tensor], torch.Tensor]
    patch_proj: nn.Module
    num_patches: int
    blocks: list[BlockParts]
    norm: nn.Module
    head: nn.Module
    num_prefix_tokens: int
    stream_tensors: tuple[nn.Parameter, ...] = ()

    @property
    def num_tokens(self) -> int:
        """Tokens entering the first block (patches + prefix tokens)."""
        return self.num_patches + self.num_prefix_tokens

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
        drop_path1=block.drop_path1,
        drop_path2=block.drop_path2,
    )


def _register_timm() -> None:
    from timm.models.vision_transformer import Block

    register_block_adapter(Block)(_timm_vit_block)


_register_timm()


_MODEL_ADAPTERS: dict[type, Callable[[nn.Module], ViTParts]] = {}


def register_model_adapter(model_type: type) -> Callable:
    """Register a function mapping a model of this class to its ``ViTParts``."""

    def wrap(fn: Callable[[nn.Module], ViTParts]) -> Callable:
        _MODEL_ADAPTERS[model_type] = fn
        return fn

    return wrap


def parts_of_block(index: int, block: nn.Module) -> BlockParts:
    """``BlockParts`` of one block of a known type (read afresh: methods may have swapped its
    modules, e.g. quantized linears or rotated norms)."""
    return _BLOCK_ADAPTERS[type(block)](index, block)


def present_tensors(owner: nn.Module, names: tuple[str, ...]) -> tuple[nn.Parameter, ...]:
    """The named parameters ``owner`` has (None or absent ones left out)."""
    return tuple(t for t in (getattr(owner, name, None) for name in names) if t is not None)


def block_parts(blocks: nn.Module, model_name: str) -> list[BlockParts]:
    """``BlockParts`` of every block; ``UnsupportedModelError`` naming unknown block types, so a
    method never silently acts on part of a model."""
    if not isinstance(blocks, nn.Sequential) or len(blocks) == 0:
        raise UnsupportedModelError(
            f"{model_name} has no `blocks` sequence of transformer blocks; vitslim supports timm "
            "VisionTransformer models (ViT, DeiT, DINOv2), timm BEiT and Hugging Face ViT, DeiT, DINOv2 "
            "and BEiT models (hf:<id or folder>); other timm models (Swin, EfficientFormer, MobileViT, "
            "EfficientViT, ...) get W8A8 for ONNX Runtime with `vitslim apply int8-hybrid MODEL --data DIR "
            "--out model.onnx`."
        )
    unknown = sorted({type(b).__name__ for b in blocks if type(b) not in _BLOCK_ADAPTERS})
    if unknown:
        known = sorted(t.__name__ for t in _BLOCK_ADAPTERS)
        raise UnsupportedModelError(
            f"unsupported block type(s) {unknown} in {model_name}; vitslim has adapters for {known}."
        )
    return [parts_of_block(i, b) for i, b in enumerate(blocks)]


def _timm_vit(model: nn.Module) -> ViTParts:
    blocks = block_parts(getattr(model, "blocks", None), type(model).__name__)
    if not hasattr(model, "patch_embed") or not hasattr(model, "_pos_embed"):
        raise UnsupportedModelError(
            f"{type(model).__name__} has transformer blocks but not timm's VisionTransformer embedding "
            "(patch_embed + _pos_embed); supported: timm ViT, DeiT, DINOv2, BEiT and Hugging Face ViT, DeiT, "
            "DINOv2, BEiT (hf:<id or folder>).")

    def embed(images: torch.Tensor) -> torch.Tensor:  # VisionTransformer.forward_features' start
        return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))

    return ViTParts(
        model=model,
        embed=embed,
        patch_proj=model.patch_embed.proj,
        num_patches=model.patch_embed.num_patches,
        blocks=blocks,
        norm=model.norm,
        head=model.head,
        num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 1)),
        stream_tensors=present_tensors(model, ("cls_token", "reg_token", "pos_embed")),
    )


def vit_parts(model: nn.Module) -> ViTParts:
    """Describe a ViT-family model for vitslim's methods (timm's layout unless the model's
    class registered its own adapter).

    Raises ``UnsupportedModelError`` naming what it does not recognise, so a method never
    silently acts on part of a model.
    """
    adapter = next((fn for cls, fn in _MODEL_ADAPTERS.items() if isinstance(model, cls)), None)
    return adapter(model) if adapter is not None else _timm_vit(model)
