"""Patching mechanics shared by the token-reduction methods.

A method patches a timm ViT in place: each block gets an instance ``forward`` that shadows
its class's, and a forward pre-hook on the block sequence resets the per-pass state (token
sizes, padding mask). ``remove`` deletes the instance attributes and the hook, so the model is
the original again: same module objects, same weights, same code path.

The blocks keep their own ``qkv``/``proj``/``fc1``/``fc2`` Linear modules and call them, so a
quantizer can still wrap them before or after token reduction.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from vitslim.errors import ConfigError
from vitslim.models import BlockParts, vit_parts
from vitslim.models.adapter import parts_of_block
from vitslim.models.attention import attention_forward

STATE_ATTR = "_vitslim_tokens"


@dataclass
class TokenState:
    """Per-pass state shared by the patched blocks of one model."""

    method: str
    params: dict
    num_prefix: int  # class (+ distillation) tokens: never merged or dropped
    size: torch.Tensor | None = None  # (B, N, 1) patches represented by each token
    pad_mask: torch.Tensor | None = None  # (B, N) True where a token is real (ATS padding)
    image_counts: torch.Tensor | None = None  # (B,) real tokens per image after the last block
    counts: list[int] = field(default_factory=list)  # tokens after each block, last pass
    hook: object = None

    block_forward: Callable | None = None

    def reset(self) -> None:
        self.size, self.pad_mask, self.image_counts, self.counts = None, None, None, []

    def __call__(self, module: nn.Module, args: tuple) -> None:
        """Forward pre-hook of the block sequence: a new pass starts with fresh state."""
        self.reset()


def attention(attn: nn.Module, x: torch.Tensor, state: TokenState, prop_attn: bool) -> tuple[torch.Tensor, ...]:
    """The block's attention with proportional attention (log token size added to the keys'
    logits, ToMe) and the padding mask as biases; returns (output, q, k, v)."""
    bias = None
    if prop_attn and state.size is not None:
        bias = state.size.log()[:, None, None, :, 0]
    if state.pad_mask is not None:
        pad = torch.zeros_like(state.pad_mask, dtype=x.dtype).masked_fill(~state.pad_mask, float("-inf"))
        bias = pad[:, None, None, :] if bias is None else bias + pad[:, None, None, :]
    return attention_forward(attn, x, bias)


def class_attention(q: torch.Tensor, k: torch.Tensor, scale: float, pad_mask: torch.Tensor | None) -> torch.Tensor:
    """How much the class token attends to every token, per head: (B, H, N)."""
    logits = (q[:, :, :1] * scale) @ k.transpose(-2, -1)  # (B, H, 1, N): one row, cheap
    if pad_mask is not None:
        logits = logits.masked_fill(~pad_mask[:, None, None, :], float("-inf"))
    return logits.softmax(-1)[:, :, 0]


BlockForward = Callable[[BlockParts, torch.Tensor, TokenState], torch.Tensor]


def patch(model: nn.Module, method: str, params: dict, block_forward: BlockForward) -> nn.Module:
    """Give every block ``block_forward`` (with its parts, from the adapter, and the shared state).

    The patch is plain attributes and bound methods, so ``copy.deepcopy`` of a patched model
    gives an independent patched copy (quantization deep-copies models)."""
    if hasattr(model, STATE_ATTR):
        raise RuntimeError(
            f"model already has token reduction {getattr(model, STATE_ATTR).method!r} applied; "
            "call vitslim.tokens.remove(model) first (methods do not stack)")
    parts = vit_parts(model)
    state = TokenState(method, params, parts.num_prefix_tokens, block_forward=block_forward)
    for bp in parts.blocks:
        bp.block.vitslim_token_index = bp.index
        bp.block.vitslim_token_state = state
        bp.block.forward = types.MethodType(_patched_block_forward, bp.block)
    state.hook = model.blocks.register_forward_pre_hook(state)
    setattr(model, STATE_ATTR, state)
    return model


def _patched_block_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    state = block.vitslim_token_state
    out = state.block_forward(parts_of_block(block.vitslim_token_index, block), x, state)
    state.counts.append(out.shape[1])
    state.image_counts = (state.pad_mask.sum(1) if state.pad_mask is not None
                          else torch.full((out.shape[0],), out.shape[1]))
    return out


def remove(model: nn.Module) -> nn.Module:
    """Undo ``apply``: the model computes exactly what it did before."""
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        return model
    for bp in vit_parts(model).blocks:
        for attr in ("forward", "vitslim_token_index", "vitslim_token_state"):
            bp.block.__dict__.pop(attr, None)
    state.hook.remove()
    delattr(model, STATE_ATTR)
    return model


def token_state(model: nn.Module) -> TokenState | None:
    """The applied method's state (token counts of the last pass), or None."""
    return getattr(model, STATE_ATTR, None)


def mlp_residual(bp: BlockParts, x: torch.Tensor) -> torch.Tensor:
    return x + bp.drop_path2(bp.ls2(bp.mlp(bp.norm2(x))))


def attn_residual(bp: BlockParts, x: torch.Tensor, state: TokenState, prop_attn: bool) -> tuple[torch.Tensor, ...]:
    """The block's attention half: (x + attention, q, k, v)."""
    out, q, k, v = attention(bp.attn, bp.norm1(x), state, prop_attn)
    return x + bp.drop_path1(bp.ls1(out)), q, k, v


def num_tokens(model: nn.Module) -> int:
    """Tokens entering the first block (patches + prefix tokens)."""
    return vit_parts(model).num_tokens


def check_blocks(method: str, model: nn.Module, blocks: list[int]) -> list[int]:
    """Validate the block indices a method acts in."""
    depth = len(vit_parts(model).blocks)
    bad = [b for b in blocks if not 0 <= b < depth]
    if bad:
        raise ConfigError(f"{method}: blocks {bad} out of range for a {depth}-block model (0..{depth - 1})")
    return sorted(blocks)
