"""How much each prunable unit (attention head, MLP channel, block) matters.

Three scores, all "larger = keep": ``magnitude`` (weights only), ``activation`` (weights and
the calibration images' activations) and ``hessian`` (second order, on the FP32 model's own
outputs). No labels are used anywhere.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
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


@torch.no_grad()
def activation_scores(model: nn.Module, parts: ViTParts, images: torch.Tensor, batch_size: int) -> Scores:
    """Output energy of each unit: Σ over its input channels c of ‖γ ⊙ W[:, c]‖² · E[x_c²] for
    the layer consuming it (proj for heads, fc2 for MLP channels), γ the LayerScale.
    Wanda's weight × activation-norm score ("A Simple and Effective Pruning Approach for Large
    Language Models", Sun et al. 2023), per structure as in FLAP (An et al. 2024)."""
    sums = {bp.proj: 0.0 for bp in parts.blocks} | {bp.fc2: 0.0 for bp in parts.blocks}
    tokens = [0]

    def hook(module, inputs):
        x = inputs[0].reshape(-1, inputs[0].shape[-1])
        sums[module] = sums[module] + x.pow(2).sum(0)
        if module is parts.blocks[0].proj:
            tokens[0] += len(x)

    handles = [m.register_forward_pre_hook(hook) for m in sums]
    try:
        for batch in progress_bar(_batches(images, batch_size), "activation importance"):
            model.forward_features(batch)
    finally:
        for h in handles:
            h.remove()
    heads, channels = [], []
    for bp in parts.blocks:
        dim = bp.proj.out_features
        for layer, ls, out in ((bp.proj, bp.ls1, heads), (bp.fc2, bp.ls2, channels)):
            weight = (layer_scale(ls, dim)[:, None] * layer.weight).pow(2).sum(0)
            out.append(weight * sums[layer] / tokens[0])
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


def importance_scores(model: nn.Module, images: torch.Tensor, importance: str, batch_size: int = 8,
                      probes: int = 2) -> Scores:
    """Scores of ``importance`` (magnitude, activation or hessian) for every unit of ``model``."""
    parts = vit_parts(model)
    if importance == "magnitude":
        return magnitude_scores(parts)
    if importance == "activation":
        return activation_scores(model, parts, images, batch_size)
    return hessian_scores(model, parts, images, batch_size, probes)
