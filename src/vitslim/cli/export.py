"""`vitslim export`: write an ONNX file that ONNX Runtime (int8 kernels when quantized) or OpenVINO runs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from vitslim.errors import ConfigError
from vitslim.output import check_output_file, console
from vitslim.quant.config import QuantConfig, deployable_presets, deployment, simulated_parts

if TYPE_CHECKING:
    from vitslim.export.config import ExportConfig


def export_cmd(
    model: str = typer.Argument(
        ..., help="A folder saved by vitslim (`quantize`, `prune`, `apply`, `compress`), or a model name (FP32)."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="The .onnx file to write."),
    force: bool = typer.Option(False, "--force", help="Replace --out even if vitslim did not write what is there."),
    fmt: str = typer.Option("onnx", "--format", help="Only onnx for now."),
    tome: Optional[int] = typer.Option(
        None, "--tome", help="Also merge this many tokens per block (ToMe) before export."
    ),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Local weights when MODEL is a name."),
    verify: Optional[Path] = typer.Option(
        None, "--verify", help="Check ONNX Runtime against PyTorch on images from this folder."
    ),
    runtime: str = typer.Option(
        "onnxruntime", "--runtime", help="onnxruntime, or openvino (needs the openvino extra: writes the portable "
        "Q/DQ graph and records the precision hint OpenVINO runs it with)."
    ),
    precision: str = typer.Option(
        "auto", "--precision", help="OpenVINO's hint for the float parts: bf16, f32, or auto (bf16 where this CPU "
        "has native bfloat16). It changes the outputs slightly: check with --verify."
    ),
    portable: bool = typer.Option(
        False, "--portable", help="Standard Q/DQ ops only, for runtimes other than ONNX Runtime (by default each "
        "int8 linear is one ORT MatMulIntegerToFloat with its bias, and a Hardswish gate after an int8 conv one "
        "QLinearAdd: faster in ORT). 4-bit weights stay ORT's MatMulNBits."
    ),
    simulate: bool = typer.Option(
        False, "--simulate", help="Also export a simulation-only quantized model (its quantizers as float "
        "fake-quant arithmetic: faithful to PyTorch, not faster); refused without it."
    ),
) -> None:
    """Export to ONNX. vitslim's own 8-bit scales become QuantizeLinear/DequantizeLinear pairs
    that ONNX Runtime fuses into int8 matmuls, and each int8 linear is written as one ORT
    MatMulIntegerToFloat with its bias, each Hardswish gate after an int8 conv one QLinearAdd
    (--portable: standard ops only). A model quantized with a simulation-only preset (`w8a8`,
    `w6a6`, `w4a4`, ...: log-domain or sub-8-bit activations, which no integer kernel runs) is
    refused unless --simulate: its graph would compute the quantization in float arithmetic.

    The file carries its contract (input preprocessing, output meaning, recipe) in its
    metadata, so `vitslim predict` can run it.

    With --runtime openvino the file holds standard ops only, and the artifact names OpenVINO
    and its precision hint: `vitslim predict`, `bench` and `eval` run it in OpenVINO.

    Example: vitslim export q-w8a8-ort/ --out model.onnx --verify images/
    """
    from vitslim.artifact import load, save, write_contract
    from vitslim.artifact.outputs import claim_artifact_path
    from vitslim.data import calibration_images, list_images, load_image_folder
    from vitslim.export import integer_ops, validate_onnx
    from vitslim.recipes import Recipe
    from vitslim.tokens import ToMeConfig, reduce_tokens_

    if fmt != "onnx":
        raise ConfigError(f"--format {fmt!r} is not supported; use onnx")
    step = _export_step(runtime, precision)
    check_output_file(out, "--out")
    if out.suffix != ".onnx":
        raise ConfigError(f"--out {str(out)!r}: give a file name ending in .onnx")
    claim_artifact_path(out, force, "--out")
    if verify:
        list_images(verify)  # a bad --verify folder fails now, not after the export
    torch_model, source, steps = _load_for_export(model, checkpoint)
    if not simulate:
        _refuse_simulations(model, steps)
    if tome:
        merging = ToMeConfig(r=tome)
        reduce_tokens_(torch_model, merging)
        steps = [merging, *steps]
    recipe = Recipe(f"export of {Path(model).name}"[:100], (*steps, step))
    path = save(torch_model, out, source, recipe, ort_kernels=not portable and step.runtime == "onnxruntime",
                force=force)
    artifact = load(path)
    if step.runtime == "onnxruntime":
        console.print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB); integer kernels in ONNX Runtime: "
                      f"{integer_ops(path) or 'none'}")
    else:
        console.print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) for OpenVINO, precision hint "
                      f"{step.precision}")
    for quantized in (s for s in steps if isinstance(s, QuantConfig)):
        console.print(deployment(quantized))
    if verify:
        images = calibration_images(load_image_folder(verify, torch_model, limit=16))
        r = validate_onnx(torch_model, path, images, runner=artifact.model)
        console.print(
            f"{step.label} vs PyTorch on {r['images']} images: cosine {r['cosine']:.6f}, "
            f"SQNR {r['sqnr_db']:.1f} dB, max |diff| {r['max_abs_diff']:.2e}"
        )
        write_contract(path, artifact.contract.with_fidelity({**r, "data": verify.name,
                                                              "vs": "the PyTorch model it was exported from"}))


def _export_step(runtime: str, precision: str) -> ExportConfig:
    """The export step --runtime and --precision ask for; OpenVINO is checked to be installed."""
    from vitslim.export.config import ExportConfig

    if runtime != "openvino":
        if precision != "auto":
            raise ConfigError("--precision is OpenVINO's hint: use it with --runtime openvino")
        return ExportConfig(runtime=runtime)
    from vitslim.openvino_runtime import default_precision, require_openvino

    require_openvino()  # not installed: one clear line now, before the model loads
    return ExportConfig(runtime="openvino", precision=default_precision() if precision == "auto" else precision)


def _refuse_simulations(model: str, steps: list) -> None:
    """A one-line error when a quantization step is simulation-only (see ``deployment``)."""
    for step in steps:
        if isinstance(step, QuantConfig) and simulated_parts(step):
            raise ConfigError(f"{model} is a simulation ({deployment(step).removeprefix('simulation: ')}): its "
                              "graph would not run on integer kernels; quantize with a deployable preset "
                              f"({', '.join(deployable_presets())}), or pass --simulate to write it anyway")


def _load_for_export(model: str, checkpoint: Optional[Path]):
    """The PyTorch model, where it came from, and the recipe steps already applied to it."""
    from vitslim.artifact import ModelSource, load
    from vitslim.recipes import recipe_from_dict
    from vitslim.workflows import load_any

    if Path(model).is_dir() and not model.startswith("hf:"):  # a folder saved by vitslim
        artifact = load(model)
        src = artifact.contract.source
        source = ModelSource(src["name"], src.get("checkpoint"), src.get("timm_kwargs") or {})
        return artifact.model, source, list(recipe_from_dict(artifact.contract.recipe).steps)
    return load_any(model, checkpoint), ModelSource(model, str(checkpoint) if checkpoint else None), []
