"""Recovery by self-distillation: a short fine-tune of the pruned model on unlabeled images,
matching the FP32 teacher's output tokens.

Why the learning rate is small: Adam's first steps move every weight by about ``lr`` whatever
its gradient's size (the update is m/√v ≈ sign of the gradient), and DINOv2's weights are small
(mean |w| 0.005 in the patch embedding, 0.01 in fc2) with fan-ins up to 1536, so a step of
5e-5 on the noisy gradient of 8 images moves whole layers coherently and costs fidelity on
held-out images. Steps of a few 1e-6 on the blocks' linear layers only (qkv, proj, fc1, fc2:
the layers pruning changed) do not, so recovery trains those layers and leaves the embeddings,
norms and LayerScale as the teacher has them (self-distillation as in DeiT, Touvron et al. 2021;
block reconstruction as in BRECQ, Li et al. 2021).

Resumable: with ``checkpoint_dir``, the weights, the optimizer state and the step are saved
every ``checkpoint_every`` steps (safetensors + JSON, written atomically); calling ``recover_``
again with the same arguments continues where it stopped and ends where an uninterrupted run
would (batches and augmentation are drawn from the step number, not from a running generator).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from vitslim.data import calibration_images, calibration_split
from vitslim.errors import ConfigError
from vitslim.models import vit_parts
from vitslim.output import write_json
from vitslim.progress import progress_bar
from vitslim.prune.compensate import chunked, refit_pruned_
from vitslim.prune.importance import token_weights
from vitslim.prune.surgery import SHAPES_ATTR

STATE_FILE, META_FILE = "recover.safetensors", "recover.json"


LOSSES = ("cosine", "mse")
AUGMENTS = ("crop", "flip", "none")


@dataclass(frozen=True)
class RecoverConfig:
    """``steps`` of AdamW (``lr``, linear warm-up over the first 5 %, cosine decay to 0) on
    batches of ``batch_size`` images. ``loss``: ``cosine`` (1 − cosine of the class token plus
    the mean 1 − cosine of the patch tokens, each side as much) or ``mse`` (squared error of the
    tokens, the same weights). ``augment``: ``crop`` (random resized crops of 35-100 % of the
    image and horizontal flips, so a few hundred images give many different views), ``flip``
    or ``none``. ``train_all`` also trains the patch embedding, position and class embeddings,
    norms and LayerScale (by default only the blocks' linear layers learn). ``refit``: before
    the first step, a model ``prune_`` made gets its least-squares refits again on every
    recovery image (``vitslim.prune.compensate.refit_pruned_``), from the original weights of the
    kept units (as if calibrated on these images): the refits overfit the few calibration images,
    and more images is what they need most; at most ``refit_images`` of them (a seeded draw),
    as the refits hold every image and its mirror in memory and their time grows with them
    (DINOv2 ViT-S/14 at 224 on 2 cores: about 8 MB and 0.5 s an image). ``block_iters``: then, block by
    block, ``block_iters`` Adam steps at ``block_lr`` teach each pruned block (qkv, proj, fc1,
    fc2) to output the FP32 residual stream on the pruned model's own input (block
    reconstruction, BRECQ), before the end-to-end steps; off by default, since after the refit
    it did not raise the held-out fidelity of a pruned DINOv2."""

    steps: int = 200
    batch_size: int = 8
    lr: float = 3e-6
    weight_decay: float = 0.0
    loss: str = "mse"
    augment: str = "flip"
    train_all: bool = False
    checkpoint_every: int = 20
    seed: int = 0
    refit: bool = True
    refit_images: int = 512
    block_iters: int = 0  # off: it helped on a CV fold but not on the evaluation images (docstring)
    block_lr: float = 1e-4

    def __post_init__(self) -> None:
        if (self.steps < 0 or self.batch_size < 1 or self.checkpoint_every < 1 or not self.lr > 0
                or self.block_iters < 0 or not self.block_lr > 0 or self.refit_images < 2):
            raise ConfigError(f"invalid RecoverConfig {self}: steps >= 0, batch_size >= 1, checkpoint_every >= 1, "
                              "block_iters >= 0, refit_images >= 2, lr > 0 and block_lr > 0 are required")
        if self.loss not in LOSSES or self.augment not in AUGMENTS:
            raise ConfigError(f"RecoverConfig loss={self.loss!r}, augment={self.augment!r}: loss is one of "
                              f"{list(LOSSES)}, augment one of {list(AUGMENTS)}")


@dataclass
class RecoverReport:
    steps: int
    resumed_from: int
    seconds: float
    final_loss: float | None


def feature_loss(student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor,
                 kind: str = "mse") -> torch.Tensor:
    """Σ_t w_t d(s_t, t_t) averaged over images, d = ‖s − t‖² / D (``mse``) or 1 − cos(s, t)
    (``cosine``): the class token weighted as all patch tokens together
    (``vitslim.prune.importance.token_weights``)."""
    if kind == "cosine":
        per_token = 1 - torch.nn.functional.cosine_similarity(student, teacher, dim=-1)
    else:
        per_token = (student - teacher).pow(2).mean(-1)
    return (per_token * weights).sum(-1).mean()


def _lr(config: RecoverConfig, step: int) -> float:
    warmup = max(1, config.steps // 20)
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, config.steps - warmup)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


def _batch(images: torch.Tensor | Dataset, config: RecoverConfig, step: int) -> tuple[torch.Tensor, list | None]:
    """The step's batch, and which view of which image each element is ((index, flipped)), or
    None when the views are random crops (never drawn twice)."""
    gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    idx = torch.randint(len(images), (config.batch_size,), generator=gen)
    if isinstance(images, torch.Tensor):
        batch = images[idx]
    else:
        batch = torch.stack([images[i][0] for i in idx.tolist()])
    if config.augment == "crop":
        batch = torch.stack([_random_resized_crop(image, gen) for image in batch])
    flip = torch.zeros(len(batch), dtype=torch.bool)
    if config.augment != "none":
        flip = torch.rand(len(batch), generator=gen) < 0.5
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
    views = None if config.augment == "crop" else list(zip(idx.tolist(), flip.tolist()))
    return batch, views


class TeacherTargets:
    """The teacher's output tokens for each batch. With flips (or no augmentation) batches
    repeat views: 372 images have 744, and 200 steps of 8 draw 1600. So each view's tokens are
    computed once and kept (up to ``max_bytes``), one view at a time: a view gets the same
    values in whatever batch it is drawn, and a resumed run the same as an uninterrupted one."""

    def __init__(self, teacher: nn.Module, max_bytes: int = 1 << 30) -> None:
        self.teacher, self.max_bytes = teacher, max_bytes
        self.cache: dict[tuple[int, bool], torch.Tensor] = {}
        self.bytes = 0

    @torch.no_grad()
    def __call__(self, batch: torch.Tensor, views: list | None) -> torch.Tensor:
        if views is None:
            return self.teacher.forward_features(batch)
        targets = []
        for image, view in zip(batch, views):
            target = self.cache.get(view)
            if target is None:
                target = self.teacher.forward_features(image[None])[0]
                if self.bytes + target.nbytes <= self.max_bytes:
                    self.cache[view] = target
                    self.bytes += target.nbytes
            targets.append(target)
        return torch.stack(targets)


def _random_resized_crop(image: torch.Tensor, gen: torch.Generator, scale: tuple[float, float] = (0.35, 1.0),
                         ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """A crop of ``scale`` of the area and aspect ``ratio``, resized back to the image's size
    (the Inception / DeiT augmentation, on the already preprocessed tensor)."""
    h, w = image.shape[-2:]
    area = float(torch.empty(()).uniform_(*scale, generator=gen)) * h * w
    aspect = math.exp(float(torch.empty(()).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen)))
    ch, cw = min(h, round(math.sqrt(area / aspect))), min(w, round(math.sqrt(area * aspect)))
    top = int(torch.randint(h - ch + 1, (), generator=gen))
    left = int(torch.randint(w - cw + 1, (), generator=gen))
    crop = image[None, :, top:top + ch, left:left + cw]
    return torch.nn.functional.interpolate(crop, size=(h, w), mode="bilinear", antialias=True,
                                           align_corners=False)[0]


def _refit_images(images: torch.Tensor | Dataset, config: RecoverConfig) -> torch.Tensor:
    """At most ``config.refit_images`` of ``images`` (``calibration_split``'s seeded draw), as one tensor."""
    # (image, label) items, as the loader of calibration_images takes them; the labels are unused
    dataset = TensorDataset(images, torch.zeros(len(images))) if isinstance(images, torch.Tensor) else images
    if len(dataset) > config.refit_images:
        dataset, _ = calibration_split(dataset, config.refit_images, config.seed)
    return calibration_images(dataset)


def _reconstruct_blocks(model: nn.Module, teacher: nn.Module, images: torch.Tensor, iters: int,
                        lr: float, batch_size: int, seed: int = 0) -> nn.Module:
    """Block by block, the pruned model's block, fed the pruned model's own residual stream,
    learns (Adam on its qkv/proj/fc1/fc2) to output the FP32 model's stream after the same
    block: the non-linear continuation of the least-squares refits (which only reach proj and
    fc2), and block reconstruction as in BRECQ (Li et al., "BRECQ: Pushing the Limit of
    Post-Training Quantization by Block Reconstruction", ICLR 2021) applied to pruning. The
    target is the teacher's stream, not the teacher block on the student's input, so a block
    also corrects the error earlier blocks left (as ``compensate_`` does). Each step sees
    ``batch_size`` images' tokens; the error is measured relative to the stream's energy."""
    kept = getattr(model, SHAPES_ATTR)["blocks"]
    student_blocks, teacher_blocks = vit_parts(model).blocks, vit_parts(teacher).blocks
    x_t = chunked(vit_parts(teacher).embed, images, size=batch_size)
    x_s = x_t.clone()
    gen = torch.Generator().manual_seed(seed)
    done = 0
    for sb, index in progress_bar(list(zip(student_blocks, kept)), "block reconstruction"):
        for tb in teacher_blocks[done:index + 1]:  # removed blocks: the next kept one stands in for them
            x_t = chunked(tb.block, x_t, size=batch_size)
        done = index + 1
        scale = x_t.pow(2).mean()
        params = [p for layer in (sb.qkv, sb.proj, sb.fc1, sb.fc2) for p in layer.parameters()]
        optimizer = torch.optim.Adam(params, lr=lr)
        with torch.enable_grad():
            for _ in range(iters):
                idx = torch.randint(len(x_s), (batch_size,), generator=gen)
                loss = (sb.block(x_s[idx]) - x_t[idx]).pow(2).mean() / scale
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        x_s = chunked(sb.block, x_s, size=batch_size)
    return model


def _trained_parameters(model: nn.Module, config: RecoverConfig) -> list[nn.Parameter]:
    if config.train_all:
        return list(model.parameters())
    layers = [layer for bp in vit_parts(model).blocks for layer in (bp.qkv, bp.proj, bp.fc1, bp.fc2)]
    return [p for layer in layers for p in layer.parameters()]


def _signature(model: nn.Module) -> dict:
    return {name: list(p.shape) for name, p in model.named_parameters()}


def _save_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
                     config: RecoverConfig) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.named_parameters()}
    for name, p in model.named_parameters():
        for key, value in optimizer.state.get(p, {}).items():
            tensors[f"optim.{name}.{key}"] = torch.as_tensor(value).detach().contiguous()
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    os.close(fd)
    save_file(tensors, tmp)
    os.replace(tmp, directory / STATE_FILE)
    write_json(directory / META_FILE, {"step": step, "config": asdict(config), "shapes": _signature(model)})


def _load_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                     config: RecoverConfig) -> int:
    """Restore weights and optimizer state; returns the step to continue from (0: none)."""
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        return 0
    meta = json.loads(meta_path.read_text())
    if meta["config"] != asdict(config) or meta["shapes"] != _signature(model):
        raise ConfigError(f"{str(directory)!r} holds a recovery checkpoint for another model or config "
                          f"(step {meta['step']}); delete it to start over, or rerun with the same settings")
    tensors = load_file(str(directory / STATE_FILE))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(tensors[f"model.{name}"])
    params = dict(model.named_parameters())
    for key, value in tensors.items():
        if key.startswith("optim."):
            name, _, field = key[len("optim."):].rpartition(".")
            optimizer.state[params[name]][field] = value
    return int(meta["step"])


def recover_(model: nn.Module, teacher: nn.Module, images: torch.Tensor | Dataset,
             config: RecoverConfig = RecoverConfig(), checkpoint_dir: str | Path | None = None) -> RecoverReport:
    """Fine-tune the pruned ``model`` in place for ``config.steps`` steps so its output tokens
    match ``teacher``'s (the FP32 original) on ``images`` (a (N, 3, H, W) tensor or a dataset
    of (image, label) pairs; labels are ignored). Knowledge distillation of features, as in
    DeiT/NViT's recovery (Touvron et al. 2021; Yang et al. 2023), with no labels.
    Returns the steps run, where it resumed, wall time and the last loss."""
    if len(images) == 0:
        raise ConfigError("recovery needs unlabeled images; got none")
    vit_parts(model)
    teacher.eval()
    flags = {p: p.requires_grad for p in [*model.parameters(), *teacher.parameters()]}
    for p in teacher.parameters():
        p.requires_grad_(False)
    trained = _trained_parameters(model, config)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trained, lr=config.lr, weight_decay=config.weight_decay)
    directory = Path(checkpoint_dir) if checkpoint_dir is not None else None
    start = _load_checkpoint(directory, model, optimizer, config) if directory else 0
    began = time.perf_counter()
    if start == 0 and getattr(model, SHAPES_ATTR, None) and (config.refit or config.block_iters):
        tensors = _refit_images(images, config)
        if config.refit:
            refit_pruned_(model, teacher, tensors)
        if config.block_iters:
            _reconstruct_blocks(model, teacher, tensors, config.block_iters, config.block_lr, config.batch_size,
                                config.seed)
    weights, loss = None, None
    model.eval()  # dropout or stochastic depth would make it chase a teacher that has neither
    teacher_targets = TeacherTargets(teacher)
    try:
        for step in progress_bar(range(start, config.steps), "recovery (self-distillation)",
                                 total=config.steps - start):
            batch, views = _batch(images, config, step)
            target = teacher_targets(batch, views)
            if weights is None:
                weights = token_weights(target.shape[1], vit_parts(model).num_prefix_tokens)
            for group in optimizer.param_groups:
                group["lr"] = _lr(config, step)
            loss = feature_loss(model.forward_features(batch), target, weights, config.loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done = step + 1
            if directory and (done % config.checkpoint_every == 0 or done == config.steps):
                _save_checkpoint(directory, model, optimizer, done, config)
    finally:
        optimizer.zero_grad(set_to_none=True)  # the gradients would outlive recovery in every parameter
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return RecoverReport(config.steps, start, time.perf_counter() - began,
                         None if loss is None else loss.item())
