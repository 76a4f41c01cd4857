"""ToMe: token merging by bipartite soft matching.

Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023. In every block, after
attention, tokens are split alternately into sets A and B; each A token is linked to its most
similar B token (cosine of the attention keys averaged over heads); the ``r`` most similar
links are merged by a size-weighted average. Token sizes are tracked and added as log(size)
to the attention logits (proportional attention), so a merged token weighs as the patches it
stands for.
"""

from __future__ import annotations

import torch
from torch import nn

from vitslim.errors import ConfigError
from vitslim.models import BlockParts, vit_parts
from vitslim.registry import register
from vitslim.tokens.common import TokenState, attn_residual, mlp_residual, num_tokens, patch
from vitslim.tokens.config import ToMeConfig


def bipartite_soft_matching(metric: torch.Tensor, r: int, num_prefix: int):
    """Return ``merge(x)`` that merges ``r`` tokens of (B, N, C) tensors like ``metric``.

    Prefix tokens (class, distillation) are never merged. Follows the paper's algorithm:
    alternate A/B split, best B match per A token, merge the ``r`` best-matched A tokens.
    """
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = alternate(metric, 0), alternate(metric, 1)
    return bipartite_merge(a @ b.transpose(-1, -2), r, num_prefix)


def alternate(x: torch.Tensor, start: int) -> torch.Tensor:
    """Every other token of (B, N, C) ``x`` from ``start``: ``x[:, start::2]`` as one Gather of
    whole rows (exported, a strided Slice runs element by element in OpenVINO)."""
    return x.index_select(-2, torch.arange(start, x.shape[-2], 2, device=x.device))


def take_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[b, idx[b, j]]`` for (B, N, C) ``x`` and (B, K) ``idx``: one Gather of whole rows of the
    flattened batch (exported, ``gather`` needs its index broadcast to (B, K, C) and runs
    element by element)."""
    n, t, c = x.shape
    rows = idx + torch.arange(n, device=idx.device)[:, None] * t
    return x.reshape(n * t, c).index_select(0, rows.reshape(-1)).reshape(n, -1, c)


def bipartite_merge(scores: torch.Tensor, r: int, num_prefix: int):
    """``merge(x)`` for edge ``scores`` (B, N_A, N_B) between the even (A) and odd (B) tokens:
    the ``r`` A tokens with the highest-scoring edge are added into their B token."""
    prefix_a, prefix_b = prefix_counts(num_prefix)
    step = MergeStep(scores[..., prefix_a:, prefix_b:], r)

    def merge(x: torch.Tensor) -> torch.Tensor:
        a, b, prefix = split_sets(x, prefix_a, prefix_b)
        return torch.cat([*prefix, *step(a, b)], dim=-2)

    return merge


def prefix_counts(num_prefix: int) -> tuple[int, int]:
    """How many prefix tokens (class, distillation) fall in A and in B: tokens 0, 2, .. are A's,
    1, 3, .. B's. They take no part in the matching (their rows and columns of the scores are
    left out), so they are never merged and receive no merge."""
    return (num_prefix + 1) // 2, num_prefix // 2


def split_sets(x: torch.Tensor, prefix_a: int, prefix_b: int) -> tuple[torch.Tensor, torch.Tensor, list]:
    """The A and B tokens of (B, N, C) ``x`` without their prefix tokens, and the prefix tokens
    as the merged output starts with them (timm pools x[:, 0] or x[:, num_prefix:])."""
    a, b = alternate(x, 0), alternate(x, 1)
    prefix = [t[..., :p, :] for t, p in ((a, prefix_a), (b, prefix_b)) if p]
    return a[..., prefix_a:, :], b[..., prefix_b:, :], prefix


class MergeStep:
    """One matching step: each row (source token) of ``scores`` (B, S, D) is linked to its
    best column (destination token); the ``r`` best-linked sources merge into their
    destinations. Calling it on (B, S, C) sources and (B, D, C) destinations returns the
    unmerged sources (in their original order) and the destinations with the merged added."""

    def __init__(self, scores: torch.Tensor, r: int) -> None:
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        self.r = r
        self.unmerged_idx = edge_idx[..., r:, 0].sort(dim=1).values  # keep token order (prefix first)
        self.src_idx = edge_idx[..., :r, :]
        self.dst_idx = take_tokens(node_idx[..., None], self.src_idx[..., 0])

    def __call__(self, src: torch.Tensor, dst: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, _, c = src.shape
        r = self.r
        unm = take_tokens(src, self.unmerged_idx)
        src = take_tokens(src, self.src_idx[..., 0])
        # scatter_add, not scatter_reduce(sum): the TorchScript ONNX exporter wraps scatter_reduce
        # in an If whose branch outputs lose their types in a static-batch export (unloadable).
        return unm, dst.scatter_add(-2, self.dst_idx.expand(n, r, c), src)


def merge_wavg(merge, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge by size-weighted average; return the merged tokens and their new sizes."""
    x = merge(x * size)
    size = merge(size)
    return x / size, size


def _block_forward(bp: BlockParts, x: torch.Tensor, state: TokenState) -> torch.Tensor:
    prop_attn = state.params["prop_attn"]
    x, _, k, _ = attn_residual(bp, x, state, prop_attn)
    r = state.params["schedule"][bp.index]
    if r > 0:
        if state.size is None:
            state.size = torch.ones_like(x[..., :1])
        merge = bipartite_soft_matching(k.mean(1), r, state.num_prefix)
        x, state.size = merge_wavg(merge, x, state.size)
    return mlp_residual(bp, x)


def tome_schedule(model: nn.Module, r: int | tuple[int, ...], method: str = "tome") -> list[int]:
    """Per-block merge counts: a constant ``r`` or an explicit list, checked against the tokens
    each block has (ToMe can merge at most half of the non-prefix tokens per block); errors
    name ``method``."""
    depth = len(vit_parts(model).blocks)
    schedule = [r] * depth if isinstance(r, int) else list(r)
    if len(schedule) != depth:
        raise ConfigError(f"{method}: schedule has {len(schedule)} entries but the model has {depth} blocks")
    tokens = num_tokens(model)
    prefix = getattr(model, "num_prefix_tokens", 1)
    for i, ri in enumerate(schedule):
        if ri < 0:
            raise ConfigError(f"{method}: r must be >= 0, got {ri} at block {i}")
        limit = (tokens - prefix) // 2
        if ri > limit:
            raise ConfigError(f"{method}: r={ri} at block {i} exceeds the {limit} tokens that can merge there "
                             f"({tokens} tokens enter it); lower r")
        tokens -= ri
    return schedule


@register(ToMeConfig, step="tokens", stage=1, method="tome")
def tome_(model: nn.Module, config: ToMeConfig) -> nn.Module:
    """Patch ``model`` in place with ToMe (Bolya et al., "Token Merging: Your ViT But Faster",
    2023): merge ``config.r`` tokens per block (or ``r[i]`` in block ``i``)."""
    schedule = tome_schedule(model, config.r)
    return patch(model, "tome", {"schedule": schedule, "prop_attn": config.prop_attn}, _block_forward)
