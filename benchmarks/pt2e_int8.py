"""PyTorch's own x86 int8 path (PT2E + X86InductorQuantizer, oneDNN kernels) against vitslim on ORT.

    uv run --with torchao python benchmarks/pt2e_int8.py [--images DIR] [--calib 32] [--eval 64]

Is there a faster int8 runtime on this CPU than ONNX Runtime? The model is exported with
``torch.export``, annotated by torchao's ``X86InductorQuantizer`` (static per-tensor activations,
per-channel weights: its default config), calibrated on the same seeded images as vitslim,
converted, and compiled with ``torch.compile`` (Inductor lowers the int8 patterns to oneDNN).
Rows: PyTorch FP32 eager (baseline), ``torch.compile`` FP32, PT2E int8 compiled, vitslim
``w8a8-ort`` on ONNX Runtime; throughput at batch 8 (and 1), interleaved in one run, fidelity as
CLS cosine vs FP32 on other images. torchao is not a vitslim dependency: ``uv run --with torchao``.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

from _common import DEFAULT_IMAGES
from vitslim import calibration_split, compare, evaluate, load_image_folder, make_loader, predict, quant
from vitslim.bench import OnnxModel, machine_info
from vitslim.data import calibration_images
from vitslim.export import export_onnx
from vitslim.models import load_reference_model
from vitslim.output import print_table


def pt2e_int8(model: torch.nn.Module, calib: torch.Tensor, batch_size: int) -> torch.nn.Module:
    """PT2E static int8 with the x86 Inductor quantizer, compiled (the documented recipe)."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    example = (calib[:batch_size],)
    exported = torch.export.export(model, example, dynamic_shapes=({0: torch.export.Dim("batch", max=64)},)).module()
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for i in range(0, len(calib), batch_size):
            prepared(calib[i : i + batch_size])
    converted = convert_pt2e(prepared)
    return torch.compile(converted)


class Compiled(torch.nn.Module):
    """Keeps ``evaluate`` on the plain forward (a compiled graph module has no forward_features)."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--calib", type=int, default=32)
    parser.add_argument("--eval", type=int, default=64)
    parser.add_argument("--iters", type=int, default=8, help="timed batches of 8 (4x that at batch 1)")
    args = parser.parse_args()

    model = load_reference_model()
    calib_set, eval_set = calibration_split(load_image_folder(args.images, model), args.calib, seed=0)
    eval_set.indices = eval_set.indices[: args.eval]
    calib, loader = calibration_images(calib_set), make_loader(eval_set, 8)
    made, seconds = {"PyTorch FP32 eager": model}, {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        def timed(name, fn):
            start = time.perf_counter()
            made[name] = fn()
            made[name](calib[:8])  # compile happens on the first call: count it as making time
            made[name](calib[:1])
            seconds[name] = time.perf_counter() - start
            print(f"made {name} in {seconds[name]:.0f} s", flush=True)

        timed("torch.compile FP32", lambda: Compiled(torch.compile(model)))
        timed("PT2E X86InductorQuantizer int8 (compiled)", lambda: Compiled(pt2e_int8(model, calib, 8)))
        timed("vitslim w8a8-ort on ORT", lambda: OnnxModel(export_onnx(
            quant.quantize_(copy.deepcopy(model), quant.preset("w8a8-ort"), calib), Path(tmp) / "q.onnx")))
        speed = {b: compare(made, batch_size=b, iters=args.iters * (4 if b == 1 else 1), warmup=2, flops=False)
                 for b in (1, 8)}
        reference = predict(model, loader, "FP32")
        rows = []
        for i, (name, candidate) in enumerate(made.items()):
            fid = evaluate(candidate, loader, reference=reference)
            rows.append({"name": name, "x_b1": speed[1][i].speedup, "x_b8": speed[8][i].speedup,
                         "cosine": fid.cosine, "make_s": seconds.get(name)})
    m = machine_info()
    print_table("PyTorch's x86 int8 path vs vitslim on ONNX Runtime (DINOv2 ViT-S/14)", rows,
                {"name": "runtime / model", "x_b1": "× eager b1", "x_b8": "× eager b8", "cosine": "cosine vs FP32",
                 "make_s": "make s (incl. compile)"},
                caption=f"{m['cpu']}, {m['torch_threads']} threads, interleaved; calibration {args.calib} images, "
                        f"fidelity on {args.eval} others of {args.images}")


if __name__ == "__main__":
    main()
