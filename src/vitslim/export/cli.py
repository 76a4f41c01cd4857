"""`vitslim export`: write an ONNX file that ONNX Runtime runs (int8 kernels when quantized)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from vitslim.output import check_output_file, console


def register(app: typer.Typer) -> None:
    app.command("export")(export_cmd)


def export_cmd(
    model: str = typer.Argument(..., help="A folder written by `vitslim quantize`, or a model name (FP32)."),
    out: Path = typer.Option(..., "--out", "-o", help="The .onnx file to write."),
    fmt: str = typer.Option("onnx", "--format", help="Only onnx for now."),
    tome: Optional[int] = typer.Option(None, "--tome", help="Also merge this many tokens per block (ToMe) before export."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Local weights when MODEL is a name."),
    verify: Optional[Path] = typer.Option(None, "--verify", help="Check ONNX Runtime against PyTorch on images from this folder."),
) -> None:
    """Export to ONNX. vitslim's own 8-bit scales become QuantizeLinear/DequantizeLinear pairs
    that ONNX Runtime fuses into int8 matmuls; log-domain and sub-8-bit quantizers are exported
    as float arithmetic (accurate, not faster).

    Example: vitslim export q-w8a8/ --out model.onnx --verify images/
    """
    from vitslim import tokens
    from vitslim.api import load_any
    from vitslim.errors import ConfigError
    from vitslim.export import export_onnx, integer_ops, validate_onnx

    if fmt != "onnx":
        raise ConfigError(f"--format {fmt!r} is not supported; use onnx")
    check_output_file(out, "--out")
    if Path(model).is_dir():
        from vitslim.quant.io import load_quantized

        torch_model = load_quantized(model)
    else:
        torch_model = load_any(model, checkpoint)
    if tome:
        tokens.apply(torch_model, "tome", r=tome)
    path = export_onnx(torch_model, out)
    console.print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB); integer kernels in ONNX Runtime: "
                  f"{integer_ops(path) or 'none (float model)'}")
    if verify:
        from vitslim.data import calibration_images, load_image_folder

        images = calibration_images(load_image_folder(verify, torch_model, limit=16))
        r = validate_onnx(torch_model, path, images)
        console.print(f"ONNX Runtime vs PyTorch on {r['images']} images: cosine {r['cosine']:.6f}, "
                      f"SQNR {r['sqnr_db']:.1f} dB, max |diff| {r['max_abs_diff']:.2e}")
