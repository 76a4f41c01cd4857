"""Where the time goes in ONNX Runtime: per-op-type kernel time of FP32 and vitslim int8 exports.

    uv run python benchmarks/ort_profile.py [--model deit] [--tome-r 13] [--runs 6] [--batch 8]

Exports timm ``deit_small_patch16_224`` (random weights: speed only) or the DINOv2 reference
model in FP32 and as vitslim ``w8a8-ort`` (+ ToMe r when --tome-r > 0), runs each --runs times at
batch 8 in ORT with its profiler on (threads as PyTorch's), and prints the kernel time per op
type per batch and its share. This is the profile behind the deploy table: it shows what int8
speeds up (the matmuls) and what it leaves (LayerNorm, Softmax, GELU, the Q/DQ around them).
The int8 model is profiled twice: as exported (each int8 linear one ``MatMulIntegerToFloat``
with its bias and layer scale, ``vitslim.export.int8_linear``) and with plain Q/DQ linears
(``ort_kernels=False``), side by side: the profile before/after fusion.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from collections import defaultdict
from pathlib import Path

import onnxruntime as ort
import timm
import torch

from vitslim import quant, tokens
from vitslim.bench import machine_info
from vitslim.export import export_onnx
from vitslim.models import load_reference_model
from vitslim.output import print_table


def op_times(path: Path, batch: torch.Tensor, runs: int, threads: int) -> dict[str, float]:
    """Milliseconds per batch spent in each op type's kernels (mean over ``runs``, after one warm-up)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix(""))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: batch.numpy()}
    session.run(None, feed)  # warm-up, excluded below
    for _ in range(runs):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    runs_seen = [e for e in events if e.get("name") == "model_run"]
    first_timed = runs_seen[1]["ts"] if len(runs_seen) > 1 else 0
    totals: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first_timed:
            totals[e["args"]["op_name"]] += e["dur"] / 1e3 / runs
    return dict(totals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("deit", "dinov2"), default="deit")
    parser.add_argument("--tome-r", type=int, default=13)
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()

    torch.manual_seed(0)
    if args.model == "dinov2":
        model = load_reference_model()
    else:
        model = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    size = model.patch_embed.img_size
    calib, batch = torch.randn(8, 3, *size), torch.randn(args.batch, 3, *size)  # speed only: the values do not matter
    threads = torch.get_num_threads()
    int8_name = "w8a8-ort" + (f" + ToMe r={args.tome_r}" if args.tome_r else "")
    with tempfile.TemporaryDirectory() as tmp:
        qmodel = copy.deepcopy(model)
        if args.tome_r:
            tokens.reduce_tokens_(qmodel, tokens.ToMeConfig(r=args.tome_r))
        quant.quantize_(qmodel, quant.preset("w8a8-ort"), calib)
        paths = {"FP32": export_onnx(model, Path(tmp, "fp32.onnx")),
                 f"{int8_name} Q/DQ": export_onnx(qmodel, Path(tmp, "int8-qdq.onnx"), ort_kernels=False),
                 int8_name: export_onnx(qmodel, Path(tmp, "int8.onnx"))}
        times = {name: op_times(path, batch, args.runs, threads) for name, path in paths.items()}
    ops = sorted(set().union(*times.values()), key=lambda op: -times[int8_name].get(op, 0))
    totals = {name: sum(t.values()) for name, t in times.items()}
    rows = [{"op": op, **{f"{name} ms": times[name].get(op, 0.0) for name in times},
             **{f"{name} %": 100 * times[name].get(op, 0.0) / totals[name] for name in times}} for op in ops]
    rows.append({"op": "all kernels", **{f"{name} ms": totals[name] for name in times},
                 **{f"{name} %": 100.0 for name in times}})
    m = machine_info()
    columns = {"op": "op type", **{f"{n} ms": f"{n} ms/batch" for n in times}, **{f"{n} %": f"{n} %" for n in times}}
    print_table(f"ONNX Runtime kernel time by op type, {args.model}, batch {args.batch}", rows, columns,
                caption=f"{m['cpu']} [{m['cpu_features']}], {threads} threads, ORT {ort.__version__}, "
                        f"mean of {args.runs} runs")


if __name__ == "__main__":
    main()
