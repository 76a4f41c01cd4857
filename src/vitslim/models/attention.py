"""One attention computation for every method family.

Token reduction adds biases to the attention logits (token sizes, padding); quantization puts
quantizers on q, k, v and the softmax output. Both go through ``attention_forward``, so they
compose in either order: quantizers are found on the module (``attn.quant_sites``), biases
are passed in. Without quantizers it runs PyTorch's fused scaled-dot-product attention.

A model's own additive bias (BEiT's learned relative position bias) lives on the module
(``attn.position_bias``, a ``RelativePositionBias``) and is added on every path, so methods that
call the attention module directly (pruning's compensation, reconstruction) see it too.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from vitslim.errors import UnsupportedModelError

FLOAT_SITES = {site: nn.Identity() for site in ("q", "k", "softmax", "v")}


def attention_core(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q·kᵀ·scale + bias)·v for (B, H, N, D) tensors, quantized where ``attn`` says."""
    sites = getattr(attn, "quant_sites", None)
    softmax = getattr(attn, "softmax_op", None)  # I-ViT's Shiftmax (vitslim.quant.integer)
    if sites is None and softmax is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    sites = sites if sites is not None else FLOAT_SITES
    # Quantize the exact matmul operands (scaled q, transposed k) so that, exported, each
    # DequantizeLinear feeds the MatMul directly and ONNX Runtime fuses it into an int8 kernel.
    logits = sites["q"](q * attn.scale) @ sites["k"](k.transpose(-2, -1))
    if bias is not None:
        logits = logits + bias
    probs = softmax(logits) if softmax is not None else logits.softmax(dim=-1)
    return sites["softmax"](probs) @ sites["v"](v)


class RelativePositionBias(nn.Module):
    """A learned bias per head and token pair, ``table[index]``: BEiT's relative position bias
    (Bao et al., "BEiT: BERT Pre-Training of Image Transformers", 2022), where ``index[i, j]``
    names the 2D offset between patches i and j (with three extra entries for the class token).

    ``table`` is (entries, heads); ``index`` is (tokens, tokens). The bias is tied to the full
    token grid, so the attention it sits in needs exactly ``index``'s token count.
    """

    def __init__(self, table: torch.Tensor, index: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table.detach().clone())
        self.register_buffer("index", index.detach().clone().long())

    def forward(self, num_tokens: int) -> torch.Tensor:
        """The (1, heads, N, N) bias for ``num_tokens`` = N tokens."""
        if num_tokens != self.index.shape[0]:
            raise UnsupportedModelError(
                f"this attention's relative position bias covers {self.index.shape[0]} tokens, got "
                f"{num_tokens}: run the model at its own input size, without token reduction")
        n = self.index.shape[0]
        return self.table[self.index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1).unsqueeze(0)

    def keep_heads(self, keep: list[int]) -> None:
        """Keep only these heads' columns (head pruning)."""
        self.table = nn.Parameter(self.table.detach()[:, keep].clone())


def _with_position_bias(attn: nn.Module, num_tokens: int, bias: torch.Tensor | None) -> torch.Tensor | None:
    position_bias = getattr(attn, "position_bias", None)
    if position_bias is None:
        return bias
    own = position_bias(num_tokens)
    return own if bias is None else own + bias


def attention_forward(attn: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """A timm ``Attention`` on (B, N, C) through its own qkv/proj modules; returns
    (output, q, k, v) so methods can score tokens from q, k, v."""
    b, n, _ = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = attention_core(attn, q, k, v, _with_position_bias(attn, n, bias)).transpose(1, 2).reshape(b, n, -1)
    return attn.proj_drop(attn.proj(attn.norm(out))), q, k, v


def _routed_forward(attn: nn.Module, x: torch.Tensor, attn_mask=None, is_causal: bool = False, **_) -> torch.Tensor:
    return attention_forward(attn, x, attn_mask)[0]


def route_attention(attn: nn.Module) -> None:
    """Make a timm ``Attention`` run through ``attention_forward`` (in place), so the quantizers
    and ops methods put on it take effect. A bound method, so ``copy.deepcopy`` of the model
    gives a copy routed through its own modules."""
    attn.forward = types.MethodType(_routed_forward, attn)
