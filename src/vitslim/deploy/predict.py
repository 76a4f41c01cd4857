"""`vitslim predict`: run an artifact on a folder of images, fed as its contract says.

This is the reference for what an artifact computes: the preprocessing is rebuilt from the
contract stored in the artifact (not from the original model), and the output is the
artifact's own (class logits, or the feature vector a backbone gives).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vitslim.artifact import Artifact, Contract, load
from vitslim.data import align_labels, imagenet_names, load_image_folder, make_loader
from vitslim.progress import progress_bar


@dataclass
class Predictions:
    """Per-image outputs of an artifact. ``top_k`` rows are (class index, class name,
    softmax probability) for classifiers; empty for feature extractors."""

    files: list[Path]
    outputs: torch.Tensor  # (N, classes) logits or (N, D) features
    labels: torch.Tensor  # (N,), -1 where unlabelled
    kind: str  # "logits" or "features"
    top_k: list[list[tuple[int, str, float]]]
    label_note: str | None = None  # why the folder's labels are not scored (see vitslim.data.align_labels)

    @property
    def top1_accuracy(self) -> float | None:
        keep = self.labels >= 0
        if self.kind != "logits" or not keep.any():
            return None
        return (self.outputs[keep].argmax(1) == self.labels[keep]).double().mean().item()

    def to_dict(self) -> dict:
        rows = [{"file": str(f), "label": int(y) if y >= 0 else None,
                 "top_k": [{"class": c, "name": n, "prob": p} for c, n, p in top]}
                for f, y, top in zip(self.files, self.labels.tolist(), self.top_k or [[]] * len(self.files))]
        accuracy = ({"top1_accuracy": self.top1_accuracy} if self.label_note is None
                    else {"top1_accuracy_not_scored": self.label_note})
        return {"kind": self.kind, "images": len(self.files), **accuracy,
                "predictions": rows if self.kind == "logits" else None}


def class_names(contract: Contract) -> list[str] | None:
    """The head's class names from the contract (a Hugging Face config's ``id2label``), ImageNet-1k's
    for an unnamed 1000-class head, otherwise None."""
    names = contract.output.get("class_names")
    if isinstance(names, list) and len(names) == contract.num_classes:
        return [str(n) for n in names]
    return list(imagenet_names()) if contract.num_classes == 1000 else None


def predict_folder(artifact: Artifact | str | Path, data: str | Path, top_k: int = 5, batch_size: int = 32,
                   limit: int | None = None) -> Predictions:
    """Run ``artifact`` (path or loaded) on the images in ``data`` with its contract's preprocessing."""
    artifact = artifact if isinstance(artifact, Artifact) else load(artifact)
    dataset = load_image_folder(data, transform=artifact.contract.transform(), limit=limit)
    names = class_names(artifact.contract)
    own_names = names if isinstance(artifact.contract.output.get("class_names"), list) else None
    dataset.samples, dataset.label_note = align_labels(dataset.samples, artifact.contract.num_classes, own_names)
    outputs, labels = [], []
    for batch in progress_bar(make_loader(dataset, batch_size), f"predict {artifact.path.name}"):
        images, y = batch
        outputs.append(artifact(images))
        labels.append(y)
    out = torch.cat(outputs)
    kind = artifact.contract.output.get("kind", "features")
    rows = []
    if kind == "logits":
        names = names or [str(i) for i in range(out.shape[1])]
        probs, idx = out.softmax(1).topk(min(top_k, out.shape[1]), dim=1)
        rows = [[(c, names[c], round(p, 5)) for c, p in zip(ci, pi)] for ci, pi in zip(idx.tolist(), probs.tolist())]
    return Predictions([p for p, _ in dataset.samples], out, torch.cat(labels), kind, rows, dataset.label_note)
