"""Saving and loading pruned models: ``model.safetensors`` + ``prune.json`` in a folder.

The JSON names the timm model (and its creation arguments) and the kept shapes; loading
creates that model without weights, cuts it to the shapes, then loads the weights strictly,
so a folder whose weights do not fit its shapes fails with the mismatch named. No pickle.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from vitslim.bench import dedupe_shared_tensors
from vitslim.models import load_model, vit_parts
from vitslim.models.loading import ModelLoadError, load_state_dict_strict
from vitslim.output import write_json
from vitslim.prune.allocate import Plan
from vitslim.prune.surgery import INDEX_KEYS, SHAPES_ATTR, apply_plan

STATE_FILE, META_FILE = "model.safetensors", "prune.json"


def save_pruned(model: nn.Module, out_dir: str | Path, model_name: str, timm_kwargs: dict | None = None) -> Path:
    """Write a model pruned by ``prune_`` to ``out_dir``: weights first, then the JSON (each
    atomically), so a folder with a ``prune.json`` is always complete."""
    info = getattr(model, SHAPES_ATTR, None)
    if info is None:
        raise ValueError("this model was not pruned by vitslim.prune (no shapes recorded); nothing to save")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = dedupe_shared_tensors({k: v.detach().contiguous() for k, v in model.state_dict().items()})
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".tmp")
    os.close(fd)
    save_file(state, tmp)
    os.replace(tmp, out_dir / STATE_FILE)
    write_json(out_dir / META_FILE, {"model": model_name, "timm_kwargs": timm_kwargs or {}, **info})
    return out_dir


def is_pruned_folder(path: str | Path) -> bool:
    return (Path(path) / META_FILE).is_file()


def _plan(meta: dict, depth: int, source: str) -> Plan:
    blocks, heads, mlp = meta.get("blocks"), meta.get("heads"), meta.get("mlp")
    if not (isinstance(blocks, list) and isinstance(heads, list) and isinstance(mlp, list)
            and len(blocks) == len(heads) == len(mlp) and all(isinstance(b, int) and 0 <= b < depth for b in blocks)
            and all(isinstance(n, int) and n > 0 for n in heads + mlp)):
        raise ModelLoadError(f"{source}: 'blocks', 'heads' and 'mlp' must be equal-length lists of positive "
                             f"integers, blocks within 0..{depth - 1}; the file was edited or is damaged")
    return Plan(tuple(blocks), {b: tuple(range(n)) for b, n in zip(blocks, heads)},
                {b: tuple(range(n)) for b, n in zip(blocks, mlp)})


def _check_indices(meta: dict, sizes: dict[str, list[int]], source: str) -> None:
    """The original heads/channels each kept block keeps (absent in folders saved before they
    were recorded): one distinct index below the original block's ``sizes`` per kept unit."""
    for key, counts in (("head_index", meta["heads"]), ("channel_index", meta["mlp"])):
        index = meta.get(key)
        if index is None:
            continue
        if not (isinstance(index, list) and len(index) == len(counts) and all(
                isinstance(kept, list) and all(isinstance(i, int) and 0 <= i < sizes[key][b] for i in kept)
                and len(kept) == n == len(set(kept)) for kept, n, b in zip(index, counts, meta["blocks"]))):
            raise ModelLoadError(f"{source}: {key!r} must list, per kept block, its distinct original indices "
                                 f"(as many as 'heads'/'mlp' say); the file was edited or is damaged")


def load_pruned(model_dir: str | Path) -> nn.Module:
    """Rebuild a model saved by ``save_pruned``, in eval mode."""
    model_dir = Path(model_dir)
    meta_path = model_dir / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{str(model_dir)!r} is not a vitslim pruned model folder (no {META_FILE}); "
                                "make one with `vitslim prune ... --out DIR`")
    meta = json.loads(meta_path.read_text())
    model = load_model(meta["model"], pretrained=False, **meta["timm_kwargs"])
    parts = vit_parts(model)
    plan = _plan(meta, len(parts.blocks), str(meta_path))
    too_big = [b for b in plan.blocks if len(plan.heads[b]) > parts.blocks[b].num_heads
               or len(plan.channels[b]) > parts.blocks[b].fc1.out_features]
    if too_big:
        raise ModelLoadError(f"{meta_path}: block(s) {too_big} list more heads or MLP channels than "
                             f"{meta['model']} has; the file was edited or is for another model")
    sizes = {"head_index": [bp.num_heads for bp in parts.blocks],
             "channel_index": [bp.fc1.out_features for bp in parts.blocks]}
    apply_plan(model, plan)
    load_state_dict_strict(model, load_file(str(model_dir / STATE_FILE)), source=str(model_dir / STATE_FILE))
    _check_indices(meta, sizes, str(meta_path))
    info = getattr(model, SHAPES_ATTR)
    for key in INDEX_KEYS:  # apply_plan recorded the identity: the folder's own say
        info.pop(key)
    info.update({k: v for k, v in meta.items() if k in ("config", "macs_kept", *INDEX_KEYS)})
    return model.eval()
