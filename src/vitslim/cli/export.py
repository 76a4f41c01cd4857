"""`vitslim export`: write an ONNX file that ONNX Runtime runs (int8 kernels when quantized)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from vitslim.errors import ConfigError
from vitslim.output import check_output_file, console
from vitslim.quant.config import QuantConfig, deployable_presets, deployment, simulated_parts


def export_cmd(
    model: str = typer.Argument(
        ..., help="A folder written by `vitslim quantize` or `vitslim apply`, or a model name (FP32)."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="The .onnx file to write."),
    fmt: str = typer.Option("onnx", "--format", help="Only onnx for now."),
    tome: Optional[int] = typer.Option(
        None, "--tome", help="Also merge this many tokens per block (ToMe) before export."
    ),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Local weights when MODEL is a name."),
    verify: Optional[Path] = typer.Option(
        None, "--verify", help="Check ONNX Runtime against PyTorch on images from this folder."
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

    Example: vitslim export q-w8a8-ort/ --out model.onnx --verify images/
    """
    from vitslim.compress.recipes import Recipe
    from vitslim.data import calibration_images, list_images, load_image_folder
    from vitslim.deploy import contract_for, write_contract
    from vitslim.export import export_onnx, integer_ops, validate_onnx
    from vitslim.export.config import ExportConfig
    from vitslim.tokens import ToMeConfig, reduce_tokens_

    if fmt != "onnx":
        raise ConfigError(f"--format {fmt!r} is not supported; use onnx")
    check_output_file(out, "--out")
    if verify:
        list_images(verify)  # a bad --verify folder fails now, not after the export
    torch_model, source, steps = _load_for_export(model, checkpoint)
    if not simulate:
        _refuse_simulations(model, steps)
    if tome:
        merging = ToMeConfig(r=tome)
        reduce_tokens_(torch_model, merging)
        steps = [merging, *steps]
    path = export_onnx(torch_model, out, ort_kernels=not portable)
    recipe = Recipe(f"export of {Path(model).name}", (*steps, ExportConfig()))
    contract = contract_for(torch_model, source, recipe.to_dict())
    quantized = [step for step in steps if isinstance(step, QuantConfig)]
    console.print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB); integer kernels in ONNX Runtime: "
                  f"{integer_ops(path) or 'none'}")
    for step in quantized:
        console.print(deployment(step))
    if verify:
        images = calibration_images(load_image_folder(verify, torch_model, limit=16))
        r = validate_onnx(torch_model, path, images)
        console.print(
            f"ONNX Runtime vs PyTorch on {r['images']} images: cosine {r['cosine']:.6f}, "
            f"SQNR {r['sqnr_db']:.1f} dB, max |diff| {r['max_abs_diff']:.2e}"
        )
        contract = contract.with_fidelity({**r, "data": str(verify), "vs": "the PyTorch model it was exported from"})
    write_contract(path, contract)


def _refuse_simulations(model: str, steps: list) -> None:
    """A one-line error when a quantization step is simulation-only (see ``deployment``)."""
    for step in steps:
        if isinstance(step, QuantConfig) and simulated_parts(step):
            raise ConfigError(f"{model} is a simulation ({deployment(step).removeprefix('simulation: ')}): its "
                              "graph would not run on integer kernels; quantize with a deployable preset "
                              f"({', '.join(deployable_presets())}), or pass --simulate to write it anyway")


def _load_for_export(model: str, checkpoint: Optional[Path]):
    """The PyTorch model, where it came from, and the recipe steps already applied to it."""
    from vitslim.compress.recipes import recipe_from_dict
    from vitslim.deploy import ModelSource, load_artifact
    from vitslim.quant.io import META_FILE, load_quantized
    from vitslim.workflows import load_any

    folder = Path(model)
    if (folder / "vitslim.json").is_file():  # a folder from `vitslim apply` / `vitslim compress`
        artifact = load_artifact(folder)
        src = artifact.contract.source
        source = ModelSource(src["name"], src.get("checkpoint"), src.get("timm_kwargs") or {})
        return artifact.model, source, list(recipe_from_dict(artifact.contract.recipe).steps)
    if folder.is_dir():  # a folder from `vitslim quantize`
        meta = json.loads((folder / META_FILE).read_text()) if (folder / META_FILE).is_file() else {}
        qmodel = load_quantized(folder)
        source = ModelSource(meta["model"], timm_kwargs=meta.get("timm_kwargs") or {})
        return qmodel, source, [QuantConfig.from_dict(meta["config"])]
    return load_any(model, checkpoint), ModelSource(model, str(checkpoint) if checkpoint else None), []
