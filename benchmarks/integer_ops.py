"""I-ViT's integer-only ops against float: error on real activations and time, PyTorch and ORT.

    uv run python benchmarks/integer_ops.py [--images DIR] [--n 8] [--iters 5]

Captures the inputs of every block's softmax (q·kᵀ logits), GELU (fc1 output) and norm1 on
--n real images through the DINOv2 reference model, then per op: the mean absolute error of the
integer op (8-bit symmetric input, I-ViT's Shiftmax / ShiftGELU / I-LayerNorm) against the float
op on the same float input, averaged over the 12 blocks; and the time of one call on block 6's
tensor, float vs integer, in PyTorch and in ONNX Runtime (both exported by TorchScript, opset 17),
best of --iters, interleaved. The integer ops are a reference implementation of integer
arithmetic, not a speed path: see the ratio column.
"""

from __future__ import annotations

import argparse
import copy
import functools
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch
from torch import nn

from _common import DEFAULT_IMAGES
from vitslim import load_image_folder
from vitslim.bench import machine_info
from vitslim.models import load_reference_model
from vitslim.output import print_table
from vitslim.quant.integer import IntegerGELU, IntegerLayerNorm, IntegerSoftmax, calibrating


@torch.no_grad()
def capture(model: nn.Module, images: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Per block: softmax input logits, GELU input, norm1 input."""
    seen: dict[str, list[torch.Tensor]] = {"softmax": [], "gelu": [], "layernorm": []}

    def logits(attn, args):
        x = args[0]
        q, k, _ = attn.qkv(x).reshape(*x.shape[:2], 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        seen["softmax"].append((q * attn.scale) @ k.transpose(-2, -1))

    handles = []
    for block in model.blocks:
        handles += [block.attn.register_forward_pre_hook(logits),
                    block.mlp.act.register_forward_pre_hook(lambda _, a: seen["gelu"].append(a[0])),
                    block.norm1.register_forward_pre_hook(lambda _, a: seen["layernorm"].append(a[0]))]
    model(images)
    for h in handles:
        h.remove()
    return seen


def float_and_integer(op: str, norm: nn.LayerNorm) -> tuple[nn.Module, nn.Module]:
    if op == "softmax":
        return nn.Softmax(-1), IntegerSoftmax()
    if op == "gelu":
        return nn.GELU(), IntegerGELU()
    return norm, IntegerLayerNorm(copy.deepcopy(norm))


def best_time(fn, iters: int) -> float:
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def ort_runner(module: nn.Module, x: torch.Tensor, path: Path, threads: int):
    torch.onnx.export(module, (x,), str(path), opset_version=17, dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    return lambda: session.run(None, feed)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()

    model = load_reference_model()
    dataset = load_image_folder(args.images, model, limit=args.n)
    seen = capture(model, torch.stack([dataset[i][0] for i in range(len(dataset))]))
    threads = torch.get_num_threads()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for op, inputs in seen.items():
            errors = []
            for block, x in zip(model.blocks, inputs):
                float_op, int_op = float_and_integer(op, block.norm1)
                with calibrating(int_op):
                    reference = int_op(x)  # float op, and the input range recorded
                errors.append((int_op(x) - reference).abs().mean())
            x = inputs[6]
            float_op, int_op = float_and_integer(op, model.blocks[6].norm1)
            with calibrating(int_op):
                int_op(x)
            runs = {"torch float": functools.partial(float_op, x), "torch int": functools.partial(int_op, x),
                    "ort float": ort_runner(float_op, x, Path(tmp, f"{op}_f.onnx"), threads),
                    "ort int": ort_runner(int_op, x, Path(tmp, f"{op}_i.onnx"), threads)}
            ms = {name: 1e3 * best_time(fn, args.iters) for name, fn in runs.items()}
            rows.append({"op": op, "shape": "×".join(map(str, x.shape)), "mae": float(torch.stack(errors).mean()),
                         "worst": float(torch.stack(errors).max()), **ms,
                         "torch_ratio": ms["torch int"] / ms["torch float"],
                         "ort_ratio": ms["ort int"] / ms["ort float"]})
    m = machine_info()
    print_table("I-ViT integer-only ops vs float (DINOv2 ViT-S/14 activations)", rows, {
        "op": "op", "shape": "tensor (block 6)", "mae": "mean |int − float|", "worst": "worst block",
        "torch float": "torch float ms", "torch int": "torch int ms", "torch_ratio": "× slower torch",
        "ort float": "ORT float ms", "ort int": "ORT int ms", "ort_ratio": "× slower ORT"},
        caption=f"{len(dataset)} images of {args.images}; 8-bit inputs; {m['cpu']}, {threads} threads; "
                f"best of {args.iters}")


if __name__ == "__main__":
    main()
