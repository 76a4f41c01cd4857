"""One attention computation for every method family.

Token reduction adds biases to the attention logits (token sizes, padding); quantization puts
quantizers on q, k, v and the softmax output. Both go through ``attention_forward``, so they
compose in either order: quantizers are found on the module (``attn.quant_sites``), biases
are passed in. Without quantizers it runs PyTorch's fused scaled-dot-product attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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


def attention_forward(attn: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """A timm ``Attention`` on (B, N, C) through its own qkv/proj modules; returns
    (output, q, k, v) so methods can score tokens from q, k, v."""
    b, n, _ = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = attention_core(attn, q, k, v, bias).transpose(1, 2).reshape(b, n, -1)
    return attn.proj_drop(attn.proj(attn.norm(out))), q, k, v


def route_attention(attn: nn.Module) -> None:
    """Make a timm ``Attention`` run through ``attention_forward`` (in place), so the quantizers
    and ops methods put on it take effect."""
    def forward(x: torch.Tensor, attn_mask=None, is_causal: bool = False, **_) -> torch.Tensor:
        return attention_forward(attn, x, attn_mask)[0]

    attn.forward = forward
