"""Recovery by self-distillation: a short fine-tune of the pruned model on unlabeled images,
matching the FP32 teacher's output tokens.

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
from torch.utils.data import Dataset

from vitslim.errors import ConfigError
from vitslim.models import vit_parts
from vitslim.output import write_json
from vitslim.progress import progress_bar
from vitslim.prune.importance import token_weights

STATE_FILE, META_FILE = "recover.safetensors", "recover.json"


@dataclass(frozen=True)
class RecoverConfig:
    """``steps`` of AdamW (``lr``, linear warm-up over the first 5 %, cosine decay to 0) on
    batches of ``batch_size`` images (horizontally flipped at random when ``flip``)."""

    steps: int = 200
    batch_size: int = 8
    lr: float = 5e-5
    weight_decay: float = 0.0
    flip: bool = True
    checkpoint_every: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.checkpoint_every < 1 or not self.lr > 0:
            raise ConfigError(f"invalid RecoverConfig {self}: steps >= 0, batch_size >= 1, "
                              "checkpoint_every >= 1 and lr > 0 are required")


@dataclass
class RecoverReport:
    steps: int
    resumed_from: int
    seconds: float
    final_loss: float | None


def feature_loss(student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_t w_t ‖s_t − t_t‖² / D, averaged over images: the class token weighted as all patch
    tokens together (``vitslim.prune.importance.token_weights``)."""
    per_token = (student - teacher).pow(2).mean(-1)
    return (per_token * weights).sum(-1).mean()


def _lr(config: RecoverConfig, step: int) -> float:
    warmup = max(1, config.steps // 20)
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, config.steps - warmup)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


def _batch(images: torch.Tensor | Dataset, config: RecoverConfig, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    idx = torch.randint(len(images), (config.batch_size,), generator=gen)
    if isinstance(images, torch.Tensor):
        batch = images[idx]
    else:
        batch = torch.stack([images[i][0] for i in idx.tolist()])
    if config.flip:
        flip = torch.rand(len(batch), generator=gen) < 0.5
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
    return batch


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
    for p in model.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    directory = Path(checkpoint_dir) if checkpoint_dir is not None else None
    start = _load_checkpoint(directory, model, optimizer, config) if directory else 0
    began = time.perf_counter()
    weights, loss = None, None
    model.train()
    try:
        for step in progress_bar(range(start, config.steps), "recovery (self-distillation)",
                                 total=config.steps - start):
            batch = _batch(images, config, step)
            with torch.no_grad():
                target = teacher.forward_features(batch)
            if weights is None:
                weights = token_weights(target.shape[1], vit_parts(model).num_prefix_tokens)
            for group in optimizer.param_groups:
                group["lr"] = _lr(config, step)
            loss = feature_loss(model.forward_features(batch), target, weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done = step + 1
            if directory and (done % config.checkpoint_every == 0 or done == config.steps):
                _save_checkpoint(directory, model, optimizer, done, config)
    finally:
        model.eval()
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return RecoverReport(config.steps, start, time.perf_counter() - began,
                         None if loss is None else float(loss))
