"""`vitslim apply` as a function: a recipe, a model and images in, a saved artifact out."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Subset

from vitslim.artifact import Artifact, ModelSource, load, source_of, write_contract
from vitslim.data import ImageFolder, calibration_images, calibration_split, load_image_folder, make_loader
from vitslim.deploy.artifact import build_artifact
from vitslim.evaluation import Outputs, compare_outputs, predict
from vitslim.recipes import Recipe, load_recipe

FIDELITY_VS = "the FP32 original in PyTorch, on images not used for calibration"


def split_images(model: nn.Module, data: str | Path, n_calib: int, n_eval: int,
                 seed: int) -> tuple[ImageFolder, Subset, Subset]:
    """The folder, its seeded calibration subset and up to ``n_eval`` disjoint evaluation
    images: the same split for ``vitslim compress`` and ``vitslim apply``, so a recipe
    applied with the same settings calibrates on the same images."""
    dataset = load_image_folder(data, model)
    calib_set, eval_set = calibration_split(dataset, n_calib, seed)
    eval_set.indices = eval_set.indices[:n_eval]
    return dataset, calib_set, eval_set


def calibration_batch(calib_set: Subset) -> torch.Tensor:
    return calibration_images(calib_set) if len(calib_set) else torch.empty(0)


def fidelity(test: Outputs, reference: Outputs, data: str | Path, label_note: str | None = None) -> dict:
    """Fidelity of an artifact's outputs to the FP32 original's on the same images; with
    labels and a classifier, also top-1 accuracy and its drop in percentage points. Without
    them those are None and ``top1_not_scored`` says why (``label_note``: the data's labels and
    the head's classes differ, see ``vitslim.data.align_labels``)."""
    r = compare_outputs(test, reference)
    top1_fp32 = compare_outputs(reference, None).top1
    drop = (top1_fp32 - r.top1) * 100 if r.top1 is not None and top1_fp32 is not None else None
    figures = {"cosine": r.cosine, "cosine_se": r.cosine_se, "sqnr_db": r.sqnr_db,
               "top1_agreement": r.top1_agreement, "top1": r.top1, "top1_fp32": top1_fp32, "accuracy_drop": drop,
               "images": r.images, "labelled_images": r.labelled_images, "data": Path(data).name, "vs": FIDELITY_VS}
    if drop is None and test.logits is not None:
        figures["top1_not_scored"] = label_note or "no labelled images"
    return figures


def apply(
    model: nn.Module,
    recipe: Recipe | str | Path,
    data: str | Path,
    out: str | Path,
    source: ModelSource | None = None,
    n_calib: int = 32,
    n_eval: int = 64,
    seed: int = 0,
    force: bool = False,
) -> tuple[Artifact, dict | None]:
    """Apply ``recipe`` (a Recipe, a built-in name or a YAML/JSON file) to ``model``,
    calibrating on a seeded draw of ``n_calib`` images of ``data``, and save the artifact at
    ``out`` (``.onnx`` when the recipe exports, a folder otherwise). Then measure its fidelity
    to ``model`` on up to ``n_eval`` other images and record it in the artifact.

    With the same data, ``n_calib`` and ``seed`` as a ``vitslim compress`` run, this builds
    the same artifact as the search did (the same function builds both). What is at ``out``
    is replaced only when vitslim wrote it, or with ``force``.
    """
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    dataset, calib_set, eval_set = split_images(model, data, n_calib, n_eval, seed)
    calibration = {"data": str(data), "images": len(calib_set), "seed": seed}
    path = build_artifact(model, recipe, calibration_batch(calib_set), out, source or source_of(model), calibration,
                          force=force)
    artifact = load(path)
    if not len(eval_set):
        return artifact, None
    loader = make_loader(eval_set, batch_size=32)
    figures = fidelity(predict(artifact.model, loader, recipe.name), predict(model, loader, "FP32"), data,
                       dataset.label_note)
    artifact.contract = artifact.contract.with_fidelity(figures)
    write_contract(path, artifact.contract)
    return artifact, figures
