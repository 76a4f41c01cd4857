"""Compress or switch? ViTs compressed by vitslim next to efficient architectures, on this CPU.

    uv run python benchmarks/arch_table.py [--models efficientformer_l1,swin_t] [--iters 6]
    uv run python benchmarks/arch_table.py --models all

Per model: params, GMACs, ONNX file sizes (FP32, int8), PyTorch FP32 eager throughput at
batch 1 and 8, and the speed-ups over it of ONNX Runtime FP32 and of vitslim W8A8 in ONNX
Runtime (interleaved in one run, ``vitslim.compare``; int8 over ORT FP32 is what quantization itself buys): for the
ViTs (DeiT-S, DINOv2-S) the ``w8a8-ort`` preset and ``w8a8-ort`` + ToMe r=13; for the hybrid
and hierarchical models ``vitslim.quant.hybrid.quantize_hybrid_`` (token reduction does not
apply to them: ``vitslim.tokens`` says why). The int8 kernels ORT runs are counted. Next to
them, each architecture's published ImageNet-1k top-1 with its source (``PUBLISHED``).

Weights: only DINOv2-S is real (the reference model); the timm models have random weights (no
model hub here), so their rows are speed only. Fidelity (CLS cosine vs FP32) is measured for
DINOv2 only, on --eval images of the shared sample not used for calibration. Compare ratios,
not absolute img/s: the load average at the end of the run is printed with the table.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import tempfile
from pathlib import Path

import timm
import torch

from _common import DEFAULT_IMAGES
from vitslim import calibration_split, compare, evaluate, load_image_folder, make_loader, predict, quant, tokens
from vitslim.bench import OnnxModel, count_gmacs, count_params, machine_info
from vitslim.data import calibration_images
from vitslim.export import export_onnx, integer_ops
from vitslim.models import load_reference_model
from vitslim.models.loading import input_size
from vitslim.output import print_table
from vitslim.quant.gptq import one_thread
from vitslim.quant.hybrid import HybridQuantConfig, quantize_hybrid_

# key -> (timm name, label, family). "reference" is vitslim's real DINOv2 ViT-S/14.
MODELS = {
    "deit_s": ("deit_small_patch16_224", "DeiT-S", "vit"),
    "dinov2_s": ("reference", "DINOv2 ViT-S/14 (real weights)", "vit"),
    "swin_t": ("swin_tiny_patch4_window7_224", "Swin-T", "hybrid"),
    "efficientformer_l1": ("efficientformer_l1", "EfficientFormer-L1", "hybrid"),
    "efficientformer_l3": ("efficientformer_l3", "EfficientFormer-L3", "hybrid"),
    "efficientformerv2_s1": ("efficientformerv2_s1", "EfficientFormerV2-S1", "hybrid"),
    "efficientvit_b1": ("efficientvit_b1", "EfficientViT-B1 (MIT)", "hybrid"),
    "efficientvit_m5": ("efficientvit_m5", "EfficientViT-M5 (MSRA)", "hybrid"),
    "mobilevit_s": ("mobilevit_s", "MobileViT-S", "hybrid"),
    "nextvit_s": ("nextvit_small", "Next-ViT-S", "hybrid"),
    "tinyvit_11m": ("tiny_vit_11m_224", "TinyViT-11M", "hybrid"),
    "convnext_t": ("convnext_tiny", "ConvNeXt-T", "hybrid"),
}
DEFAULT_MODELS = "efficientformer_l1,mobilevit_s"

# ImageNet-1k validation top-1 (%) of each architecture's timm weights, as timm measured them:
# pytorch-image-models results/results-imagenet.csv (commit aa4b585, 2026-08-08), weight tag and
# resolution named; DINOv2 has no ImageNet head, so its paper's linear-probe figure is cited.
TIMM_RESULTS = "timm results-imagenet.csv"
PUBLISHED = {
    "deit_s": (79.856, f"{TIMM_RESULTS}, deit_small_patch16_224.fb_in1k, 224 px"),
    "dinov2_s": (81.1, "Oquab et al., DINOv2: Learning Robust Visual Features without Supervision, 2023, "
                       "ImageNet linear probe of ViT-S/14 distilled, as in the facebookresearch/dinov2 README "
                       "(this model has no ImageNet head)"),
    "swin_t": (81.388, f"{TIMM_RESULTS}, swin_tiny_patch4_window7_224.ms_in1k, 224 px"),
    "efficientformer_l1": (80.502, f"{TIMM_RESULTS}, efficientformer_l1.snap_dist_in1k, 224 px"),
    "efficientformer_l3": (82.562, f"{TIMM_RESULTS}, efficientformer_l3.snap_dist_in1k, 224 px"),
    "efficientformerv2_s1": (79.684, f"{TIMM_RESULTS}, efficientformerv2_s1.snap_dist_in1k, 224 px"),
    "efficientvit_b1": (79.254, f"{TIMM_RESULTS}, efficientvit_b1.r224_in1k, 224 px"),
    "efficientvit_m5": (77.092, f"{TIMM_RESULTS}, efficientvit_m5.r224_in1k, 224 px"),
    "mobilevit_s": (78.298, f"{TIMM_RESULTS}, mobilevit_s.cvnets_in1k, 256 px"),
    "nextvit_s": (82.626, f"{TIMM_RESULTS}, nextvit_small.bd_in1k, 224 px"),
    "tinyvit_11m": (81.538, f"{TIMM_RESULTS}, tiny_vit_11m_224.in1k, 224 px (83.232 distilled from IN-22k)"),
    "convnext_t": (82.066, f"{TIMM_RESULTS}, convnext_tiny.fb_in1k, 224 px"),
}


def short_citation(source: str) -> str:
    """'First author et al., year' (or the timm weight tag) for the table; the full source stays
    in ``PUBLISHED``."""
    if source.startswith(TIMM_RESULTS):
        return "timm: " + source.split(", ")[1]
    years = re.findall(r"\b(?:19|20)\d\d\b", source)
    return f"{source.split(',')[0]}, {years[0]}" if years else source


def create(key: str) -> torch.nn.Module:
    name = MODELS[key][0]
    if name == "reference":
        return load_reference_model().eval()
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).eval()


def int8_candidates(key: str, model: torch.nn.Module, calib: torch.Tensor, tmp: Path) -> dict[str, Path]:
    """vitslim's int8 ONNX exports of ``model``: W8A8 (and W8A8 + ToMe r=13 for the ViTs)."""
    if MODELS[key][2] == "vit":
        w8a8 = quant.preset("w8a8-ort")
        with one_thread():  # calibration is many small ops: on a loaded 2-core machine one thread is far faster
            qmodel = quant.quantize_(copy.deepcopy(model), w8a8, calib)
            merged = quant.quantize_(tokens.reduce_tokens_(copy.deepcopy(model), tokens.ToMeConfig(r=13)), w8a8, calib)
        return {"int8": export_onnx(qmodel, tmp / f"{key}.onnx"),
                "int8+ToMe13": export_onnx(merged, tmp / f"{key}_tome.onnx")}
    with one_thread():
        qmodel = quantize_hybrid_(copy.deepcopy(model), HybridQuantConfig(), calib)
    return {"int8": export_onnx(qmodel, tmp / f"{key}.onnx")}


def fidelity(model: torch.nn.Module, paths: dict[str, Path], loader) -> dict[str, float]:
    reference = predict(model, loader, "FP32")
    return {name: evaluate(OnnxModel(path), loader, reference=reference).cosine for name, path in paths.items()}


def print_profile(label: str, paths: dict[str, Path], runs: int, top: int = 8) -> None:
    """Where ORT spends the time at batch 8, FP32 vs int8 (``benchmarks/ort_profile.py``)."""
    from ort_profile import op_times  # the sibling script (benchmarks/ is on sys.path when run)

    batch = torch.randn(8, *OnnxModel(paths["int8"]).input_size)
    times = {name: op_times(path, batch, runs, torch.get_num_threads()) for name, path in paths.items()}
    ops = sorted(set().union(*times.values()), key=lambda op: -times["int8"].get(op, 0))[:top]
    rows = [{"op": op, **{name: t.get(op, 0.0) for name, t in times.items()}} for op in ops]
    rows.append({"op": "all kernels", **{name: sum(t.values()) for name, t in times.items()}})
    print_table(f"{label}: ORT kernel ms per batch of 8 by op type (top {top})", rows,
                {"op": "op type", **{name: f"{name} ms" for name in times}})


def measure(key: str, args) -> dict:
    model = create(key)
    print(f"{MODELS[key][1]}: quantizing and exporting", flush=True)
    dataset = load_image_folder(args.images, model)
    real = MODELS[key][0] == "reference"
    calib_set, eval_set = calibration_split(dataset, args.calib if real else min(args.calib, 8), seed=0)
    eval_set.indices = eval_set.indices[: args.eval]
    with tempfile.TemporaryDirectory() as tmp:
        paths = int8_candidates(key, model, calibration_images(calib_set), Path(tmp))
        ops = integer_ops(paths["int8"])
        runnables = {"fp32": model, "ort_fp32": export_onnx(model, Path(tmp) / "fp32.onnx"), **paths}
        speed = {b: compare(runnables, batch_size=b, iters=args.iters * (2 if b == 1 else 1),
                            warmup=2, flops=False, warm_each=args.warm) for b in (1, 8)}
        cosines = fidelity(model, paths, make_loader(eval_set, 16)) if real and args.eval else {}
        if args.profile:
            print_profile(MODELS[key][1], {"ORT FP32": runnables["ort_fp32"], "int8": paths["int8"]}, args.iters)
    top1, source = PUBLISHED.get(key, (None, "not found"))
    row = {"model": MODELS[key][1], "params_m": count_params(model) / 1e6,
           "gmacs": count_gmacs(model, input_size(model)), "res": input_size(model)[-1],
           "fp32_b1": speed[1][0].throughput, "fp32_b8": speed[8][0].throughput,
           "int8_ops": sum(ops.values()), "top1": top1, "source": short_citation(source),
           "fp32_mb": runnables["ort_fp32"].stat().st_size / 1e6, "int8_mb": paths["int8"].stat().st_size / 1e6}
    for i, name in enumerate(["ort_fp32", *paths], start=1):
        row[f"{name}_x_b1"], row[f"{name}_x_b8"] = speed[1][i].speedup, speed[8][i].speedup
        row[f"{name}_cos"] = cosines.get(name)
    for b in (1, 8):  # what int8 itself buys, runtime held fixed (eager suffers most from a loaded machine)
        row[f"int8_vs_ort_b{b}"] = speed[b][2].throughput / speed[b][1].throughput
    print(f"  {row}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=DEFAULT_MODELS, help=f"comma list or 'all' of {', '.join(MODELS)}")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--calib", type=int, default=32, help="calibration images (8 for random-weight models)")
    parser.add_argument("--eval", type=int, default=64, help="DINOv2 fidelity images, disjoint from calibration")
    parser.add_argument("--iters", type=int, default=4, help="timed batches at batch 8 (2x that at batch 1)")
    parser.add_argument("--warm", action="store_true",
                        help="run each model once, untimed, before each of its timed batches (vitslim.compare's "
                             "warm_each)")
    parser.add_argument("--profile", action="store_true", help="also print ORT's per-op-type kernel time, FP32 vs int8")
    args = parser.parse_args()
    keys = list(MODELS) if args.models == "all" else args.models.split(",")
    unknown = [k for k in keys if k not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    rows = []
    for key in keys:
        try:
            rows.append(measure(key, args))
        except Exception as err:  # one model's failure is reported in its row, not the end of the table
            rows.append({"model": MODELS[key][1], "error": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"})
            print(f"  {rows[-1]}", flush=True)
    m = machine_info()
    print_table("compress or switch?", rows, {
        "model": "model", "params_m": "params M", "gmacs": "GMACs", "res": "px", "fp32_b1": "FP32 img/s b1",
        "fp32_b8": "FP32 img/s b8", "ort_fp32_x_b1": "ORT FP32 × b1", "ort_fp32_x_b8": "ORT FP32 × b8",
        "int8_x_b1": "int8 × b1", "int8_x_b8": "int8 × b8",
        "int8_vs_ort_b1": "int8 / ORT FP32 b1", "int8_vs_ort_b8": "int8 / ORT FP32 b8",
        "int8+ToMe13_x_b1": "int8+ToMe × b1", "int8+ToMe13_x_b8": "int8+ToMe × b8", "int8_ops": "int8 kernels",
        "int8_cos": "int8 cos", "int8+ToMe13_cos": "int8+ToMe cos", "fp32_mb": "FP32 MB", "int8_mb": "int8 MB",
        "top1": "published top-1", "source": "source",
        "error": "error"},
        caption=f"{m['cpu']}, {m['torch_threads']} threads; × = ORT int8 throughput / PyTorch FP32 eager, "
                f"interleaved{', each warm' if args.warm else ''}, {args.iters} timed batches at b8, "
                f"{2 * args.iters} at b1, load average {os.getloadavg()[0]:.1f} at the end. Random "
                f"weights except DINOv2 (speed only); cosine: DINOv2 CLS vs FP32 on {args.eval} images of "
                f"{args.images} not used for calibration.")


if __name__ == "__main__":
    main()
