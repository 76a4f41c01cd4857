"""Train-free compensation: refit the layers that consume pruned units by least squares.

After heads or channels are removed, the block's output changes; the layer that reads them
(``proj`` for heads, ``fc2`` for MLP channels) is refit on the calibration images so that the
pruned model's residual stream follows the FP32 model's: Kwon et al., "A Fast Post-Training
Pruning Framework for Transformers" (2022) reconstruct layer outputs by least squares, and
FLAP (An et al., "Fluctuation-based Adaptive Structured Pruning for Large Language Models",
2024) compensates the lost mean through the bias; a full refit with a bias column does both.
Blocks run in order on the pruned model's own activations, and the target is the FP32 model's
residual stream, so a refit also absorbs the error left by earlier blocks. For a removed block
the next kept block's ``proj`` and ``fc2`` absorb its effect: a train-free form of FuseGPT's
fusion of a removed block into its neighbours (Pei et al., "FuseGPT: Learnable Layers Fusion of
Generative Pre-trained Transformers", 2024).

The refit is ridge regression towards the original weights; the ridge strength is chosen by
cross-validation over images of the calibration set (infinite strength, i.e. no refit, is
one candidate), so a refit that would not generalise is not made. The recovery's refit on more
images (``refit_pruned_``) starts again from the original weights, not from the calibration
refit: a prior fit on some of the images would look better than it is on every fold that
holds them, and the cross-validation would keep it.

With ``mirrors`` each image is also fitted as its horizontal mirror image (ViTs are trained with
flips, so a mirror is one more plausible image): twice the rows for the refits, which overfit
few images. An image and its mirror always fall in the same cross-validation fold.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from functools import partial

import torch
from torch import nn

from vitslim.models import BlockParts, vit_parts
from vitslim.progress import progress_bar
from vitslim.prune.allocate import Plan
from vitslim.prune.config import PruneConfig
from vitslim.prune.importance import layer_scale
from vitslim.prune.surgery import INDEX_KEYS, SHAPES_ATTR, head_channels

RIDGE = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # × mean diagonal of the Gram matrix
FOLDS = 4
CHUNK = 32  # views per forward pass


def _input_of(layer: nn.Module, run) -> torch.Tensor:
    """The input ``layer`` receives while ``run()`` runs."""
    seen = []
    handle = layer.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        run()
    finally:
        handle.remove()
    return seen[0]


def _with_mirrors(images: torch.Tensor) -> torch.Tensor:
    """Each image followed by its horizontal mirror (groups of 2 for the folds)."""
    return torch.stack([images, images.flip(-1)], 1).flatten(0, 1)


@torch.no_grad()
def chunked(fn, *tensors: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """``fn`` over ``size`` (default ``CHUNK``) views at a time, without gradients, concatenated:
    the attention and MLP intermediates of all the calibration views at once would take
    gigabytes (the MLP's hidden layer alone is 4× the residual stream)."""
    return torch.cat([fn(*parts) for parts in zip(*(t.split(size or CHUNK) for t in tensors))])


def _attn_half(bp: BlockParts, x: torch.Tensor) -> torch.Tensor:
    return x + bp.ls1(bp.attn(bp.norm1(x)))


def _mlp_half(bp: BlockParts, x: torch.Tensor) -> torch.Tensor:
    return x + bp.ls2(bp.mlp(bp.norm2(x)))


def _fold_stats(chunks: Iterable[tuple[torch.Tensor, torch.Tensor]], views: int, folds: int,
                group: int = 1) -> list[tuple[torch.Tensor, ...]]:
    """Per fold of source images: Gram XᵀX, XᵀY and Σ Y² per output (X with a ones column),
    summed over ``chunks`` of consecutive views ((x, y), (views, tokens, ·) each) of ``views``
    in all; the ``group`` views of each source image (itself and its mirror) share a fold."""
    sizes = [len(sources) * group for sources in torch.arange(views // group).chunk(folds)]
    fold_of_view = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    stats: list[tuple[torch.Tensor, ...] | None] = [None] * len(sizes)
    start = 0
    for x, y in chunks:
        ids, start = fold_of_view[start:start + len(x)], start + len(x)
        for fold in ids.unique().tolist():
            xf = x[ids == fold].reshape(-1, x.shape[-1])
            xf = torch.cat([xf, torch.ones(len(xf), 1)], 1)
            yf = y[ids == fold].reshape(-1, y.shape[-1])
            # float32 products (fast), float64 sums and solves
            part = ((xf.T @ xf).double(), (xf.T @ yf).double(), yf.double().pow(2).sum(0))
            stats[fold] = part if stats[fold] is None else tuple(a + b for a, b in zip(stats[fold], part))
    return stats


def _solve(gram: torch.Tensor, cross: torch.Tensor, w0: torch.Tensor, ridge: float) -> torch.Tensor:
    """argmin_W ‖XW − Y‖² + λ‖W − W0‖², by Cholesky (the system is positive definite)."""
    lam = ridge * gram.diagonal().mean()
    factor = torch.linalg.cholesky(gram + lam * torch.eye(len(gram), dtype=gram.dtype))
    return torch.cholesky_solve(cross + lam * w0, factor)


def _error(w: torch.Tensor, stat: tuple[torch.Tensor, ...], out_weight: torch.Tensor) -> float:
    gram, cross, y2 = stat
    per_output = ((gram @ w) * w).sum(0) - 2 * (cross * w).sum(0) + y2
    return float((out_weight * per_output).sum())


@torch.no_grad()
def refit_linear_(linear: nn.Linear, x: torch.Tensor, target: torch.Tensor, out_weight: torch.Tensor,
                  folds: int = FOLDS, group: int = 1) -> float | None:
    """Refit ``linear`` (weight and bias) so ``linear(x) ≈ target`` over (images, tokens, ·)
    tensors, the squared error of output d weighted by ``out_weight[d]``. Ridge towards the
    current weights, strength by cross-validation over images (``group`` consecutive images
    are views of one source image and share a fold); returns the strength used (None: the
    current weights generalise best and are kept)."""
    return _refit_from_stats_(linear, _fold_stats([(x, target)], len(x), folds, group), out_weight)


def _refit_from_stats_(linear: nn.Linear, stats: list[tuple[torch.Tensor, ...]],
                       out_weight: torch.Tensor) -> float | None:
    w0 = torch.cat([linear.weight.T, (linear.bias if linear.bias is not None
                                      else torch.zeros(linear.out_features))[None]]).double()
    total = [sum(s[i] for s in stats) for i in range(3)]
    best, best_err = None, sum(_error(w0, s, out_weight.double()) for s in stats)
    if len(stats) > 1:
        for ridge in RIDGE:
            err = sum(_error(_solve(total[0] - s[0], total[1] - s[1], w0, ridge), s, out_weight.double())
                      for s in stats)
            if err < best_err:
                best, best_err = ridge, err
    if best is not None:
        w = _solve(total[0], total[1], w0, best).float()
        linear.weight.copy_(w[:-1].T)
        if linear.bias is not None:
            linear.bias.copy_(w[-1])
    return best


def _refit_branch(layer: nn.Linear, ls: nn.Module, branch, x: torch.Tensor, target_stream: torch.Tensor,
                  group: int) -> None:
    """Refit ``layer`` (the last linear of ``branch``, before LayerScale γ) so that
    x + γ ⊙ branch(x) follows ``target_stream``: the per-output target is divided by γ and
    its error weighted by γ²."""
    gamma = layer_scale(ls, layer.out_features)
    safe = torch.where(gamma == 0, torch.ones_like(gamma), gamma)
    chunks = ((_input_of(layer, lambda xs=xs: branch(xs)), (ts - xs) / safe)
              for xs, ts in zip(x.split(CHUNK), target_stream.split(CHUNK)))
    _refit_from_stats_(layer, _fold_stats(chunks, len(x), FOLDS, group), gamma.pow(2))


Kept = tuple[list[int], list[int]]  # a kept block's original head and MLP channel indices


@torch.no_grad()
def compensate_(model: nn.Module, teacher: nn.Module, images: torch.Tensor, plan: Plan,
                kept: dict[int, Kept] | None = None, mirrors: bool = False) -> nn.Module:
    """Refit, block by block, the ``proj`` of blocks that lost heads and the ``fc2`` of blocks
    that lost MLP channels (and both in the block after a removed one), on ``images`` (and their
    mirror images with ``mirrors``). With ``kept`` (original block → its kept heads and
    channels), each refit first resets the layer to the teacher's columns of those units: the
    prior ``prune_`` refits towards."""
    group = 2 if mirrors else 1
    images = _with_mirrors(images) if mirrors else images
    student_blocks = dict(zip(plan.blocks, vit_parts(model).blocks))
    x_t = chunked(vit_parts(teacher).embed, images)
    x_s = x_t.clone()
    fuse = False
    teacher_blocks = vit_parts(teacher).blocks
    for i, tb in progress_bar(enumerate(teacher_blocks), "least-squares refit", total=len(teacher_blocks)):
        t_mid = chunked(partial(_attn_half, tb), x_t)
        t_out = chunked(partial(_mlp_half, tb), t_mid)
        sb = student_blocks.get(i)
        if sb is None:
            fuse = True
        else:
            x_s = _compensate_block(sb, tb, x_s, t_mid, t_out, fuse, kept.get(i) if kept else None, group)
            fuse = False
        x_t = t_out
    return model


@torch.no_grad()
def refit_pruned_(model: nn.Module, teacher: nn.Module, images: torch.Tensor) -> nn.Module:
    """``compensate_`` again for a model ``prune_`` made (the kept blocks, heads and channels read
    from ``model.vitslim_prune``), on other or more ``images``: every refit starts again from
    the original weights of the kept units, so the result is the compensation ``prune_`` would
    have made with these images (with mirror images if its ``PruneConfig.mirror_refit``), and
    the ridge cross-validation over them is fair (a prior fit on some of them would win every
    fold holding them). Folders saved before the kept units were recorded refit from their
    current weights, with a warning."""
    info = getattr(model, SHAPES_ATTR)
    plan = Plan(tuple(info["blocks"]), {}, {})
    mirrors = info.get("config", {}).get("mirror_refit", PruneConfig.mirror_refit)
    if not all(key in info for key in INDEX_KEYS):
        warnings.warn("this pruned model does not record which original heads and channels it keeps (saved by an "
                      "older vitslim): the refit starts from its current weights and its cross-validation favours "
                      "them; prune again to refit from the original weights", stacklevel=2)
        return compensate_(model, teacher, images, plan, mirrors=mirrors)
    kept = dict(zip(info["blocks"], zip(info["head_index"], info["channel_index"])))
    return compensate_(model, teacher, images, plan, kept, mirrors)


def _reset_columns_(layer: nn.Linear, original: nn.Linear, columns: torch.Tensor) -> None:
    layer.weight.copy_(original.weight[:, columns])
    if layer.bias is not None:
        layer.bias.copy_(original.bias)


def _compensate_block(sb: BlockParts, tb: BlockParts, x: torch.Tensor, t_mid: torch.Tensor,
                      t_out: torch.Tensor, fuse: bool, kept: Kept | None, group: int) -> torch.Tensor:
    if fuse or sb.num_heads < tb.num_heads:
        if kept:
            _reset_columns_(sb.proj, tb.proj, head_channels(kept[0], tb.proj.in_features // tb.num_heads))
        _refit_branch(sb.proj, sb.ls1, lambda xs: sb.attn(sb.norm1(xs)), x, t_mid, group)
    mid = chunked(partial(_attn_half, sb), x)
    if fuse or sb.fc1.out_features < tb.fc1.out_features:
        if kept:
            _reset_columns_(sb.fc2, tb.fc2, torch.tensor(kept[1], dtype=torch.long))
        _refit_branch(sb.fc2, sb.ls2, lambda ms: sb.mlp(sb.norm2(ms)), mid, t_out, group)
    return chunked(partial(_mlp_half, sb), mid)
