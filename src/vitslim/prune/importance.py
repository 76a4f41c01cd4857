"""How much each prunable unit (attention head, MLP channel, block) matters.

Three scores, all "larger = keep": ``magnitude`` (weights only), ``activation`` (weights and
the calibration images' activations) and ``hessian`` (second order, on the FP32 model's own
outputs). No labels are used anywhere.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from vitslim.models import ViTParts, vit_parts
from vitslim.progress import progress_bar


@dataclass
class Scores:
    """Per block: one score per head, per MLP hidden channel, and one for the whole block."""

    heads: list[torch.Tensor]
    channels: list[torch.Tensor]
    blocks: torch.Tensor


def layer_scale(ls: nn.Module, dim: int) -> torch.Tensor:
    """A block branch's LayerScale γ (DINOv2), or ones where the block has none."""
    gamma = getattr(ls, "gamma", None)
    return gamma.detach() if gamma is not None else torch.ones(dim)


def _head_sum(per_channel: torch.Tensor, num_heads: int) -> torch.Tensor:
    return per_channel.reshape(num_heads, -1).sum(1)


def _with_blocks(heads: list[torch.Tensor], channels: list[torch.Tensor]) -> Scores:
    blocks = torch.stack([h.sum() + c.sum() for h, c in zip(heads, channels)])
    return Scores(heads, channels, blocks)


@torch.no_grad()
def magnitude_scores(parts: ViTParts) -> Scores:
    """Squared L2 norm of every weight a unit owns: its q, k, v rows and proj columns for a
    head, its fc1 row and fc2 column for a channel (Torch-Pruning's default importance,
    "Towards Any Structural Pruning", Fang et al. 2023, with the L2 norm squared so that a
    unit's score adds up over its weights)."""
    heads, channels = [], []
    for bp in parts.blocks:
        attn_dim = bp.proj.in_features
        qkv_rows = bp.qkv.weight.pow(2).sum(1).reshape(3, attn_dim).sum(0)
        heads.append(_head_sum(qkv_rows + bp.proj.weight.pow(2).sum(0), bp.num_heads))
        channels.append(bp.fc1.weight.pow(2).sum(1) + bp.fc2.weight.pow(2).sum(0))
    return _with_blocks(heads, channels)


def _batches(images: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [images[i:i + batch_size] for i in range(0, len(images), batch_size)]


def _input_sums(model: nn.Module, layers: list[nn.Module], images: torch.Tensor, batch_size: int,
                stat: Callable[[torch.Tensor], torch.Tensor], label: str) -> tuple[dict, int]:
    """Σ of ``stat(x)`` over the calibration tokens x (rows: tokens) entering each of
    ``layers``, and how many tokens that is."""
    sums: dict[nn.Module, torch.Tensor] = {}
    tokens = [0]

    def hook(module, inputs):
        x = inputs[0].reshape(-1, inputs[0].shape[-1])
        sums[module] = sums.get(module, 0) + stat(x)
        if module is layers[0]:
            tokens[0] += len(x)

    handles = [m.register_forward_pre_hook(hook) for m in layers]
    try:
        for batch in progress_bar(_batches(images, batch_size), label):
            model.forward_features(batch)
    finally:
        for h in handles:
            h.remove()
    return sums, tokens[0]


@torch.no_grad()
def activation_scores(model: nn.Module, parts: ViTParts, images: torch.Tensor, batch_size: int) -> Scores:
    """Output energy of each unit: Σ over its input channels c of ‖γ ⊙ W[:, c]‖² · E[x_c²] for
    the layer consuming it (proj for heads, fc2 for MLP channels), γ the LayerScale.
    Wanda's weight × activation-norm score ("A Simple and Effective Pruning Approach for Large
    Language Models", Sun et al. 2023), per structure as in FLAP (An et al. 2024)."""
    layers = [m for bp in parts.blocks for m in (bp.proj, bp.fc2)]
    sums, tokens = _input_sums(model, layers, images, batch_size, lambda x: x.pow(2).sum(0),
                               "activation importance")
    heads, channels = [], []
    for bp in parts.blocks:
        dim = bp.proj.out_features
        for layer, ls, out in ((bp.proj, bp.ls1, heads), (bp.fc2, bp.ls2, channels)):
            weight = (layer_scale(ls, dim)[:, None] * layer.weight).pow(2).sum(0)
            out.append(weight * sums[layer] / tokens)
    heads = [_head_sum(h, bp.num_heads) for h, bp in zip(heads, parts.blocks)]
    return _with_blocks(heads, channels)


class _Gates:
    """Per-image multiplicative gates (all ones) on every head, MLP channel and block, so one
    backward pass gives the per-image gradient of the output with respect to removing each."""

    def __init__(self, parts: ViTParts, batch: int) -> None:
        self.parts = parts
        self.heads = [torch.ones(batch, bp.num_heads, requires_grad=True) for bp in parts.blocks]
        self.channels = [torch.ones(batch, bp.fc2.in_features, requires_grad=True) for bp in parts.blocks]
        self.blocks = torch.ones(batch, len(parts.blocks), requires_grad=True)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        handles = []
        for i, bp in enumerate(self.parts.blocks):
            head_dim = bp.proj.in_features // bp.num_heads
            handles.append(bp.proj.register_forward_pre_hook(
                lambda m, a, g=self.heads[i], d=head_dim: (a[0] * g.repeat_interleave(d, 1)[:, None, :],)))
            handles.append(bp.fc2.register_forward_pre_hook(
                lambda m, a, g=self.channels[i]: (a[0] * g[:, None, :],)))
            handles.append(bp.block.register_forward_hook(
                lambda m, a, out, i=i: a[0] + self.blocks[:, i, None, None] * (out - a[0])))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def grads(self) -> list[torch.Tensor]:
        return [*(g.grad for g in self.heads), *(g.grad for g in self.channels), self.blocks.grad]


def token_weights(num_tokens: int, num_prefix: int) -> torch.Tensor:
    """Weights of the feature-distillation loss per output token: the class token as much as
    all patch tokens together (the CLS feature is what most users of a backbone read)."""
    w = torch.full((num_tokens,), 1.0 / max(num_tokens - num_prefix, 1))
    w[:num_prefix] = 1.0
    return w


def hessian_scores(model: nn.Module, parts: ViTParts, images: torch.Tensor, batch_size: int,
                   probes: int, seed: int = 0) -> Scores:
    """Second-order saliency of removing each unit from the FP32 model, on the
    feature-distillation loss L = ½ Σ_t w_t ‖f_t − f_t^FP32‖² (f the final tokens).

    At the unpruned model L and its gradient are zero, so the saliency of removing a unit with
    gate m_u (1 → 0) is ½ H_uu with H the Gauss-Newton Hessian JᵀWJ (= the Fisher for a
    Gaussian output), summed over images: NViT, "Global Vision Transformer Pruning with
    Hessian-Aware Saliency" (Yang et al. 2023) and the Fisher mask saliency of Kwon et al.
    ("A Fast Post-Training Pruning Framework for Transformers", 2022). H_uu = E‖ε ᵀ J_u‖² with
    random probes ε ~ N(0, W): one backward pass per probe gives every unit's value."""
    gen = torch.Generator().manual_seed(seed)
    totals: list[torch.Tensor] | None = None
    weights = None
    batches = _batches(images, batch_size)
    params = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for batch in progress_bar([b for b in batches for _ in range(probes)], "hessian importance"):
            gates = _Gates(parts, len(batch))
            with gates.installed():
                out = model.forward_features(batch)
            if weights is None:
                weights = token_weights(out.shape[1], parts.num_prefix_tokens)
            probe = torch.randn(out.shape, generator=gen) * weights.sqrt()[None, :, None]
            (out * probe).sum().backward()
            squares = [0.5 * g.pow(2).sum(0) / probes for g in gates.grads()]
            totals = squares if totals is None else [t + s for t, s in zip(totals, squares)]
    finally:
        for p, flag in zip(model.parameters(), params):
            p.requires_grad_(flag)
    n = len(parts.blocks)
    return Scores(totals[:n], totals[n:2 * n], totals[2 * n])


@torch.no_grad()
def input_grams(model: nn.Module, parts: ViTParts, images: torch.Tensor,
                batch_size: int) -> dict[nn.Linear, torch.Tensor]:
    """E[x̃ x̃ᵀ] over the calibration tokens of every ``proj`` and ``fc2`` input, x̃ = (x, 1)
    (the ones column stands for the bias the refit also fits), in float64."""
    layers = [m for bp in parts.blocks for m in (bp.proj, bp.fc2)]

    def gram(x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x, torch.ones(len(x), 1)], 1)
        return (x.T @ x).double()

    sums, tokens = _input_sums(model, layers, images, batch_size, gram, "input statistics")
    return {m: g / tokens for m, g in sums.items()}


def _group_costs(w: torch.Tensor, hinv: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Output error each group of columns would add if removed now (OBS: ‖W_g (H⁻¹_gg)⁻¹ W_gᵀ‖)."""
    wg = w[:, groups].permute(1, 2, 0)  # (k, g, out)
    if groups.shape[1] == 1:  # single columns: the g × g solve is a division
        solved = wg / hinv[groups[:, 0], groups[:, 0]][:, None, None]
    else:
        solved = torch.linalg.solve(hinv[groups[:, :, None], groups[:, None, :]], wg)
    return (wg * solved).sum((1, 2))


def _obs_remove_(w: torch.Tensor, hinv: torch.Tensor, cols: torch.Tensor) -> None:
    """Remove columns ``cols``: the others and the bias absorb their output (OBS update)."""
    solved = torch.linalg.solve(hinv[cols[:, None], cols[None, :]], hinv[cols])
    w -= w[:, cols] @ solved
    hinv -= hinv[:, cols] @ solved
    w[:, cols] = 0


def removal_order(weight: torch.Tensor, gram: torch.Tensor, groups: torch.Tensor, gain: torch.Tensor,
                  step: int = 1, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy Optimal-Brain-Surgeon removal of input groups (rows of ``groups``, column
    indices) of a layer with output weight ``weight`` (out × in, LayerScale folded in) and
    input second moments ``gram`` ((in+1)², last = bias): each time, the group whose removal,
    after the least-squares update of the remaining columns and the bias, adds least output
    error × ``gain`` (loss per unit of output error) goes, and the weights and inverse Hessian
    are updated as OBS does (``damp`` × the inputs' mean square: the ridge of the update). For speed the
    full update runs every ``step`` removals; in between, the choice is exact among the
    4 × ``step`` cheapest groups. Returns the groups in removal order and the error each added."""
    n = gram.shape[0]
    scale = gram.diagonal()[:-1].mean()  # the inputs' own scale: the bias's constant 1 left out
    hinv = torch.linalg.inv(gram + damp * scale * torch.eye(n, dtype=gram.dtype))
    w = torch.cat([weight.double(), torch.zeros(weight.shape[0], 1, dtype=gram.dtype)], 1)
    gain = gain.double()
    alive = torch.ones(len(groups), dtype=torch.bool)
    order, added = [], []
    while alive.any():
        units = alive.nonzero()[:, 0]
        units = units[(_group_costs(w, hinv, groups[units]) * gain[units]).argsort()[:4 * step]]
        cols = groups[units].reshape(-1)  # the candidates' columns, renumbered 0.. in a sub-problem
        sub_w, sub_hinv = w[:, cols].clone(), hinv[cols[:, None], cols[None, :]].clone()
        sub_groups = torch.arange(len(cols)).reshape(len(units), -1)
        left = torch.ones(len(units), dtype=torch.bool)
        for _ in range(min(step, len(units))):
            cost = _group_costs(sub_w, sub_hinv, sub_groups[left]) * gain[units[left]]
            pick = int(left.nonzero()[int(cost.argmin()), 0])
            order.append(int(units[pick]))
            added.append(float(cost.min()))
            left[pick] = False
            _obs_remove_(sub_w, sub_hinv, sub_groups[pick])
        picked = units[~left]
        alive[picked] = False
        _obs_remove_(w, hinv, groups[picked].reshape(-1))
    return torch.tensor(order), torch.tensor(added, dtype=torch.float64)


def compensated_scores(model: nn.Module, parts: ViTParts, images: torch.Tensor, scores: Scores,
                       batch_size: int, channel_step: int = 32) -> Scores:
    """Scores of removing heads and channels when the consuming layer is refit afterwards
    (the compensation ``prune_`` applies): a unit whose output the remaining units can
    reproduce is cheap to remove even when its own output matters.

    Per layer (``proj`` for heads, ``fc2`` for channels), units are removed greedily by the
    Optimal Brain Surgeon rule (Hassibi & Stork, "Second order derivatives for network pruning:
    Optimal Brain Surgeon", 1993) applied to structures as in ZipLM (Kurtić et al., "ZipLM:
    Inference-Aware Structured Pruning of Language Models", 2023) and Kwon et al.'s mask
    rearrangement ("A Fast Post-Training Pruning Framework for Transformers", 2022): the cost of
    a removal is the layer's output error left after the least-squares update of the others,
    converted to the final-feature loss by the unit's own ratio of ``scores`` (Hessian
    saliency) to its uncompensated output energy (``channel_step``: channels per full OBS
    update, see ``removal_order``). Block scores are kept."""
    grams = input_grams(model, parts, images, batch_size)
    heads, channels = [], []
    for bp in progress_bar(parts.blocks, "refit-aware ranking"):
        for layer, ls, width, step, out in ((bp.proj, bp.ls1, bp.proj.in_features // bp.num_heads, 1, heads),
                                            (bp.fc2, bp.ls2, 1, channel_step, channels)):
            score = (scores.heads if out is heads else scores.channels)[bp.index]
            weight = layer_scale(ls, layer.out_features)[:, None] * layer.weight.detach()
            groups = torch.arange(layer.in_features).reshape(-1, width)
            gram = grams[layer]
            blocks = gram[groups[:, :, None], groups[:, None, :]]
            wg = weight.double()[:, groups].permute(1, 0, 2)
            energy = torch.einsum("kog,kgh,koh->k", wg, blocks, wg)
            gain = torch.where(energy > 0, score.double() / energy.clamp_min(1e-30), torch.zeros_like(energy))
            order, added = removal_order(weight, gram, groups, gain, step)
            # increasing along the removal order, so that sorting by score reproduces it
            rising = added.cummax(0).values * (1 + 1e-6 * torch.arange(len(added)) / len(added))
            out.append(torch.empty(len(order)).index_put_((order,), rising.float()))
    return Scores(heads, channels, scores.blocks)


def importance_scores(model: nn.Module, images: torch.Tensor, importance: str, batch_size: int = 8,
                      probes: int = 2) -> Scores:
    """Scores of ``importance`` (magnitude, activation or hessian) for every unit of ``model``."""
    parts = vit_parts(model)
    if importance == "magnitude":
        return magnitude_scores(parts)
    if importance == "activation":
        return activation_scores(model, parts, images, batch_size)
    return hessian_scores(model, parts, images, batch_size, probes)
