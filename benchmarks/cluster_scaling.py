"""What running `vitslim compress` on Ray costs and gains on one machine: Ray's start-up, its
per-task overhead, and the wall time of one compress grid in process and on a local Ray with
1 and 2 one-CPU workers. Writes docs/results/cluster_scaling.json.

    uv run python benchmarks/cluster_scaling.py [--images DIR] [--calib 8] [--eval 32]   # alone on the machine

The grid is the real DINOv2 ViT-S/14 reference model with recipes whose build is cheap or
calibrated (token reduction, W8A8 on ONNX Runtime), so the per-candidate work is a real
build + fidelity evaluation. Every run starts from an empty cache. On this machine (2 cores)
two workers can at best halve the parallel part; the timing part is serial by design.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch

from _common import DEFAULT_IMAGES
from vitslim.bench import machine_info
from vitslim.cluster import RayEngine, ray_session
from vitslim.compress import compress
from vitslim.models import REFERENCE_NAME, load_reference_model
from vitslim.output import print_table, write_json

GRID = ["tome-8", "tome-13", "evit-0.7", "int8-fast"]
RESULT = Path(__file__).resolve().parents[1] / "docs" / "results" / "cluster_scaling.json"


@ray.remote(num_cpus=1)
def noop(x=None) -> int:
    return 0


def task_overhead(model_ref: ray.ObjectRef, repeats: int = 30) -> dict:
    """Median seconds: an empty task's round trip; a task that receives the model from the
    object store (what every candidate's build task starts with)."""
    ray.get([noop.remote() for _ in range(4)])  # workers started and warm
    empty, with_model = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        ray.get(noop.remote())
        empty.append(time.perf_counter() - start)
        start = time.perf_counter()
        ray.get(noop.remote(model_ref))
        with_model.append(time.perf_counter() - start)
    return {"empty_task_s": statistics.median(empty), "task_receiving_model_s": statistics.median(with_model),
            "repeats": repeats}


def vit_b_images_per_second(images: int = 64, batch_size: int = 32) -> float:
    """ViT-B/16's forward throughput here (random weights: the cost does not depend on them),
    with torch's default threads: what an evaluation image costs a worker of this CPU."""
    import timm

    model = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    x = torch.randn(batch_size, 3, 224, 224)
    with torch.inference_mode():
        model(x)  # warm-up
        start = time.perf_counter()
        for _ in range(images // batch_size):
            model(x)
    return images / (time.perf_counter() - start)


def run_grid(model, images: Path, n_calib: int, n_eval: int, engine=None) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        result = compress(model, images, "fidelity=0.99", recipes=GRID, n_calib=n_calib, n_eval=n_eval,
                          batch_size=8, iters=4, cache_dir=cache, sensitivity_preset=None, engine=engine,
                          early_stop=False)
        wall = time.perf_counter() - start
    candidates = [{"name": c.name, "error": c.error, "cosine": c.cosine, "phases": c.phases}
                  for c in result.candidates]
    return {"wall_s": wall, "chosen": result.chosen.name if result.chosen else None,
            "build_and_fidelity_s": sum(c.phases.get("build", 0) + c.phases.get("fidelity", 0)
                                        for c in result.candidates),
            "timing_s": sum(c.phases.get("timing", 0) for c in result.candidates), "candidates": candidates}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--calib", type=int, default=8)
    parser.add_argument("--eval", type=int, default=32)
    args = parser.parse_args()
    model = load_reference_model()
    vit_b_rate = vit_b_images_per_second()
    runs = {"in process": run_grid(model, args.images, args.calib, args.eval)}
    overhead, startup = {}, {}
    for workers in (1, 2):
        start = time.perf_counter()
        with ray_session(f"local:{workers}"):
            startup[workers] = time.perf_counter() - start
            if workers == 2:
                overhead = task_overhead(ray.put(model))
            runs[f"local:{workers}"] = run_grid(model, args.images, args.calib, args.eval, RayEngine())
    rows = [{"engine": name, "wall": r["wall_s"], "build": r["build_and_fidelity_s"], "timing": r["timing_s"],
             "chosen": r["chosen"]} for name, r in runs.items()]
    print_table("compress grid: in process vs a local Ray", rows,
                {"engine": "engine", "wall": "wall s", "build": "Σ build+fidelity s", "timing": "Σ timing s",
                 "chosen": "chosen"})
    print(f"Ray start-up: local:1 {startup[1]:.1f} s, local:2 {startup[2]:.1f} s; empty task round trip "
          f"{overhead['empty_task_s'] * 1e3:.1f} ms; task receiving the model "
          f"{overhead['task_receiving_model_s'] * 1e3:.1f} ms")
    write_json(RESULT, {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info() | {"ray": ray.__version__, "load_avg_at_end": os.getloadavg()},
        "model": REFERENCE_NAME,
        "model_params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "data": {"images": str(args.images), "calibration_images": args.calib, "evaluation_images": args.eval},
        "grid": GRID,
        "settings": {"batch_size": 8, "timed_batches": 4, "early_stop": False, "torch_threads_in_process":
                     torch.get_num_threads(), "threads_per_ray_worker": 1},
        "vit_b16_forward_img_per_s": vit_b_rate,
        "ray_startup_s": {f"local:{k}": v for k, v in startup.items()},
        "task_overhead": overhead,
        "runs": runs,
    })
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
