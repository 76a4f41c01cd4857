"""Deployment: vitslim's int8 ONNX exports against ONNX Runtime's own quantizers, one run.

    uv run python benchmarks/deploy_table.py [--images DIR] [--eval 128] [--models dinov2,deit]

Rows per model: PyTorch FP32 eager (the baseline), ``torch.compile`` FP32, ORT FP32, ORT
``quantize_static`` INT8 with each of its calibrators (MinMax, Entropy, Percentile; QDQ,
per-channel weights), ORT
``quantize_dynamic`` INT8, vitslim W8A8 on ORT (``w8a8-int``: every site int8; ``w8a8-ort``:
attn·v left in float), and vitslim ``w8a8-ort`` + ToMe on ORT; ``w8a8-ort`` also with plain Q/DQ
linears (``ort_kernels=False``: what writing each int8 linear as one ``MatMulIntegerToFloat``
with its bias buys, ``vitslim.export.int8_linear``);
4-bit weights in ``MatMulNBits``: vitslim ``w4-ort`` (GPTQ codes, ``vitslim.export.nbits``) and
ORT's own ``MatMulNBitsQuantizer`` (round to nearest, block 32) as the peer. All calibrate on the
same seeded 32 images; fidelity (feature cosine vs PyTorch FP32) is measured on --eval other
images, and only for the real DINOv2 reference model (DeiT-S has random weights here: no hub, so
its fidelity would mean nothing). Throughput ratios come from one interleaved run per batch size
(see ``vitslim.compare``)."""

from __future__ import annotations

import argparse
import copy
import logging
import tempfile
import time
from pathlib import Path

import timm
import torch

from _common import DEFAULT_IMAGES
from vitslim import calibration_split, compare, evaluate, load_image_folder, make_loader, predict, quant, tokens
from vitslim.bench import OnnxModel, machine_info
from vitslim.data import calibration_images
from vitslim.export import export_onnx
from vitslim.models import load_reference_model
from vitslim.output import print_table

ORT_CALIBRATORS = ("MinMax", "Entropy", "Percentile")


class _Calibration:
    """ONNX Runtime's CalibrationDataReader protocol over a tensor of images."""

    def __init__(self, input_name: str, images: torch.Tensor) -> None:
        self.feeds = iter([{input_name: images[i : i + 1].numpy()} for i in range(len(images))])

    def get_next(self):
        return next(self.feeds, None)


def ort_quantize_static(fp32: Path, calib: torch.Tensor, calibrator: str, out: Path) -> Path:
    """The peer: ORT's static int8 quantization with its own calibration (QDQ, per channel)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    prepared = out.with_suffix(".prep.onnx")
    quant_pre_process(str(fp32), str(prepared))
    quantize_static(str(prepared), str(out), _Calibration(OnnxModel(fp32).input_name, calib),
                    quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, calibrate_method=getattr(CalibrationMethod, calibrator))
    return out


def ort_quantize_dynamic(fp32: Path, out: Path) -> Path:
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

    prepared = out.with_suffix(".prep.onnx")
    quant_pre_process(str(fp32), str(prepared))
    quantize_dynamic(str(prepared), str(out), weight_type=QuantType.QInt8, per_channel=True)
    return out


def ort_matmul_nbits(fp32: Path, out: Path) -> Path:
    """The peer for 4-bit weights: ORT's own weight-only quantizer (RTN, symmetric, block 32,
    int8 activations inside the kernel as for vitslim's)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32)), block_size=32, is_symmetric=True, accuracy_level=4)
    quantizer.process()
    quantizer.model.save_model_to_file(str(out))
    return out


def candidates(model: torch.nn.Module, calib: torch.Tensor, tmp: Path, tome_r: list[int], static: bool = True) -> dict:
    """Every deployment candidate of ``model``, with how long it took to make."""
    made, seconds = {"PyTorch FP32 eager": model}, {}

    def timed(name, fn):
        start = time.perf_counter()
        made[name] = fn()
        seconds[name] = time.perf_counter() - start
        print(f"  made {name} in {seconds[name]:.1f} s", flush=True)

    made["torch.compile FP32"] = torch.compile(model)  # compiles on its first call (the untimed warm-up)
    fp32 = export_onnx(model, tmp / "fp32.onnx")
    made["ORT FP32"] = fp32
    for calibrator in ORT_CALIBRATORS if static else ():
        timed(f"ORT quantize_static {calibrator}",
              lambda c=calibrator: ort_quantize_static(fp32, calib, c, tmp / f"static_{c}.onnx"))
    timed("ORT quantize_dynamic", lambda: ort_quantize_dynamic(fp32, tmp / "dynamic.onnx"))
    def quantized(preset: str, base: torch.nn.Module = model) -> torch.nn.Module:
        return quant.quantize_(copy.deepcopy(base), quant.preset(preset), calib)

    qmodels = {}
    for preset in ("w8a8-int", "w8a8-ort"):
        timed(f"vitslim {preset}", lambda p=preset: export_onnx(qmodels.setdefault(p, quantized(p)), tmp / f"{p}.onnx"))
    timed("vitslim w8a8-ort, plain Q/DQ linears",
          lambda: export_onnx(qmodels["w8a8-ort"], tmp / "w8a8-ort-qdq.onnx", ort_kernels=False))
    timed("vitslim w4-ort (MatMulNBits)", lambda: export_onnx(quantized("w4-ort"), tmp / "w4.onnx"))
    timed("ORT MatMulNBits RTN b32", lambda: ort_matmul_nbits(fp32, tmp / "ort_nbits.onnx"))
    for r in tome_r:  # merge first, then calibrate on the merged model: what the user would run
        merged = tokens.reduce_tokens_(copy.deepcopy(model), tokens.ToMeConfig(r=r))
        timed(f"vitslim w8a8-ort + ToMe r={r}",
              lambda m=merged, r=r: export_onnx(quantized("w8a8-ort", m), tmp / f"tome{r}.onnx"))
    return {"models": made, "seconds": seconds}


def measure(name: str, model: torch.nn.Module, calib: torch.Tensor, loader, args) -> list[dict]:
    print(f"{name}:", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        made = candidates(model, calib, Path(tmp), args.tome_r, not args.skip_static)
        models = made["models"]
        speed = {b: compare(models, batch_size=b, iters=args.iters * (4 if b == 1 else 1), warmup=2, flops=False,
                            warm_each=args.warm) for b in (1, 8)}
        reference = predict(model, loader, f"{name} FP32") if loader else None
        rows = []
        for i, (cname, candidate) in enumerate(models.items()):
            b8 = speed[8][i]
            fid = evaluate(OnnxModel(candidate) if isinstance(candidate, Path) else candidate, loader,
                           reference=reference) if loader else None
            rows.append({"model": name, "name": cname, "x_b1": speed[1][i].speedup, "x_b8": speed[8][i].speedup,
                         "img_s_b8": b8.throughput, "size_mb": b8.size_mb,
                         "cosine": fid.cosine if fid else None, "sqnr_db": fid.sqnr_db if fid else None,
                         "make_s": made["seconds"].get(cname)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--calib", type=int, default=32)
    parser.add_argument("--eval", type=int, default=128)
    parser.add_argument("--iters", type=int, default=8, help="timed batches at batch 8 (4x that at batch 1)")
    parser.add_argument("--warm", action="store_true",
                        help="run each model once, untimed, before each of its timed batches (caches as a one-model "
                             "service has them; vitslim.compare's warm_each)")
    parser.add_argument("--tome-r", default="8,13", help="comma list of ToMe merge counts")
    parser.add_argument("--models", default="dinov2,deit")
    parser.add_argument("--skip-static", action="store_true", help="leave out ORT quantize_static (3 calibrators)")
    args = parser.parse_args()
    args.tome_r = [int(r) for r in args.tome_r.split(",") if r]

    torch.manual_seed(0)
    logging.getLogger().setLevel(logging.ERROR)  # ORT's quantization tools warn per LayerNorm weight
    rows = []
    for key in args.models.split(","):
        if key == "dinov2":
            model, name = load_reference_model(), "DINOv2 ViT-S/14"
        else:
            model = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
            name = "DeiT-S (random weights)"
        calib_set, eval_set = calibration_split(load_image_folder(args.images, model), args.calib, seed=0)
        eval_set.indices = eval_set.indices[: args.eval]
        loader = make_loader(eval_set, 32) if key == "dinov2" else None
        rows += measure(name, model, calibration_images(calib_set), loader, args)
    m = machine_info()
    print_table("deployment on ONNX Runtime vs PyTorch FP32 eager", rows, {
        "model": "model", "name": "candidate", "x_b1": "× eager b1", "x_b8": "× eager b8", "img_s_b8": "img/s b8",
        "size_mb": "size MB", "cosine": "cosine vs FP32", "sqnr_db": "SQNR dB", "make_s": "make s"},
        caption=f"{m['cpu']} [{m['cpu_features']}], {m['torch_threads']} threads (PyTorch and ORT), "
                f"{args.iters} timed batches at batch 8 "
                f"and {4 * args.iters} at batch 1, interleaved{', each warm' if args.warm else ''}; "
                f"calibration {args.calib} images, fidelity on "
                f"{args.eval} others of {args.images}")


if __name__ == "__main__":
    main()
