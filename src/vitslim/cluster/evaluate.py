"""``vitslim eval --cluster``: Ray Data reads and preprocesses the images in shards, a pool of
actors runs the model (and the reference) on them, and the figures are reduced from per-batch
sums (``vitslim.evaluation.metric_sums``), so they are the single-process figures."""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import numpy as np
import ray
import torch
from torch import nn

from vitslim.bench import OnnxModel
from vitslim.data import ImageFolder, load_image_folder
from vitslim.errors import DataError
from vitslim.evaluation import EvalResult, add_sums, metric_sums, predict, result_from_sums
from vitslim.workflows import load_any, preprocessing_for


def evaluate_on_cluster(
    model: str,
    data: str | Path,
    checkpoint: str | Path | None = None,
    reference: str | None = None,
    reference_checkpoint: str | Path | None = None,
    dtype: str = "float32",
    limit: int | None = None,
    batch_size: int = 32,
    skip_bad: bool = False,
    workers: int | None = None,
) -> EvalResult:
    """``vitslim.workflows.evaluate_on_folder`` on the connected Ray cluster: the same figures.
    ``workers`` model actors (default: the cluster's CPUs less one, left for reading images)."""
    test = load_any(model, checkpoint, dtype)
    ref = load_any(reference, reference_checkpoint) if reference else None
    folder = load_image_folder(data, transform=preprocessing_for(test, ref), skip_bad=skip_bad, limit=limit)
    models = [ray.put(_portable(m)) for m in (test, ref)]
    cpus = int(ray.cluster_resources().get("CPU", 1))
    pool = workers or max(1, cpus - 1)
    rows = ray.data.from_items([{"path": str(p), "label": label} for p, label in folder.samples],
                               override_num_blocks=max(1, min(len(folder.samples) // batch_size, 8 * cpus)))
    sums = (rows.map_batches(read_images, fn_kwargs={"transform": folder.transform, "skip_bad": skip_bad},
                             batch_size=batch_size, batch_format="numpy")
            .map_batches(ShardMetrics, fn_constructor_kwargs={"models": models}, batch_size=batch_size,
                         batch_format="numpy", concurrency=pool, num_cpus=1))
    total = functools.reduce(add_sums, (json.loads(row["sums"]) for row in sums.iter_rows()))
    if not total["images"]:
        raise DataError(f"no readable images to evaluate ({total['skipped']} skipped as unreadable)")
    result = result_from_sums(total)
    result.skipped_images = int(total["skipped"])
    return result


def read_images(batch: dict[str, np.ndarray], transform, skip_bad: bool) -> dict[str, np.ndarray]:
    """A batch of paths and labels in, the preprocessed images out (zeros, flagged unreadable,
    for images skipped with ``skip_bad``), read exactly as ``vitslim.data.ImageFolder`` does."""
    folder = ImageFolder([(Path(p), int(label)) for p, label in zip(batch["path"], batch["label"])], transform,
                         skip_bad=skip_bad)
    items = [folder[i] for i in range(len(folder))]
    shape = next((x[0].shape for x in items if x is not None), (0,))
    images = np.stack([x[0].numpy() if x is not None else np.zeros(shape, np.float32) for x in items])
    return {"image": images, "label": batch["label"].astype(np.int64),
            "readable": np.array([x is not None for x in items])}


class ShardMetrics:
    """A Ray Data actor: runs the model and the reference on its batches and returns each
    batch's ``metric_sums`` (JSON, one row per batch)."""

    def __init__(self, models: list[ray.ObjectRef]) -> None:
        self.test, self.reference = (_runnable(x) for x in ray.get(models))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keep = batch["readable"]
        sums = {"images": 0, "labelled_images": 0}
        if keep.any():
            loader = [(torch.from_numpy(batch["image"][keep]), torch.from_numpy(batch["label"][keep]))]
            test = predict(self.test, loader, "evaluate")
            ref = predict(self.reference, loader, "reference") if self.reference is not None else None
            sums = metric_sums(test, ref)
        sums["skipped"] = int((~keep).sum())
        return {"sums": np.array([json.dumps(sums)])}


def _portable(model: nn.Module | OnnxModel | None):
    """What goes into the object store: a PyTorch model as it is, an ONNX model as its file's bytes."""
    return ("onnx", model.path.read_bytes()) if isinstance(model, OnnxModel) else model


def _runnable(portable) -> nn.Module | OnnxModel | None:
    if not isinstance(portable, tuple):
        return portable
    with tempfile.NamedTemporaryFile(suffix=".onnx", delete=False) as f:
        f.write(portable[1])
    return OnnxModel(f.name)
