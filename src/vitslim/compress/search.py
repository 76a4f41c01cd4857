"""Search: evaluate candidate recipes on the user's images and CPU, pick the best that meets
a target, with every evaluation cached on disk so a search resumes and repeats for free.

A candidate evaluation is a pure function of (model weights, recipe, image files, settings,
seed); its key hashes all of them. Each result is its own JSON file, written through a
temporary file and a rename, so an interrupted search leaves only whole results behind.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import NamedTuple, Protocol

import torch
from torch import nn

from vitslim import metrics, quant, registry
from vitslim.artifact import Artifact, ModelSource, is_artifact, load, read_contract, source_of, write_contract
from vitslim.artifact.outputs import claim_artifact_path, results_dir
from vitslim.bench import CpuFeatures, Interval, compare, cpu_features, machine_info
from vitslim.data import make_loader
from vitslim.deploy.artifact import artifact_name, build_artifact
from vitslim.deploy.workflow import FIDELITY_VS, calibration_batch, fidelity, split_images
from vitslim.errors import ConfigError, ModelLoadError, OutputPathError, UnsupportedModelError
from vitslim.evaluation import Outputs, predict
from vitslim.export.config import ExportConfig, export_step
from vitslim.models import vit_parts
from vitslim.models.reference import cache_dir
from vitslim.output import check_output_dir, is_user_fault, os_error, replace_path, safe_filename, write_json
from vitslim.progress import progress_bar
from vitslim.prune import PruneConfig
from vitslim.quant import QuantConfig
from vitslim.quant.modules import quantizers, set_mode
from vitslim.recipes import BUILTIN_RECIPES, Recipe, apply_recipe, recipe_from_dict
from vitslim.tokens import EViTConfig, ToMeConfig
from vitslim.version import __version__

TARGET_METRICS = {
    "speedup": "throughput ratio to the FP32 original, at least",
    "fidelity": "feature cosine similarity to the FP32 original, at least",
    "latency_ms": "median batch latency in milliseconds, at most",
    "accuracy_drop": ("top-1 accuracy drop vs the FP32 original in percentage points, at most "
                      "(labelled images, classifier)"),
}
AT_MOST = ("latency_ms", "accuracy_drop")  # the metrics where lower is better
# Open-closed ranges of sensible targets (NaN and infinities fall outside every one).
TARGET_RANGES = {"speedup": (0.0, 1e6), "fidelity": (-1.0, 1.0), "latency_ms": (0.0, 1e9),
                 "accuracy_drop": (0.0, 100.0)}
# Stopping by statistics (see timing_decided): a candidate's timing stops before its rounds are
# done only after this many, when the 95% interval of its speedup is wholly below the speed it
# needs to be chosen or wholly at or above a speed target; when the interval still straddles
# one of them after the rounds asked for, it is timed on, up to MORE_ROUNDS times as many.
EARLY_STOP_ROUNDS = 5
MORE_ROUNDS = 3
# The likely winners first: once one meets a speed target, a less faithful candidate is timed
# only until it clearly cannot be chosen (see speedup_to_be_chosen).
DEFAULT_GRID = ("fp32", "int8-fast", "int8-tome", "int8-tome-13", "ort-fp32", "bf16", "bf16-tome",
                "bf16-tome-13", "tome-8", "tome-13", "evit-0.7")
# For models the ViT adapter does not know (Swin, EfficientFormer, MobileViT, ...): what applies to any.
HYBRID_GRID = ("fp32", "bf16", "ort-fp32", "int8-hybrid")
NOT_A_VIT = "the model has no plain ViT blocks, so token reduction and the ViT quantizers do not apply"


def default_runtimes(cpu: CpuFeatures) -> tuple[ExportConfig, ...]:
    """The runtimes an exported recipe is timed in here: ONNX Runtime, and OpenVINO when
    installed (its float parts in bf16 where the CPU computes bfloat16 natively, else f32)."""
    from vitslim.openvino_runtime import default_precision, openvino_available

    openvino = (ExportConfig(runtime="openvino", precision=default_precision(cpu)),) if openvino_available() else ()
    return (ExportConfig(), *openvino)


def in_every_runtime(grid: list[Recipe], runtimes: tuple[ExportConfig, ...]) -> list[Recipe]:
    """Each recipe followed by its twins for the other ``runtimes`` (``name@openvino-bf16``): the
    same model, built once, timed in each runtime. Twins are made of the recipes exported for ONNX
    Runtime, and of the PyTorch ones that only merge or drop tokens or prune (a static graph
    OpenVINO compiles, at its bf16 hint where the CPU has native bfloat16); not of the original,
    nor of dtype or simulated-quantization recipes. ONNX Runtime twins of the PyTorch recipes are
    left out to keep the grid short."""
    out = []
    for recipe in grid:
        out.append(recipe)
        exported = recipe.exports and export_step(recipe.steps) == ExportConfig()
        structural = bool(recipe.steps) and all(isinstance(s, (ToMeConfig, EViTConfig, PruneConfig))
                                                for s in recipe.steps)
        if exported or structural:
            out += [recipe.in_runtime(step) for step in runtimes if step != ExportConfig()]
    return out


class LastBuild:
    """The last recipe's compressed model, kept so that its twins for other runtimes (the same
    steps, another export) reuse it instead of calibrating again."""

    def __init__(self) -> None:
        self.key: str | None = None
        self.model: nn.Module | None = None

    def get(self, model: nn.Module, recipe: Recipe, calib: torch.Tensor) -> nn.Module:
        key = json.dumps(_resolved_steps(Recipe("steps", tuple(s for s in recipe.steps
                                                                 if not isinstance(s, ExportConfig)))))
        if key != self.key:
            self.key, self.model = None, None  # the old model is freed before the new one is built
            self.model, self.key = apply_recipe(model, recipe, calib), key
        return self.model


def has_vit_blocks(model: nn.Module) -> bool:
    """Whether vitslim's ViT adapter knows ``model`` (ViT-only methods apply to it)."""
    try:
        vit_parts(model)
    except UnsupportedModelError:
        return False
    return True


def default_grid(model: nn.Module) -> tuple[str, ...]:
    """The default candidates for ``model``: the ViT grid, or what applies to any timm model."""
    return DEFAULT_GRID if has_vit_blocks(model) else HYBRID_GRID


@dataclass(frozen=True)
class Target:
    """What the user asks for, e.g. ``Target("speedup", 3.0)``."""

    metric: str
    value: float

    def __post_init__(self) -> None:
        if self.metric not in TARGET_METRICS:
            raise ConfigError(f"target metric {self.metric!r} is not one of {sorted(TARGET_METRICS)}")
        low, high = TARGET_RANGES[self.metric]
        if not (isinstance(self.value, (int, float)) and low < self.value <= high):
            raise ConfigError(f"target {self.metric}={self.value!r} is out of range: give a number in "
                              f"({low}, {high}] ({TARGET_METRICS[self.metric]})")

    @classmethod
    def parse(cls, text: str) -> Target:
        name, _, value = text.strip().partition("=")
        if name not in TARGET_METRICS or not value:
            raise ConfigError(f"target {text!r} not understood; use one of "
                              + ", ".join(f"{m}=N ({d})" for m, d in TARGET_METRICS.items()))
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"target {text!r}: {value!r} is not a number") from None
        return cls(name, number)

    def met_by(self, c: CandidateResult) -> bool:
        if c.error or self.measure(c) is None:
            return False
        if self.metric in AT_MOST:
            return self.measure(c) <= self.value
        return self.measure(c) >= self.value

    def measure(self, c: CandidateResult) -> float | None:
        return {"speedup": c.speedup, "fidelity": c.cosine, "latency_ms": c.latency_ms,
                "accuracy_drop": c.accuracy_drop}[self.metric]


@dataclass
class CandidateResult:
    """One recipe's measured figures (fidelity vs FP32 on the evaluation images, speed vs
    the FP32 original timed side by side in the same run)."""

    recipe: dict
    key: str
    cosine: float | None = None
    sqnr_db: float | None = None
    top1_agreement: float | None = None
    cosine_se: float | None = None  # standard error of the mean cosine over the evaluation images
    top1: float | None = None  # accuracy on the labelled evaluation images (classifiers)
    accuracy_drop: float | None = None  # FP32 top-1 minus this one's, in percentage points
    speedup: float | None = None  # median over interleaved rounds of FP32 batch time / this one's
    speedup_low: float | None = None  # its 95% interval (vitslim.bench.median_interval)
    speedup_high: float | None = None
    throughput: float | None = None
    latency_ms: float | None = None
    size_mb: float | None = None
    runtime: str | None = None
    eval_images: int = 0
    calib_images: int = 0
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)  # seconds: build, fidelity, timing
    stopped_early: int | None = None  # timed rounds when timing stopped (decided early), else None
    rounds: int = 0  # interleaved rounds timed
    disturbed: bool = False  # other processes took the CPU during its timing (twice): speed not trusted
    note: str | None = None  # e.g. run on request although this CPU lacks what it needs
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
    data: str = ""
    artifact: str | None = None  # the chosen candidate, saved ready to deploy
    artifacts: dict[str, str] = field(default_factory=dict)  # recipe name -> saved artifact
    left_out: list[dict] = field(default_factory=list)  # {"name", "reason"}: not run on this CPU
    not_applicable: list[str] = field(default_factory=list)  # default candidates this architecture cannot take
    within_noise: list[str] = field(default_factory=list)  # decisions taken inside the measurement noise

    def to_dict(self) -> dict:
        return {"target": asdict(self.target), "met": self.met, "reason": self.reason,
                "chosen": asdict(self.chosen) if self.chosen else None,
                "candidates": [asdict(c) for c in self.candidates], "settings": self.settings,
                "machine": self.machine, "sensitivity": self.sensitivity, "data": self.data,
                "artifact": self.artifact, "artifacts": self.artifacts, "left_out": self.left_out,
                "not_applicable": self.not_applicable, "within_noise": self.within_noise}


def fingerprint_model(model: nn.Module) -> str:
    """Hash of the architecture name and every weight: the cache key's model part."""
    h = hashlib.sha256(type(model).__name__.encode())
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-d too
    return h.hexdigest()[:16]


def fingerprint_files(paths: list[Path]) -> str:
    """Hash of the image files' names, sizes and modification times."""
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _resolved_steps(recipe: Recipe) -> list[dict]:
    """The recipe's steps with each quantization config spelled out (presets too), so that a
    preset improved in a later version does not reuse results measured with the old one."""
    return [{"quantize": {**registry.to_step(s)["quantize"], "config": replace(s, calib_images=None).to_dict()}}
            if isinstance(s, QuantConfig) else registry.to_step(s) for s in recipe.steps]


def candidate_key(model_fp: str, data_fp: str, recipe: Recipe, settings: dict) -> str:
    payload = json.dumps({"model": model_fp, "data": data_fp, "recipe": _resolved_steps(recipe),
                          "settings": settings, "vitslim": __version__,
                          "results": 4},  # 4: faults of the file system are never results
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


class ResultStore:
    """One JSON file per evaluated candidate, keyed by its hash; writes are atomic. An entry
    that cannot be read back as a complete result is reported (with its path) and recomputed."""

    def __init__(self, root: Path) -> None:
        self.root = check_output_dir(root, "result cache")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutputPathError(f"cannot create the result cache {str(root)!r} ({err.strerror}); "
                                  "pass --cache DIR or set VITSLIM_CACHE") from None

    def get(self, key: str) -> CandidateResult | None:
        path = self.root / f"{key}.json"
        if not path.exists():
            return None
        try:
            return _result_from_json(path.read_text(encoding="utf-8"), key)
        except (OSError, ValueError, TypeError) as err:
            warnings.warn(f"ignoring corrupt cache entry {str(path)!r} ({' '.join(str(err).split())[:200]}); "
                          "recomputing it", stacklevel=2)
            return None

    def put(self, result: CandidateResult) -> None:
        write_json(self.root / f"{result.key}.json", asdict(result))


# CandidateResult field -> JSON types it may hold ("inf" strings are how JSON holds ∞ SQNR).
_NUMBER_FIELDS = {"cosine", "cosine_se", "sqnr_db", "top1_agreement", "top1", "accuracy_drop", "speedup",
                  "speedup_low", "speedup_high", "throughput", "latency_ms", "size_mb", "seconds"}


def _result_from_json(text: str, key: str) -> CandidateResult:
    """A cached result, strictly: every field present with its type, finite figures (SQNR may
    be +inf), and the key it is stored under. Anything else raises ValueError."""
    data = json.loads(text)
    names = {f.name for f in fields(CandidateResult)}
    if not isinstance(data, dict) or set(data) != names:
        raise ValueError(f"expected the fields {sorted(names)}")
    for name in _NUMBER_FIELDS:
        value = data[name]
        if name == "sqnr_db" and value in ("inf", "-inf"):
            data[name] = value = float(value)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or math.isnan(value) or (math.isinf(value) and name != "sqnr_db")):
            raise ValueError(f"{name}={value!r} is not a finite number")
    if data["key"] != key or not isinstance(data["recipe"], dict) or not isinstance(data["recipe"].get("name"), str):
        raise ValueError("it belongs to another candidate")
    if not all(isinstance(data[k], int) and not isinstance(data[k], bool)
               for k in ("eval_images", "calib_images", "rounds")):
        raise ValueError("image and round counts are not whole numbers")
    if not isinstance(data["disturbed"], bool):
        raise ValueError("disturbed is not true or false")
    if not (data["error"] is None or isinstance(data["error"], str)) or not (
            data["runtime"] is None or isinstance(data["runtime"], str)):
        raise ValueError("error/runtime are not text")
    if not isinstance(data["phases"], dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in data["phases"].values()):
        raise ValueError("phases are not seconds")
    if not (data["stopped_early"] is None or (isinstance(data["stopped_early"], int)
                                              and not isinstance(data["stopped_early"], bool))) or not (
            data["note"] is None or isinstance(data["note"], str)):
        raise ValueError("stopped_early/note have the wrong type")
    if data["error"] is None and any(data[k] is None for k in ("cosine", "speedup", "latency_ms")):
        raise ValueError("a successful result without its figures")
    return CandidateResult(**data)


def evaluate_candidate(
    model: nn.Module,
    recipe: Recipe,
    key: str,
    calib: torch.Tensor,
    eval_loader,
    reference: Outputs,
    batch_size: int,
    iters: int,
    workdir: Path,
    source: ModelSource,
    calibration: dict,
    speedup_needed: Callable[[CandidateResult], float | None] = lambda c: None,
    speedup_enough: float | None = None,
    builds: LastBuild | None = None,
) -> CandidateResult:
    """Build ``recipe``'s artifact from ``model`` in ``workdir`` (as ``vitslim apply`` does),
    load it back, and measure the saved artifact: fidelity to FP32 (``build_and_measure``),
    then speed beside FP32 (``time_candidate``)."""
    result, artifact = build_and_measure(model, recipe, key, calib, eval_loader, reference, workdir, source,
                                         calibration, builds)
    if artifact is None:
        return result
    return time_candidate(model, recipe, artifact, result, batch_size, iters, speedup_needed, speedup_enough)


def build_and_measure(model: nn.Module, recipe: Recipe, key: str, calib: torch.Tensor, eval_loader,
                      reference: Outputs, workdir: Path, source: ModelSource,
                      calibration: dict, builds: LastBuild | None = None) -> tuple[CandidateResult, Artifact | None]:
    """The part of a candidate's evaluation that does not depend on the CPU it runs on: build
    ``recipe``'s artifact in ``workdir``, load it back and measure its fidelity to FP32 (also
    recorded in the artifact). Returns the result so far and the loaded artifact, or the result
    with its ``error`` and None when the candidate failed. ``builds`` shares one compressed
    model between a recipe and its twins for other runtimes."""
    start = time.perf_counter()
    result = CandidateResult(recipe=recipe.to_dict(), key=key, calib_images=len(calib))
    try:
        applied = builds.get(model, recipe, calib) if builds else None
        path = build_artifact(model, recipe, calib, workdir / artifact_name(recipe), source, calibration, key, applied)
        artifact = load(path)
        built = time.perf_counter()
        result.phases["build"] = round(built - start, 2)
        figures = fidelity(predict(artifact.model, eval_loader, recipe.name), reference, calibration["data"])
        write_contract(path, artifact.contract.with_fidelity(figures))
    except Exception as err:  # a failing candidate is reported, not fatal to the search
        if is_user_fault(err):  # the machine's fault, not the candidate's: stop, record nothing
            raise err if isinstance(err, OutputPathError) else os_error(err.errno, workdir) from err
        result.error = f"{type(err).__name__}: {' '.join(str(err).split())[:500]}"
        result.seconds = time.perf_counter() - start
        return result, None
    for name in ("cosine", "cosine_se", "sqnr_db", "top1_agreement", "top1", "accuracy_drop"):
        setattr(result, name, figures[name])
    result.eval_images = figures["images"]
    result.phases["fidelity"] = round(time.perf_counter() - built, 2)
    result.seconds = time.perf_counter() - start
    return result, artifact


def time_candidate(model: nn.Module, recipe: Recipe, artifact: Artifact | None, result: CandidateResult,
                   batch_size: int, iters: int,
                   speedup_needed: Callable[[CandidateResult], float | None] = lambda c: None,
                   speedup_enough: float | None = None) -> CandidateResult:
    """Time ``artifact`` side by side with the FP32 ``model`` on this CPU and fill in
    ``result``'s speed and its interval (the original, a recipe without steps, is timed alone:
    ``artifact`` may then be None). ``speedup_needed(result)`` (given the measured
    fidelity) is the speedup this candidate must be able to reach to be chosen,
    ``speedup_enough`` a speed target; ``timing_decided`` says when to stop timing. A timing
    disturbed by other processes is done once more; if that one is disturbed too, the result
    says so (``disturbed``, and in its note)."""
    start = time.perf_counter()
    try:
        needed = speedup_needed(result)
        # The original (no steps) is the baseline itself: its speedup is 1 by definition, so it is
        # timed alone for its img/s and latency rather than against itself.
        models = {"FP32": model} if not recipe.steps else {"FP32": model, recipe.name: artifact.model}
        for _ in range(2):
            stop = lambda t: timing_decided(t.ratio(recipe.name), needed, speedup_enough, iters)  # noqa: E731
            cand = compare(models, batch_size=batch_size, warmup=3, iters=iters * MORE_ROUNDS, flops=False,
                           stop=stop if recipe.steps else lambda t: t.rounds >= iters)[-1]
            if not cand.disturbed:
                break
    except Exception as err:  # a failing candidate is reported, not fatal to the search
        result.error = f"{type(err).__name__}: {' '.join(str(err).split())[:500]}"
        result.seconds += time.perf_counter() - start
        return result
    interval = cand.speedup_interval
    if cand.rounds < iters:
        result.stopped_early = cand.rounds
        if speedup_enough is not None and interval.above(speedup_enough):  # not said of a clear loser
            result.note = "clearly meets the target"
    if cand.disturbed:
        result.disturbed = True
        result.note = "; ".join(filter(None, [result.note, f"timed while {cand.load.describe()}: speed not trusted"]))
    result.phases["timing"] = round(time.perf_counter() - start, 2)
    result.speedup, result.speedup_low, result.speedup_high = interval.estimate, interval.low, interval.high
    result.throughput, result.rounds = cand.throughput, cand.rounds
    result.latency_ms, result.size_mb, result.runtime = cand.latency_ms_median, cand.size_mb, cand.runtime
    result.seconds += time.perf_counter() - start
    return result


def timing_decided(speedup: Interval, needed: float | None, enough: float | None, iters: int) -> bool:
    """Whether a candidate's timing can stop, given its speedup's interval so far: after
    ``EARLY_STOP_ROUNDS`` rounds, when the interval is wholly below the speedup it ``needed``
    to be chosen or wholly at or above a speed target (``enough``); after ``iters`` rounds,
    unless the interval still straddles one of them (then more rounds may decide it, up to
    ``MORE_ROUNDS`` times ``iters``, where the timing ends anyway)."""
    if speedup.rounds >= EARLY_STOP_ROUNDS and (
            (needed is not None and speedup.below(needed)) or (enough is not None and speedup.above(enough))):
        return True
    straddles = any(t is not None and speedup.low < t <= speedup.high for t in (needed, enough))
    return speedup.rounds >= iters and not straddles


@dataclass
class SearchInputs:
    """What every candidate's evaluation shares: the FP32 model, the calibration batch, the
    evaluation images and the FP32 outputs on them, the timing settings, where artifacts are
    staged (``staging / key``), and how the artifacts record their origin."""

    model: nn.Module
    calib: torch.Tensor
    eval_loader: object  # an iterable of (images, labels) batches, None for a wholly unreadable batch
    reference: Outputs
    batch_size: int
    iters: int
    staging: Path
    source: ModelSource
    calibration: dict
    builds: LastBuild = field(default_factory=LastBuild)


# (recipe, key, speedup_needed, speedup_enough) -> the candidate's result, as evaluate_candidate.
Evaluate = Callable[[Recipe, str, Callable[[CandidateResult], float | None], float | None], CandidateResult]


class Engine(Protocol):
    """Runs a search's candidates: ``start`` returns the function that evaluates each of them
    (called in grid order); ``timing_machine`` describes the CPU they are timed on. Results
    whose keys are in ``not_to_cache`` failed for a reason of this run (e.g. a lost cluster
    worker), not of the candidate, and are not cached."""

    not_to_cache: set[str]

    def start(self, inputs: SearchInputs, pending: list[tuple[Recipe, str]]) -> Evaluate: ...

    def timing_machine(self) -> dict: ...


class InProcess:
    """The default engine: each candidate is built, measured and timed here, one after the
    other, when the search reaches it."""

    not_to_cache: set[str] = frozenset()

    def start(self, inputs: SearchInputs, pending: list[tuple[Recipe, str]]) -> Evaluate:
        """A function evaluating one of the ``pending`` (recipe, key) candidates."""
        def evaluate(recipe: Recipe, key: str, needed: Callable[[CandidateResult], float | None],
                     enough: float | None) -> CandidateResult:
            return evaluate_candidate(inputs.model, recipe, key, inputs.calib, inputs.eval_loader, inputs.reference,
                                      inputs.batch_size, inputs.iters, inputs.staging / key, inputs.source,
                                      inputs.calibration, needed, enough, inputs.builds)
        return evaluate

    def timing_machine(self) -> dict:
        """The machine the candidates are timed on: this one."""
        return machine_info()


def fidelity_tie(a: CandidateResult, b: CandidateResult) -> bool:
    """Whether two candidates' mean feature cosines differ by less than their measured
    uncertainty (the standard errors of the two means, combined); without standard errors,
    only equal cosines tie."""
    if a.cosine_se is None or b.cosine_se is None:
        return a.cosine == b.cosine
    return abs(a.cosine - b.cosine) <= math.hypot(a.cosine_se, b.cosine_se)


def speed_tie(a: CandidateResult, b: CandidateResult) -> bool:
    """Whether two candidates' speedup intervals overlap (neither is clearly the faster)."""
    return _low(a) <= _high(b) and _low(b) <= _high(a)


def _low(c: CandidateResult) -> float:
    return c.speedup_low if c.speedup_low is not None else c.speedup


def _high(c: CandidateResult) -> float:
    return c.speedup_high if c.speedup_high is not None else c.speedup


def speedup_to_be_chosen(target: Target, done: list[CandidateResult], candidate: CandidateResult) -> float | None:
    """The speedup ``candidate`` (fidelity measured) must be able to reach to have any chance of
    being chosen over the candidates ``done`` (see ``choose``), or None when speed alone cannot
    rule it out. Speed target: unreachable (inf) once a feasible candidate is clearly more
    faithful (beyond the noise of the two cosines); the low end of the speed interval of the
    fastest feasible one whose fidelity it ties (the faster of a tie is chosen), else the target
    or the best low end so far, whichever is lower (below both it is neither feasible nor the
    closest). Fidelity/accuracy targets: the low end of the fastest feasible candidate's
    interval (one clearly slower cannot be chosen)."""
    timed = [c for c in done if not c.error and c.speedup is not None]
    feasible = [c for c in timed if target.met_by(c)]
    if target.metric == "speedup":
        if any(c.cosine > candidate.cosine and not fidelity_tie(c, candidate) for c in feasible):
            return math.inf
        tied = [_low(c) for c in feasible if fidelity_tie(c, candidate)]
        if tied:
            return max(target.value, *tied)
        return min(target.value, max((_low(c) for c in timed), default=math.inf))
    if target.metric in ("fidelity", "accuracy_drop"):
        return max((_low(c) for c in feasible), default=None)
    return None  # a latency target is not stopped early


def recorded_fidelity(c: CandidateResult, data: str) -> dict:
    """A cached candidate's figures in the form artifacts record them."""
    return {"cosine": c.cosine, "cosine_se": c.cosine_se, "sqnr_db": c.sqnr_db, "top1_agreement": c.top1_agreement,
            "top1": c.top1, "accuracy_drop": c.accuracy_drop, "images": c.eval_images, "data": Path(data).name,
            "vs": FIDELITY_VS}


class Choice(NamedTuple):
    """What ``choose`` decided and why; ``within_noise`` lists the decisions the measurement
    noise could have turned the other way."""

    chosen: CandidateResult | None
    met: bool
    reason: str
    within_noise: list[str]


def choose(target: Target, candidates: list[CandidateResult]) -> Choice:
    """Best candidate meeting the target, the other figure as high as possible, or the closest
    one when none does. Differences inside the noise are ties: cosines closer than their
    standard errors (``fidelity_tie``) go to the faster candidate, speedups whose intervals
    overlap (``speed_tie``) to the more faithful one; ``within_noise`` says when that happened
    and which candidates met or missed the target inside their speed interval."""
    ok = [c for c in candidates if not c.error]
    if not ok:
        return Choice(None, False, "every candidate failed; see the errors in the table", [])
    notes = _target_within_noise(target, ok)
    feasible = [c for c in ok if target.met_by(c)]
    if feasible:
        if target.metric in ("fidelity", "accuracy_drop"):
            fastest = max(feasible, key=lambda c: c.speedup)
            tied = [c for c in feasible if speed_tie(c, fastest)]
            best = max(tied, key=lambda c: c.cosine)
            bound = (f"cosine ≥ {target.value}" if target.metric == "fidelity"
                     else f"top-1 drop ≤ {target.value} points")
            why = f"fastest of the {len(feasible)} candidates with {bound}{_margin(best, feasible, 'speedup')}"
            if len(tied) > 1:
                notes.append(f"the speed intervals of {_names(tied)} overlap: {best.name}, the most faithful of "
                             "them, is chosen")
        else:
            most = max(feasible, key=lambda c: c.cosine)
            tied = [c for c in feasible if fidelity_tie(c, most)]
            best = max(tied, key=lambda c: c.speedup)
            bound = f"speedup ≥ {target.value}" if target.metric == "speedup" else f"latency ≤ {target.value} ms"
            why = f"highest fidelity of the {len(feasible)} candidates with {bound}{_margin(best, feasible, 'cosine')}"
            if len(tied) > 1:
                notes.append(f"the cosines of {_names(tied)} differ by less than their standard errors: "
                             f"{best.name}, the fastest of them, is chosen")
        return Choice(best, True, why, notes)
    measured = [c for c in ok if target.measure(c) is not None] or ok
    if target.metric in AT_MOST:
        closest = min(measured, key=lambda c: target.measure(c) if target.measure(c) is not None else math.inf)
    else:
        closest = max(measured, key=target.measure)
    value = target.measure(closest)
    return Choice(closest, False, (f"no candidate meets {target.metric}={target.value}; the closest is "
                                   f"{closest.name} with {target.metric}={value if value is None else f'{value:.4g}'}"),
                  notes)


def _margin(best: CandidateResult, feasible: list[CandidateResult], decided_by: str) -> str:
    """The figures that decided: the chosen candidate's cosine and speedup, and those of the
    runner-up by ``decided_by`` ("cosine" or "speedup")."""
    def figures(c: CandidateResult) -> str:
        cosine = "n/a" if c.cosine is None else f"{c.cosine:.5f}"
        speed = "" if c.speedup is None else f", {c.speedup:.2f}×"
        return f"{c.name}: cosine {cosine}{speed}"

    others = [c for c in feasible if c is not best and getattr(c, decided_by) is not None]
    runner_up = max(others, key=lambda c: getattr(c, decided_by), default=None)
    return f" ({figures(best)}" + (f"; next {figures(runner_up)})" if runner_up else ")")


def _names(candidates: list[CandidateResult]) -> str:
    return ", ".join(c.name for c in candidates)


def _target_within_noise(target: Target, candidates: list[CandidateResult]) -> list[str]:
    """Candidates whose meeting a speed target, or not, is inside their speed interval."""
    if target.metric != "speedup":
        return []
    near = [c for c in candidates if c.speedup is not None and _low(c) < target.value <= _high(c)]
    return [f"{c.name} {'meets' if target.met_by(c) else 'misses'} speedup {target.value} within its interval "
            f"({_low(c):.2f}–{_high(c):.2f})" for c in near]


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
    out: str | Path | None = None,
    save_all: bool = False,
    source: ModelSource | None = None,
    cpu: CpuFeatures | None = None,
    early_stop: bool = True,
    engine: Engine | None = None,
    runtimes: tuple[ExportConfig, ...] | None = None,
    force: bool = False,
) -> SearchResult:
    """Find the best recipe for ``model`` that meets ``target`` on this machine.

    Candidates (default: the built-in grid, likely winners first) are built as artifacts by
    ``vitslim.deploy.build_artifact`` (what ``vitslim apply`` runs), loaded back, evaluated
    against the FP32 model on ``n_eval`` images (disjoint from the ``n_calib`` calibration
    images, seeded) and timed side by side with it. Results are cached under ``cache_dir``;
    ``on_result(result, from_cache)`` reports progress. With ``sensitivity_preset``, the
    report also shows each block's sensitivity to quantization.

    With ``out``, the chosen candidate is saved there ready to deploy (``model.onnx``, or the
    folder ``model`` for PyTorch recipes), and with ``save_all`` every candidate under
    ``out/candidates/``. An artifact already saved for the same candidate (same cache key) is
    kept as it is; a cached candidate whose artifact is missing is rebuilt (not re-measured).
    ``source`` (a ``vitslim.deploy.ModelSource``) says how to rebuild the architecture.
    ``out`` is claimed first and held for the run (``vitslim.artifact.outputs.results_dir``): a
    folder vitslim did not write is refused unless ``force``, and a second run into it stops
    with an "in use" error. A fault of the file system (disk full, file too large, no
    permission, I/O error) stops the search with one error and is never cached as a result.

    CPU-aware: a default-grid candidate with a step this CPU cannot run fast (``cpu``, default
    this machine's ``cpu_features()``; e.g. bf16 without native bfloat16) is left out before
    any work and listed in ``left_out`` with the reason; one named in ``recipes`` still runs,
    with the reason as its ``note``. With ``early_stop``, a candidate whose speed interval
    already decides it (clearly too slow to be chosen, or clearly at a speed target) is timed no
    further (``timing_decided``; ``stopped_early``); one whose interval straddles the decision
    is timed longer. Ties inside the noise are resolved and reported as ``choose`` says.

    Runtime-aware: for the default grid, or when ``runtimes`` (export steps) is given, each
    recipe exported for ONNX Runtime is also timed in the other runtimes (default
    ``default_runtimes(cpu)``: OpenVINO when installed), as a twin ``recipe@runtime`` built from
    the same compressed model; the report's runtime column says where each candidate ran.
    """
    target = Target.parse(target) if isinstance(target, str) else target
    names = recipes or default_grid(model)
    not_applicable = [] if recipes else [n for n in DEFAULT_GRID if n not in names]
    grid = [BUILTIN_RECIPES[r] if isinstance(r, str) else r for r in names]
    cpu = cpu or cpu_features()
    unmet = {r.name: "; ".join(r.unmet_needs(cpu)) for r in grid if r.unmet_needs(cpu)}
    left_out = [] if recipes else [{"name": r.name, "reason": unmet[r.name]} for r in grid if r.name in unmet]
    grid = grid if recipes else [r for r in grid if r.name not in unmet]
    if runtimes is not None or not recipes:
        grid = in_every_runtime(grid, default_runtimes(cpu) if runtimes is None else runtimes)
    source = source or source_of(model)
    dataset, calib_set, eval_set = split_images(model, data, n_calib, n_eval, seed)
    if not eval_set.indices:
        raise ConfigError(f"{len(dataset)} images leave none for evaluation after {n_calib} for "
                          "calibration; add images or lower --calib-images")
    _check_target(target, model, [dataset.samples[i][1] for i in eval_set.indices])
    settings = {"n_calib": len(calib_set), "n_eval": len(eval_set), "seed": seed,
                "batch_size": batch_size, "iters": iters}
    files = [dataset.samples[i][0] for i in calib_set.indices + eval_set.indices]
    model_fp, data_fp = fingerprint_model(model), fingerprint_files(files)
    store = ResultStore(Path(cache_dir) if cache_dir else default_cache_dir() / model_fp)
    calib = calibration_batch(calib_set)
    calibration = {"data": str(data), "images": len(calib_set), "seed": seed}
    eval_loader = make_loader(eval_set, batch_size=32)
    engine = engine or InProcess()
    keys = [candidate_key(model_fp, data_fp, recipe, settings) for recipe in grid]
    stored = {key: store.get(key) for key in keys}
    pending = list({key: recipe for recipe, key in zip(grid, keys) if stored[key] is None}.items())
    results: list[CandidateResult] = []
    with contextlib.ExitStack() as held:
        if out is not None:
            held.enter_context(results_dir(out, force))
        staging = _staging_dir(out)
        held.callback(shutil.rmtree, staging, ignore_errors=True)
        if pending:
            inputs = SearchInputs(model, calib, eval_loader, predict(model, eval_loader, "FP32 reference"),
                                  batch_size, iters, staging, source, calibration)
            evaluate = engine.start(inputs, [(recipe, key) for key, recipe in pending])
        for recipe, key in progress_bar(list(zip(grid, keys)), "candidates"):
            cached = stored[key]
            fresh = cached is None
            if fresh:
                needed = (lambda c: speedup_to_be_chosen(target, results, c)) if early_stop else (lambda c: None)
                enough = target.value if early_stop and target.metric == "speedup" else None
                cached = stored[key] = evaluate(recipe, key, needed, enough)
                if key not in engine.not_to_cache:
                    store.put(cached)
            if recipe.name in unmet:  # named explicitly: run, as asked, with the reason it may lose here
                cached.note = f"run as requested, but {unmet[recipe.name]}"
            if on_result:
                on_result(cached, not fresh)
            results.append(cached)
            if not save_all:  # only the best so far can end up chosen: drop the other artifacts
                best = choose(target, results).chosen
                _drop_staged(staging, keep=best.key if best else None)
        chosen, met, reason, within_noise = choose(target, results)
        saved = {}
        if out is not None:
            rebuild = lambda c, dest: _rebuild(model, c, calib, dest, source, calibration)  # noqa: E731
            saved = save_artifacts(Path(out), chosen, results if save_all else [], staging, rebuild, force)
    sensitivity = []
    if sensitivity_preset and len(calib) and has_vit_blocks(model):  # per-block sensitivity is ViT-only
        sens_key = candidate_key(model_fp, data_fp, Recipe("sensitivity"), settings | {"preset": sensitivity_preset})
        sens_path = store.root / f"sensitivity-{sens_key}.json"
        sensitivity = _cached_sensitivity(sens_path)  # cached like the candidates: a repeat is instant
        if sensitivity is None:
            sample = torch.cat([b[0] for b in eval_loader if b is not None])[:16]
            try:
                sensitivity = block_sensitivity(model, calib, sample, sensitivity_preset)
                write_json(sens_path, sensitivity)
            except UnsupportedModelError as err:  # an extra: the search's results stand without it
                warnings.warn(f"per-block sensitivity ({sensitivity_preset}) skipped: {err}", stacklevel=2)
                sensitivity = []
    return SearchResult(target, chosen, met, reason, results, settings, engine.timing_machine(), sensitivity,
                        data=str(data), artifact=saved.get(chosen.name) if chosen else None, artifacts=saved,
                        left_out=left_out, not_applicable=not_applicable, within_noise=within_noise)


def _check_target(target: Target, model: nn.Module, eval_labels: list[int]) -> None:
    if target.metric != "accuracy_drop":
        return
    if not getattr(model, "num_classes", 0):
        raise ConfigError("target accuracy_drop needs a classifier, but this model outputs features (no class "
                          "head); use fidelity=C (feature cosine) instead")
    if not any(label >= 0 for label in eval_labels):
        raise ConfigError("target accuracy_drop needs labelled images: name files <wnid>_<name>.JPEG "
                          "(ImageNet) or put them in one sub-folder per class")


STAGING_PREFIX = ".vitslim-staging"


def _staging_dir(out: str | Path | None) -> Path:
    """This run's scratch space for candidates' artifacts: a new folder inside ``out`` (same
    file system, so the chosen one is moved into place by a rename; ``out`` is held by this
    run, so staging folders left by interrupted runs are removed), or a temporary folder."""
    if out is None:
        return Path(tempfile.mkdtemp(prefix="vitslim-candidates-"))
    for left in Path(out).glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(left, ignore_errors=True)
    return Path(tempfile.mkdtemp(dir=out, prefix=f"{STAGING_PREFIX}-"))


def _drop_staged(staging: Path, keep: str | None) -> None:
    for d in staging.iterdir():
        if d.name != keep:
            shutil.rmtree(d, ignore_errors=True)


def save_artifacts(out: Path, chosen: CandidateResult | None, others: list[CandidateResult], staging: Path,
                   rebuild: Callable[[CandidateResult, Path], None], force: bool = False) -> dict[str, str]:
    """Put the chosen candidate's artifact at ``out/model(.onnx)`` and the ``others`` under
    ``out/candidates/``: moved from ``staging`` when built in this run, kept when ``out``
    already holds the same candidate's, rebuilt otherwise (a path holding something vitslim
    did not write is refused unless ``force``). Returns recipe name -> path."""
    saved: dict[str, str] = {}
    if chosen is None or chosen.error:
        return saved
    recipe = recipe_from_dict(chosen.recipe)
    places = [(chosen, out / artifact_name(recipe))]
    places += [(c, out / "candidates" / artifact_name(recipe_from_dict(c.recipe), safe_filename(c.name)))
               for c in others if c is not chosen and not c.error]
    for _, dest in places:
        claim_artifact_path(dest, force)
    for c, dest in places:
        saved[c.name] = str(dest)
        if is_artifact(dest) and _recorded_key(dest) == c.key:
            continue  # saved by an earlier run: nothing to rebuild
        staged = staging / c.key / artifact_name(recipe_from_dict(c.recipe))
        if not staged.exists():
            rebuild(c, staged)
        dest.parent.mkdir(parents=True, exist_ok=True)
        replace_path(staged, dest)
    stale = out / ("model" if places[0][1].suffix == ".onnx" else "model.onnx")
    if is_artifact(stale):  # an earlier run chose a candidate of the other format
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    return saved


def _recorded_key(artifact: Path) -> str | None:
    """The cache key recorded in a saved artifact; None when its contract is unreadable (it is
    then rebuilt)."""
    try:
        return read_contract(artifact).key
    except ModelLoadError:
        return None


def _rebuild(model: nn.Module, c: CandidateResult, calib: torch.Tensor, dest: Path, source: ModelSource,
             calibration: dict) -> None:
    """A cached candidate's artifact, built again the same way, with its cached figures."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    path = build_artifact(model, recipe_from_dict(c.recipe), calib, dest, source, calibration, c.key)
    write_contract(path, read_contract(path).with_fidelity(recorded_fidelity(c, calibration["data"])))


def default_cache_dir() -> Path:
    return cache_dir() / "compress"


def _cached_sensitivity(path: Path) -> list[dict] | None:
    """The cached per-block sensitivity rows, or None (absent, or corrupt: warned, recomputed)."""
    if not path.exists():
        return None
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(rows, list) or not all(
                isinstance(r, dict) and set(r) == {"block", "cosine", "preset"}
                and isinstance(r["block"], int) and not isinstance(r["block"], bool)
                and isinstance(r["cosine"], (int, float)) and not isinstance(r["cosine"], bool)
                and math.isfinite(r["cosine"]) and isinstance(r["preset"], str) for r in rows):
            raise ValueError("expected a list of {block, cosine, preset} rows with finite cosines")
        return rows
    except (OSError, ValueError) as err:
        warnings.warn(f"ignoring corrupt cache entry {str(path)!r} ({' '.join(str(err).split())[:200]}); "
                      "recomputing it", stacklevel=2)
        return None


def block_sensitivity(model: nn.Module, calib: torch.Tensor, images: torch.Tensor, preset: str = "w4a4") -> list[dict]:
    """Feature cosine vs FP32 when only block ``i`` is quantized (``preset``), for each block:
    the blocks with the lowest cosine are the ones to keep at higher precision. The preset's
    block reconstruction is left out to keep this extra cheap (it would add minutes)."""
    config = replace(quant.preset(preset), reconstruction_iters=0)
    qmodel = quant.quantize_(copy.deepcopy(model), config, calib)
    rows = []
    with torch.no_grad():
        reference = model.forward_head(model.forward_features(images), pre_logits=True)
        for bp in progress_bar(vit_parts(qmodel).blocks, f"per-block sensitivity ({preset})"):
            set_mode(qmodel, "off")
            for q in quantizers(bp.block):
                q.mode = "quant"
            out = qmodel.forward_head(qmodel.forward_features(images), pre_logits=True)
            rows.append({"block": bp.index, "cosine": metrics.cosine_similarity(reference, out), "preset": preset})
    return rows
