"""Global allocation: which heads, channels and blocks to remove to meet a MAC budget.

Every unit gets a cost in MACs per image (analytic, the same multiply-accumulates
``torch.utils.flop_counter`` counts) and a score; units are removed in increasing order of
score per MAC across all layers (NViT's latency-aware global ranking) until the budget is met,
so a layer that matters little loses more than one that matters a lot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from vitslim.errors import ConfigError
from vitslim.models import ViTParts
from vitslim.prune.config import PruneConfig
from vitslim.prune.importance import Scores


@dataclass(frozen=True)
class Plan:
    """What survives, by original index: blocks, and per kept block its heads and channels."""

    blocks: tuple[int, ...]
    heads: dict[int, tuple[int, ...]]
    channels: dict[int, tuple[int, ...]]


def head_macs(tokens: int, dim: int, head_dim: int) -> int:
    """One head: its q, k, v rows and proj columns, plus q·kᵀ and attn·v."""
    return tokens * 4 * dim * head_dim + 2 * tokens * tokens * head_dim


def channel_macs(tokens: int, dim: int) -> int:
    """One MLP hidden channel: its fc1 row and fc2 column."""
    return tokens * 2 * dim


def fixed_macs(parts: ViTParts) -> int:
    """What pruning blocks cannot remove: the patch embedding and the head."""
    pe = parts.patch_proj
    macs = parts.num_patches * pe.weight[0].numel() * pe.out_channels if isinstance(pe, nn.Conv2d) else 0
    if isinstance(parts.head, nn.Linear):
        macs += parts.head.in_features * parts.head.out_features
    return macs


def block_costs(parts: ViTParts) -> list[tuple[int, int]]:
    """(MACs of one head, MACs of one MLP channel) per block."""
    tokens = parts.num_tokens
    return [(head_macs(tokens, bp.proj.out_features, bp.proj.in_features // bp.num_heads),
             channel_macs(tokens, bp.fc1.in_features)) for bp in parts.blocks]


def model_macs(parts: ViTParts) -> int:
    """MACs per image of the whole model (block linears, attention matmuls, embedding, head)."""
    return fixed_macs(parts) + sum(h * bp.num_heads + c * bp.fc1.out_features
                                   for (h, c), bp in zip(block_costs(parts), parts.blocks))


@dataclass
class _Unit:
    ratio: float
    kind: str  # "head", "channels" or "block"
    block: int
    members: tuple[int, ...]
    cost: int


def _units(parts: ViTParts, scores: Scores, config: PruneConfig) -> list[_Unit]:
    units = []
    for b, ((head_cost, channel_cost), bp) in enumerate(zip(block_costs(parts), parts.blocks)):
        if config.heads:
            for h in scores.heads[b].argsort().tolist():
                units.append(_Unit(float(scores.heads[b][h]) / head_cost, "head", b, (h,), head_cost))
        if config.mlp:
            order = scores.channels[b].argsort()
            g = config.channel_group
            for start in range(0, len(order) - len(order) % g, g):
                group = order[start:start + g]
                cost = channel_cost * len(group)
                units.append(_Unit(float(scores.channels[b][group].sum()) / cost, "channels", b,
                                   tuple(group.tolist()), cost))
        if config.blocks:
            cost = head_cost * bp.num_heads + channel_cost * bp.fc1.out_features
            units.append(_Unit(float(scores.blocks[b]) / cost, "block", b, (), cost))
    units.sort(key=lambda u: u.ratio)
    return units


def allocate(parts: ViTParts, scores: Scores, config: PruneConfig) -> Plan:
    """Remove the units with the least score per MAC until at most ``config.macs`` of the
    model's MACs remain; every kept block keeps ``min_heads`` heads, one channel group and
    ``min_width`` of its heads and channels."""
    total = model_macs(parts)
    target = (1 - config.macs) * total
    heads = {b: set(range(bp.num_heads)) for b, bp in enumerate(parts.blocks)}
    channels = {b: set(range(bp.fc1.out_features)) for b, bp in enumerate(parts.blocks)}
    floors = {b: (max(config.min_heads, math.ceil(config.min_width * len(heads[b]))),
                  max(config.channel_group, math.ceil(config.min_width * len(channels[b])))) for b in heads}
    costs = block_costs(parts)
    removed_blocks: set[int] = set()
    removed, taken = 0, []
    for unit in _units(parts, scores, config):
        if removed >= target:
            break
        b = unit.block
        if b in removed_blocks:
            continue
        if unit.kind == "block":
            removed_blocks.add(b)
            removed += costs[b][0] * len(heads[b]) + costs[b][1] * len(channels[b])
        elif unit.kind == "head" and len(heads[b]) > floors[b][0]:
            heads[b] -= set(unit.members)
            removed += unit.cost
            taken.append(unit)
        elif unit.kind == "channels" and len(channels[b]) - len(unit.members) >= floors[b][1]:
            channels[b] -= set(unit.members)
            removed += unit.cost
            taken.append(unit)
    # A removed block can overshoot the budget by much more than one unit: give back the most
    # important heads and channels that the budget no longer needs.
    for unit in reversed(taken):
        if unit.block not in removed_blocks and removed - unit.cost >= target:
            (heads if unit.kind == "head" else channels)[unit.block] |= set(unit.members)
            removed -= unit.cost
    if removed < target:
        raise ConfigError(
            f"macs={config.macs}: cannot remove {target / total:.0%} of the MACs with "
            f"{'heads ' if config.heads else ''}{'mlp ' if config.mlp else ''}{'blocks ' if config.blocks else ''}"
            f"pruning (reached {removed / total:.0%}); keep more MACs or enable more unit kinds")
    kept = tuple(b for b in range(len(parts.blocks)) if b not in removed_blocks)
    return Plan(kept, {b: tuple(sorted(heads[b])) for b in kept}, {b: tuple(sorted(channels[b])) for b in kept})


def uniform_plan(parts: ViTParts, keep_heads: list[int], keep_channels: list[int]) -> Plan:
    """The first ``keep_heads[b]`` heads and ``keep_channels[b]`` channels of every block (the
    structure a saved pruned model is rebuilt with, before its weights are loaded)."""
    return Plan(tuple(range(len(parts.blocks))),
                {b: tuple(range(n)) for b, n in enumerate(keep_heads)},
                {b: tuple(range(n)) for b, n in enumerate(keep_channels)})

