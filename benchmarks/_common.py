"""What the benchmark scripts share: default images, how a run is recorded, speeds only from undisturbed runs."""

from pathlib import Path

SHARED_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"
BUNDLED_IMAGES = Path(__file__).resolve().parents[1] / "src" / "vitslim" / "assets" / "example_images"
# The 500 shared ImageNet photos beside the project when present, else the 16 bundled ones.
DEFAULT_IMAGES = SHARED_IMAGES if SHARED_IMAGES.is_dir() else BUNDLED_IMAGES


def write_results(benchmark: str, results: list[dict], argv: list[str] | None = None) -> Path:
    """Write ``results`` to ``docs/results/<benchmark>.json`` in the layout the documentation
    renders (``docs/results.md``), each completed with what it was measured on: the command
    (``argv``, default this process's), the date, the CPU with its ISA flags, the thread count
    and the library versions. Each result brings its own ``title``, ``family``, ``model``,
    ``data`` ({"name", "images", "note"}), ``columns``, ``rows`` and optional ``headline`` and
    ``summary``."""
    import contextlib
    import datetime
    import importlib.metadata
    import json
    import os
    import sys

    import torch

    from vitslim.bench import cpu_features

    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), []) if Path("/proc/cpuinfo").exists() else []
    isa = [flag for flag in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16") if flag in flags]
    versions = {}
    for package in ("vitslim", "torch", "timm", "onnxruntime", "openvino", "nncf", "transformers"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    context = {
        "command": "uv run python " + " ".join(argv if argv is not None else sys.argv),
        "date": datetime.date.today().isoformat(),
        "machine": {"cpu": cpu_features().model_name, "isa": isa, "cores": os.cpu_count(),
                    "threads": torch.get_num_threads()},
        "versions": versions,
    }
    path = Path(__file__).resolve().parents[1] / "docs" / "results" / f"{benchmark}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"benchmark": benchmark, "results": [context | r for r in results]}, indent=1,
                              ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


DISTURBED_NOTE = "speeds left out where other processes took the CPU during the timing"


def undisturbed_speed(result, speed_key: str, latency_key: str) -> dict:
    """A ``vitslim.compare`` result's speedup, its 95% interval (``<speed_key>_ci``, as the results
    page renders it) and its median latency as row fields; none when another process took the CPU
    during the timing (no figure)."""
    if result.disturbed:
        return {}
    return {speed_key: result.speedup, f"{speed_key}_ci": [result.speedup_low, result.speedup_high],
            latency_key: result.latency_ms_median}
