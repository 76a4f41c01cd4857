"""MCTF: multi-criteria token fusion with one-step-ahead attention.

Lee, Choi and Kim, "Multi-criteria Token Fusion with One-step-ahead Attention for Efficient
Vision Transformers", CVPR 2024 (official code: github.com/mlvlab/MCTF). Training-free use of
the paper's fusion rule; its fine-tuning (token-reduction consistency loss) is not implemented.

Like ToMe, tokens are split alternately into sets A and B and ``r`` tokens per block are fused
by bipartite matching, but the edge weight between a ∈ A and b ∈ B multiplies three criteria,
each a per-image normalised score in [0, 1] raised to the power ``1/τ`` (τ = 0 turns it off)::

    W(a, b) = ((1 + cos(x_a, x_b)) / 2) ** (1/τ_sim)       similarity of the tokens
            · (ā_min² / (ā_a · ā_b)) ** (1/τ_info)           informativeness
            · (s_min² / (s_a · s_b)) ** (1/τ_size)           size

with ``ā`` the attention a token receives (softmax probabilities, proportional attention,
averaged over heads and queries) and ``s`` the number of patches it already stands for: similar
tokens fuse first, but attentive tokens and tokens that already absorbed many are spared. The
paper's defaults are τ_sim = 1, τ_info = 20, τ_size = 40 (``r`` = 16 on DeiT-S); as in the
official code the exponent is 1/τ, so larger τ means a flatter, weaker criterion.

Matching is bidirectional, as in the paper: ⌊r/2⌋ A tokens fuse into their best B token, then
⌈r/2⌉ of the resulting B tokens into their best remaining A token (edge weights computed once,
as the official code does); ``bidirectional=False`` is ToMe's one-way A → B step. A fused
token is its members' average weighted by attention received × size (the official "pooling
type 1"); sizes add up, and proportional attention (log size added to the keys' logits) lets
a fused token weigh as the patches it stands for.

One-step-ahead attention (``one_step_ahead=True``): the tokens entering block l are scored on
themselves (similarity) and on block l's own attention over them (informativeness), not on the
previous block's attention. The paper then applies that attention to the fused tokens by fusing the attention
map (query rows averaged like the tokens, key columns summed) and multiplying it with the
fused tokens' values. Here block l's attention runs on the unfused tokens and its output is
fused along with them, before the MLP: the same computation except that a fused token averages
its members' exact attention outputs instead of reusing their attention rows on fused values,
and the attention stays the block's own (fused SDPA or quantized) path. With
``one_step_ahead=False`` (the paper's ablation) the tokens are fused after the MLP, scored on
the tokens leaving block l and block l's attention: one step behind for block l + 1.

Cost over ToMe: the informativeness criterion needs the attention probabilities, which the
fused attention kernel does not return, so each fusing block computes q·kᵀ and a softmax once
more (about +0.2 GMACs/image for ViT-S/14 at r = 13).
"""

from __future__ import annotations

import torch
from torch import nn

from vitslim.models import BlockParts
from vitslim.registry import register
from vitslim.tokens.common import TokenState, attn_residual, mlp_residual, patch
from vitslim.tokens.config import MCTFConfig
from vitslim.tokens.tome import (
    MergeStep,
    bipartite_merge,
    merge_wavg,
    prefix_counts,
    split_sets,
    take_tokens,
    tome_schedule,
)


def attention_received(q: torch.Tensor, k: torch.Tensor, scale: float, size: torch.Tensor | None) -> torch.Tensor:
    """How much attention each token receives, (B, N): the softmax probabilities of (B, H, N, D)
    ``q`` and ``k`` (with proportional attention when ``size`` is given), averaged over heads
    and queries."""
    logits = (q * scale) @ k.transpose(-2, -1)
    if size is not None:
        logits = logits + size.log()[:, None, None, :, 0]
    return logits.softmax(-1).mean(dim=(1, 2))


def mctf_scores(metric: torch.Tensor, received: torch.Tensor | None, size: torch.Tensor | None,
                tau_sim: float, tau_info: float, tau_size: float) -> torch.Tensor:
    """Edge weights (B, N_A, N_B) between the even (A) and odd (B) tokens of (B, N, C)
    ``metric``: similarity × informativeness × size criteria, each to the power 1/τ (τ = 0: off).

    ``received`` (B, N) is the attention each token receives, ``size`` (B, N, 1) the patches
    each stands for; either may be None when its criterion is off."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = (a @ b.transpose(-1, -2) + 1) / 2
    if tau_sim != 1:
        scores = scores ** (1 / tau_sim) if tau_sim else torch.ones_like(scores)
    # The other criteria are products of per-token factors: raise those, then take the outer product.
    factor = torch.ones_like(metric[..., 0])  # (B, N)
    if tau_info:
        received = received.clamp_min(torch.finfo(received.dtype).tiny)
        factor = factor * (received.amin(dim=1, keepdim=True) / received) ** (1 / tau_info)  # 1/attention, max 1
    if tau_size:
        size = size[..., 0]
        factor = factor * (size.amin(dim=1, keepdim=True) / size) ** (1 / tau_size)  # 1/size, max 1
    if tau_info or tau_size:
        scores = scores * factor[:, ::2, None] * factor[:, None, 1::2]
    return scores


def bidirectional_merge(scores: torch.Tensor, r: int, num_prefix: int):
    """``merge(x)`` fusing ``r`` tokens in two matching steps over edge ``scores``
    (B, N_A, N_B): ⌊r/2⌋ A tokens into their best B token, then ⌈r/2⌉ of the B tokens into
    their best remaining A token (the same edge weights, transposed). Prefix tokens are never
    merged and come first in the output."""
    prefix_a, prefix_b = prefix_counts(num_prefix)
    scores = scores[..., prefix_a:, prefix_b:]
    a_to_b = MergeStep(scores, r // 2)
    b_to_a = MergeStep(take_tokens(scores, a_to_b.unmerged_idx).transpose(-1, -2), r - r // 2)

    def merge(x: torch.Tensor) -> torch.Tensor:
        a, b, prefix = split_sets(x, prefix_a, prefix_b)
        a, b = a_to_b(a, b)
        b, a = b_to_a(b, a)
        return torch.cat([*prefix, a, b], dim=-2)

    return merge


def mctf_merge(scores: torch.Tensor, r: int, num_prefix: int, bidirectional: bool = True):
    """``merge(x)`` for edge ``scores`` (B, N_A, N_B), one-way (ToMe's) or bidirectional."""
    return (bidirectional_merge if bidirectional else bipartite_merge)(scores, r, num_prefix)


def fuse(merge, x: torch.Tensor, size: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fuse (B, N, C) tokens: each fused token is the average of its members weighted by
    ``weight`` × ``size`` (both (B, N, 1)); returns the fused tokens and their sizes (sums).
    With a constant ``weight`` this is ToMe's size-weighted average."""
    x, _ = merge_wavg(merge, x, size * weight)
    return x, merge(size)


def _fuse_tokens(bp: BlockParts, x: torch.Tensor, metric: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                 state: TokenState, r: int) -> torch.Tensor:
    p = state.params
    if state.size is None:
        state.size = torch.ones_like(x[..., :1])
    received = attention_received(q, k, bp.attn.scale, state.size)
    scores = mctf_scores(metric, received, state.size, p["tau_sim"], p["tau_info"], p["tau_size"])
    merge = mctf_merge(scores, r, state.num_prefix, p["bidirectional"])
    x, state.size = fuse(merge, x, state.size, received[..., None])
    return x


def _block_forward(bp: BlockParts, x: torch.Tensor, state: TokenState) -> torch.Tensor:
    r, ahead = state.params["schedule"][bp.index], state.params["one_step_ahead"]
    tokens_in = x
    x, q, k, _ = attn_residual(bp, x, state, prop_attn=True)
    if r and ahead:  # scored on the tokens entering the block and this block's attention over them
        x = _fuse_tokens(bp, x, tokens_in, q, k, state, r)
    x = mlp_residual(bp, x)
    if r and not ahead:  # scored on the tokens leaving the block and the attention they went through
        x = _fuse_tokens(bp, x, x, q, k, state, r)
    return x


@register(MCTFConfig, step="tokens", stage=1, method="mctf")
def mctf_(model: nn.Module, config: MCTFConfig) -> nn.Module:
    """Patch ``model`` in place with MCTF (Lee et al., "Multi-criteria Token Fusion with
    One-step-ahead Attention for Efficient Vision Transformers", 2024): fuse ``config.r`` tokens per block (or
    ``r[i]`` in block ``i``), at most half of the non-prefix tokens a block has. An int ``r``
    fuses in every block, as ToMe does; the paper spares the first block (DeiT-S:
    ``r=[0] + [16] * 11``). ``tau_*`` (>= 0, 0 turns a criterion off) temper the similarity,
    informativeness and size criteria."""
    schedule = tome_schedule(model, config.r, method="mctf")
    params = {"schedule": schedule, "tau_sim": config.tau_sim, "tau_info": config.tau_info,
              "tau_size": config.tau_size, "one_step_ahead": config.one_step_ahead,
              "bidirectional": config.bidirectional}
    return patch(model, "mctf", params, _block_forward)
