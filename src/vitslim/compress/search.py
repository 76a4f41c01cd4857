"""Search: evaluate candidate recipes on the user's images and CPU, pick the best that meets
a target, with every evaluation cached on disk so a search resumes and repeats for free.

A candidate evaluation is a pure function of (model weights, recipe, image files, settings,
seed); its key hashes all of them. Each result is its own JSON file, written through a
temporary file and a rename, so an interrupted search leaves only whole results behind.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import vitslim
from vitslim.bench import compare, machine_info
from vitslim.compress.recipes import BUILTIN_RECIPES, Recipe
from vitslim.compress.steps import apply_recipe
from vitslim.data import calibration_images, calibration_split, load_image_folder, make_loader
from vitslim.errors import ConfigError
from vitslim.evaluate import Outputs, compare_outputs, predict
from vitslim.output import write_json
from vitslim.progress import progress_bar

TARGET_METRICS = {
    "speedup": "throughput ratio to the FP32 original, at least",
    "fidelity": "feature cosine similarity to the FP32 original, at least",
    "latency_ms": "median batch latency in milliseconds, at most",
}
DEFAULT_GRID = ("fp32", "bf16", "tome-8", "tome-13", "evit-0.7", "bf16-tome", "bf16-tome-13", "ort-fp32",
                "int8-fast", "int8-tome", "int8-tome-13", "prune-0.7", "prune-int8-tome")


@dataclass(frozen=True)
class Target:
    """What the user asks for, e.g. ``Target("speedup", 3.0)``."""

    metric: str
    value: float

    @classmethod
    def parse(cls, text: str) -> "Target":
        name, _, value = text.partition("=")
        if name not in TARGET_METRICS or not value:
            raise ConfigError(f"target {text!r} not understood; use one of "
                              + ", ".join(f"{m}=N ({d})" for m, d in TARGET_METRICS.items()))
        try:
            return cls(name, float(value))
        except ValueError:
            raise ConfigError(f"target {text!r}: {value!r} is not a number") from None

    def met_by(self, c: "CandidateResult") -> bool:
        if c.error:
            return False
        if self.metric == "latency_ms":
            return c.latency_ms <= self.value
        return self.measure(c) >= self.value

    def measure(self, c: "CandidateResult") -> float:
        return {"speedup": c.speedup, "fidelity": c.cosine, "latency_ms": c.latency_ms}[self.metric]


@dataclass
class CandidateResult:
    """One recipe's measured figures (fidelity vs FP32 on the evaluation images, speed vs
    the FP32 original timed side by side in the same run)."""

    recipe: dict
    key: str
    cosine: float | None = None
    sqnr_db: float | None = None
    top1_agreement: float | None = None
    speedup: float | None = None
    throughput: float | None = None
    latency_ms: float | None = None
    size_mb: float | None = None
    runtime: str | None = None
    eval_images: int = 0
    calib_images: int = 0
    seconds: float = 0.0
    error: str | None = None

    @property
    def name(self) -> str:
        return self.recipe["name"]


@dataclass
class SearchResult:
    """The outcome: the chosen candidate, whether it meets the target, and every candidate."""

    target: Target
    chosen: CandidateResult | None
    met: bool
    reason: str
    candidates: list[CandidateResult]
    settings: dict = field(default_factory=dict)
    machine: dict = field(default_factory=dict)
    sensitivity: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"target": asdict(self.target), "met": self.met, "reason": self.reason,
                "chosen": asdict(self.chosen) if self.chosen else None,
                "candidates": [asdict(c) for c in self.candidates], "settings": self.settings,
                "machine": self.machine, "sensitivity": self.sensitivity}


def fingerprint_model(model: nn.Module) -> str:
    """Hash of the architecture name and every weight: the cache key's model part."""
    h = hashlib.sha256(type(model).__name__.encode())
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def fingerprint_files(paths: list[Path]) -> str:
    """Hash of the image files' names, sizes and modification times."""
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def candidate_key(model_fp: str, data_fp: str, recipe: Recipe, settings: dict) -> str:
    payload = json.dumps({"model": model_fp, "data": data_fp, "recipe": recipe.to_dict()["steps"],
                          "settings": settings, "vitslim": vitslim.__version__}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


class ResultStore:
    """One JSON file per evaluated candidate, keyed by its hash; writes are atomic."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def get(self, key: str) -> CandidateResult | None:
        path = self.root / f"{key}.json"
        if not path.is_file():
            return None
        return CandidateResult(**json.loads(path.read_text()))

    def put(self, result: CandidateResult) -> None:
        write_json(self.root / f"{result.key}.json", asdict(result))


def evaluate_candidate(
    model: nn.Module,
    recipe: Recipe,
    key: str,
    calib: torch.Tensor,
    eval_loader,
    reference: Outputs,
    batch_size: int,
    iters: int,
) -> CandidateResult:
    """Apply ``recipe`` to a copy of ``model``, then measure fidelity and speed."""
    start = time.perf_counter()
    result = CandidateResult(recipe=recipe.to_dict(), key=key, calib_images=len(calib))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            candidate = apply_recipe(model, recipe, calib, Path(tmp))
            fidelity = compare_outputs(predict(candidate, eval_loader, recipe.name), reference)
            base, cand = compare({"FP32": model, recipe.name: candidate}, batch_size=batch_size,
                                 warmup=2, iters=iters, flops=False)
    except Exception as err:  # a failing candidate is reported, not fatal to the search
        result.error = f"{type(err).__name__}: {err}"
        result.seconds = time.perf_counter() - start
        return result
    result.cosine, result.sqnr_db = fidelity.cosine, fidelity.sqnr_db
    result.top1_agreement, result.eval_images = fidelity.top1_agreement, fidelity.images
    result.speedup, result.throughput = cand.speedup, cand.throughput
    result.latency_ms, result.size_mb, result.runtime = cand.latency_ms_median, cand.size_mb, cand.runtime
    result.seconds = time.perf_counter() - start
    return result


def choose(target: Target, candidates: list[CandidateResult]) -> tuple[CandidateResult | None, bool, str]:
    """Best candidate meeting the target (the other figure as high as possible), or the
    closest one when none does."""
    ok = [c for c in candidates if not c.error]
    if not ok:
        return None, False, "every candidate failed; see the errors in the table"
    feasible = [c for c in ok if target.met_by(c)]
    if feasible:
        if target.metric == "fidelity":
            best = max(feasible, key=lambda c: c.speedup)
            why = f"fastest of the {len(feasible)} candidates with cosine ≥ {target.value}"
        else:
            best = max(feasible, key=lambda c: c.cosine)
            bound = f"speedup ≥ {target.value}" if target.metric == "speedup" else f"latency ≤ {target.value} ms"
            why = f"highest fidelity of the {len(feasible)} candidates with {bound}"
        return best, True, why
    if target.metric == "latency_ms":
        closest = min(ok, key=lambda c: c.latency_ms)
    else:
        closest = max(ok, key=target.measure)
    return closest, False, (f"no candidate meets {target.metric}={target.value}; the closest is "
                            f"{closest.name} with {target.metric}={target.measure(closest):.4g}")


def pareto_front(candidates: list[CandidateResult]) -> list[CandidateResult]:
    """Candidates no other candidate beats on both speedup and fidelity."""
    ok = [c for c in candidates if not c.error]
    return [c for c in ok if not any(
        o.speedup >= c.speedup and o.cosine >= c.cosine and (o.speedup > c.speedup or o.cosine > c.cosine)
        for o in ok)]


def compress(
    model: nn.Module,
    data: str | Path,
    target: Target | str,
    recipes: list[Recipe | str] | None = None,
    n_calib: int = 32,
    n_eval: int = 64,
    seed: int = 0,
    batch_size: int = 8,
    iters: int = 6,
    cache_dir: str | Path | None = None,
    on_result: Callable[[CandidateResult, bool], None] | None = None,
    sensitivity_preset: str | None = "w4a4",
) -> SearchResult:
    """Find the best recipe for ``model`` that meets ``target`` on this machine.

    Candidates (default: the built-in grid, cheapest first) are applied to a copy of the
    model, evaluated against the FP32 model on ``n_eval`` images (disjoint from the
    ``n_calib`` calibration images, seeded) and timed side by side with it. Results are
    cached under ``cache_dir``; ``on_result(result, from_cache)`` reports progress. With
    ``sensitivity_preset``, the report also shows each block's sensitivity to quantization.
    """
    target = Target.parse(target) if isinstance(target, str) else target
    grid = [BUILTIN_RECIPES[r] if isinstance(r, str) else r for r in (recipes or DEFAULT_GRID)]
    dataset = load_image_folder(data, model)
    calib_set, eval_set = calibration_split(dataset, n_calib, seed)
    eval_set.indices = eval_set.indices[:n_eval]
    if not eval_set.indices:
        raise ConfigError(f"{len(dataset)} images leave none for evaluation after {n_calib} for "
                          "calibration; add images or lower --calib-images")
    settings = {"n_calib": len(calib_set), "n_eval": len(eval_set), "seed": seed,
                "batch_size": batch_size, "iters": iters}
    files = [dataset.samples[i][0] for i in calib_set.indices + eval_set.indices]
    model_fp, data_fp = fingerprint_model(model), fingerprint_files(files)
    store = ResultStore(Path(cache_dir) if cache_dir else _default_cache() / model_fp)
    calib = calibration_images(calib_set) if n_calib else torch.empty(0)
    eval_loader = make_loader(eval_set, batch_size=32)
    reference: Outputs | None = None
    results = []
    for recipe in progress_bar(grid, "candidates"):
        key = candidate_key(model_fp, data_fp, recipe, settings)
        cached = store.get(key)
        if cached is None:
            reference = reference or predict(model, eval_loader, "FP32 reference")
            cached = evaluate_candidate(model, recipe, key, calib, eval_loader, reference, batch_size, iters)
            store.put(cached)
            if on_result:
                on_result(cached, False)
        elif on_result:
            on_result(cached, True)
        results.append(cached)
    chosen, met, reason = choose(target, results)
    sensitivity = []
    if sensitivity_preset and len(calib):
        sample = torch.cat([b[0] for b in eval_loader if b is not None])[:16]
        sensitivity = block_sensitivity(model, calib, sample, sensitivity_preset)
    return SearchResult(target, chosen, met, reason, results, settings, machine_info(), sensitivity)


def _default_cache() -> Path:
    from vitslim.models.reference import cache_dir

    return cache_dir() / "compress"




def block_sensitivity(model: nn.Module, calib: torch.Tensor, images: torch.Tensor, preset: str = "w4a4") -> list[dict]:
    """Feature cosine vs FP32 when only block ``i`` is quantized (``preset``), for each block:
    the blocks with the lowest cosine are the ones to keep at higher precision."""
    from vitslim import metrics, quant
    from vitslim.models import vit_parts
    from vitslim.quant.modules import quantizers, set_mode

    qmodel = quant.quantize(model, calib, preset)
    rows = []
    with torch.no_grad():
        reference = model.forward_head(model.forward_features(images), pre_logits=True)
        for bp in vit_parts(qmodel).blocks:
            set_mode(qmodel, "off")
            for q in quantizers(bp.block):
                q.mode = "quant"
            out = qmodel.forward_head(qmodel.forward_features(images), pre_logits=True)
            rows.append({"block": bp.index, "cosine": metrics.cosine_similarity(reference, out), "preset": preset})
    return rows
