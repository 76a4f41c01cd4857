"""Recipes: an ordered list of compression steps, stored as plain data (YAML/JSON).

A recipe reads as what it does::

    name: int8-tome
    steps:
      - prune: {macs: 0.7}
      - tokens: {method: tome, r: 8}
      - quantize: {preset: w8a8}
      - export: {format: onnx}

Steps run in a fixed stage order (pruning, token reduction, numeric format, export) because
each stage consumes what the one before produces: quantizing an exported graph, or reducing
tokens of an already-quantized model's ONNX file, cannot work. Knobs are checked on load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import yaml

from vitslim.datafile import brief, check_mapping, check_type, read_data_file
from vitslim.errors import ConfigError

if TYPE_CHECKING:
    from vitslim.bench import CpuFeatures

MAX_NAME_CHARS = 100

STAGE_NAMES = ("pruning", "token reduction", "numeric format (dtype or quantize)", "export")


def _allow(kind: str, knobs: dict, allowed: list[str]) -> None:
    unknown = sorted(str(k) for k in set(knobs) - set(allowed))
    if unknown:
        raise ConfigError(f"step {kind!r}: unknown knob(s) {brief(unknown)}; valid knobs are {sorted(allowed)}")


def _check_tokens(knobs: dict) -> None:
    import inspect

    from vitslim.tokens import METHODS, check_params

    method = knobs.get("method")
    if not isinstance(method, str) or method not in METHODS:
        raise ConfigError(f"step 'tokens': method {brief(method)} is not one of {sorted(METHODS)}")
    params = [p for p in inspect.signature(METHODS[method]).parameters if p != "model"]
    _allow("tokens", knobs, ["method", *params])
    check_params(method, {k: v for k, v in knobs.items() if k != "method"})


def _check_dtype(knobs: dict) -> None:
    from vitslim.api import DTYPES

    _allow("dtype", knobs, ["dtype"])
    if not isinstance(knobs.get("dtype", "bfloat16"), str) or knobs.get("dtype", "bfloat16") not in DTYPES:
        raise ConfigError(f"step 'dtype': dtype {brief(knobs['dtype'])} is not one of {list(DTYPES)}")


def _check_quantize(knobs: dict) -> None:
    from vitslim.quant.config import PRESETS, QuantConfig

    _allow("quantize", knobs, ["preset", "config", "calib_images"])
    if ("preset" in knobs) == ("config" in knobs):
        raise ConfigError("step 'quantize': give exactly one of `preset` (a name) or `config` (a QuantConfig mapping)")
    if "preset" in knobs and (not isinstance(knobs["preset"], str) or knobs["preset"] not in PRESETS):
        raise ConfigError(f"step 'quantize': preset {brief(knobs['preset'])} is not one of {sorted(PRESETS)}")
    if "config" in knobs:
        QuantConfig.from_dict(knobs["config"])
    if "calib_images" in knobs and check_type(knobs["calib_images"], int, "calib_images") < 1:
        raise ConfigError(f"step 'quantize': calib_images must be >= 1, got {knobs['calib_images']}")


def _check_prune(knobs: dict) -> None:
    from vitslim.prune import PruneConfig

    _allow("prune", knobs, list(PruneConfig.__dataclass_fields__))
    PruneConfig(**knobs)


def _check_export(knobs: dict) -> None:
    _allow("export", knobs, ["format"])
    if knobs.get("format", "onnx") != "onnx":
        raise ConfigError(f"step 'export': format {brief(knobs['format'])} is not supported; use 'onnx'")


# step kind -> (stage, knob check). The method families check their knobs' values again.
STEP_KINDS = {"prune": (0, _check_prune), "tokens": (1, _check_tokens), "dtype": (2, _check_dtype),
              "quantize": (2, _check_quantize), "export": (3, _check_export)}


@dataclass(frozen=True)
class Need:
    """A CPU feature a step needs to have a chance of being faster than FP32, and what
    happens without it (the reason the search gives for leaving the candidate out)."""

    feature: str  # a field of vitslim.bench.CpuFeatures
    without: str


# dtype -> what it needs from the CPU. Measured: on AVX2-only CPUs bfloat16 in PyTorch was
# ~7x slower than FP32 eager; with AVX512_BF16 (or AMX) ~2.3x faster.
DTYPE_NEEDS = {"bfloat16": Need("bf16", "this CPU has no native bfloat16 (no AVX512_BF16/AMX); PyTorch "
                                        "emulates it, ~7x slower than FP32 here")}
# step kind -> its knobs -> what it needs from the CPU (kinds not listed run anywhere)
STEP_NEEDS: dict[str, Callable[[dict], Need | None]] = {
    "dtype": lambda knobs: DTYPE_NEEDS.get(knobs.get("dtype", "bfloat16")),
}


@dataclass(frozen=True)
class Step:
    """One step: its kind and knobs, e.g. Step("tokens", {"method": "tome", "r": 8})."""

    kind: str
    knobs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {self.kind: dict(self.knobs)}


@dataclass(frozen=True)
class Recipe:
    """A named, validated sequence of steps. An empty sequence is the FP32 original."""

    name: str
    steps: tuple[Step, ...] = ()
    description: str = ""

    def __post_init__(self) -> None:
        validate_name(self.name)
        validate_steps(self.name, self.steps)

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description,
                "steps": [s.to_dict() for s in self.steps]}

    def step(self, kind: str) -> Step | None:
        return next((s for s in self.steps if s.kind == kind), None)

    def unmet_needs(self, cpu: CpuFeatures) -> list[str]:
        """Why this recipe cannot win on ``cpu``: one reason per step whose need it lacks."""
        needs = [STEP_NEEDS[s.kind](s.knobs) for s in self.steps if s.kind in STEP_NEEDS]
        return [f"{n.feature}: {n.without}" for n in needs if n and not getattr(cpu, n.feature)]

    @property
    def summary(self) -> str:
        parts = [f"{s.kind}(" + ", ".join(f"{k}={v}" for k, v in s.knobs.items()) + ")" for s in self.steps]
        return " → ".join(parts) or "FP32 original"


def validate_name(name: Any) -> None:
    """A recipe's name is shown in tables and reports and turned into file names (through
    ``vitslim.output.safe_filename``): printable text of at most 100 characters."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"a recipe's name must be non-empty text, got {brief(name)}")
    if len(name) > MAX_NAME_CHARS or not name.isprintable():
        raise ConfigError(f"recipe name {brief(name)}: use at most {MAX_NAME_CHARS} printable characters")


def validate_steps(name: str, steps: tuple[Step, ...]) -> None:
    """Unknown steps or knobs, repeated steps, and impossible orders are errors."""
    last_stage = -1
    for i, step in enumerate(steps):
        if step.kind not in STEP_KINDS:
            raise ConfigError(f"recipe {name!r}: unknown step {step.kind!r}; valid steps are {sorted(STEP_KINDS)}")
        stage, check = STEP_KINDS[step.kind]
        try:
            check(step.knobs)
        except ConfigError as err:
            raise ConfigError(f"recipe {name!r}: {err}") from None
        if stage == last_stage:
            raise ConfigError(f"recipe {name!r}: step {i + 1} ({step.kind}) repeats the "
                              f"{STAGE_NAMES[stage]} stage; use one step per stage")
        if stage < last_stage:
            raise ConfigError(
                f"recipe {name!r}: step {i + 1} ({step.kind}) comes after a later stage; steps must "
                f"run in the order {' → '.join(STAGE_NAMES)} (e.g. a model cannot be quantized "
                "after it has been exported, and tokens are reduced in the PyTorch model)")
        last_stage = stage


def recipe_from_dict(data: dict) -> Recipe:
    """Build a recipe from its plain-data form (as loaded from YAML/JSON)."""
    if not isinstance(data, dict) or "steps" not in data:
        raise ConfigError("a recipe is a mapping with `name` and a `steps` list")
    check_mapping(data, "recipe")
    unknown = sorted(set(data) - {"name", "steps", "description"})
    if unknown:
        raise ConfigError(f"recipe: unknown field(s) {brief(unknown)}; a recipe has name, description and steps")
    if not isinstance(data["steps"] or [], list):
        raise ConfigError(f"recipe: steps must be a list, got {brief(data['steps'])}")
    steps = []
    for raw in data["steps"] or []:
        if not isinstance(raw, dict) or len(raw) != 1:
            raise ConfigError(f"each step is a one-key mapping like {{tokens: {{method: tome}}}}, got {brief(raw)}")
        (kind, knobs), = raw.items()
        if not isinstance(kind, str) or kind not in STEP_KINDS:
            raise ConfigError(f"unknown step {brief(kind)}; valid steps are {sorted(STEP_KINDS)}")
        steps.append(Step(kind, dict(check_mapping(knobs or {}, f"step {kind!r}"))))
    description = check_type(data.get("description") or "", str, "recipe description")
    return Recipe(data.get("name", "custom"), tuple(steps), description)


def load_recipe(source: str | Path) -> Recipe:
    """A built-in recipe by name, or a recipe file (.yaml/.yml/.json)."""
    if str(source) in BUILTIN_RECIPES:
        return BUILTIN_RECIPES[str(source)]
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"no built-in recipe or file named {str(source)!r}; built-in recipes are "
                          f"{sorted(BUILTIN_RECIPES)} (see `vitslim recipes`)")
    data = read_data_file(path, "recipe file")
    try:
        return recipe_from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"recipe file {str(path)!r}: {err}") from None


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write a recipe as YAML or JSON (by suffix), atomically."""
    from vitslim.output import write_text_atomic

    data = recipe.to_dict()
    text = json.dumps(data, indent=2) if str(path).endswith(".json") else yaml.safe_dump(data, sort_keys=False)
    write_text_atomic(path, text)


def _recipe(name: str, description: str, *steps: tuple[str, dict]) -> Recipe:
    return Recipe(name, tuple(Step(kind, knobs) for kind, knobs in steps), description)


BUILTIN_RECIPES: dict[str, Recipe] = {r.name: r for r in (
    _recipe("fp32", "The original model, unchanged: the baseline."),
    _recipe("bf16", "bfloat16 weights and activations in PyTorch (fast on CPUs with AVX-512 BF16).",
            ("dtype", {"dtype": "bfloat16"})),
    _recipe("tome-8", "Token merging, 8 tokens merged per block (ToMe).",
            ("tokens", {"method": "tome", "r": 8})),
    _recipe("tome-13", "Token merging, 13 tokens merged per block (ToMe).",
            ("tokens", {"method": "tome", "r": 13})),
    _recipe("evit-0.7", "EViT: keep 70% of tokens at 1/4, 1/2, 3/4 depth, fuse the rest.",
            ("tokens", {"method": "evit", "keep_rate": 0.7})),
    _recipe("bf16-tome", "Token merging (r=8) in bfloat16.",
            ("tokens", {"method": "tome", "r": 8}), ("dtype", {"dtype": "bfloat16"})),
    _recipe("bf16-tome-13", "Token merging (r=13) in bfloat16.",
            ("tokens", {"method": "tome", "r": 13}), ("dtype", {"dtype": "bfloat16"})),
    _recipe("int8-fast", "W8A8 post-training quantization, exported to ONNX Runtime integer kernels.",
            ("quantize", {"preset": "w8a8-ort"}), ("export", {"format": "onnx"})),
    _recipe("int8-tome", "Token merging (r=8), then W8A8 on ONNX Runtime integer kernels.",
            ("tokens", {"method": "tome", "r": 8}), ("quantize", {"preset": "w8a8-ort"}),
            ("export", {"format": "onnx"})),
    _recipe("int8-tome-13", "Token merging (r=13), then W8A8 on ONNX Runtime integer kernels.",
            ("tokens", {"method": "tome", "r": 13}), ("quantize", {"preset": "w8a8-ort"}),
            ("export", {"format": "onnx"})),
    _recipe("ort-fp32", "The FP32 model exported to ONNX Runtime.", ("export", {"format": "onnx"})),
    _recipe("prune-0.7", "Structured pruning to 70% of the MACs (Hessian importance, least-squares refit), on ONNX Runtime.",
            ("prune", {"macs": 0.7}), ("export", {"format": "onnx"})),
    _recipe("prune-int8-tome", "Pruning to 70% of the MACs, token merging (r=8), W8A8 on ONNX Runtime.",
            ("prune", {"macs": 0.7}), ("tokens", {"method": "tome", "r": 8}),
            ("quantize", {"preset": "w8a8-ort"}), ("export", {"format": "onnx"})),
    _recipe("w4a8-small", "4-bit weights (GPTQ), 8-bit activations: the smallest model (simulated).",
            ("quantize", {"preset": "w4a8"})),
    _recipe("int4-small", "4-bit GPTQ weights packed in ONNX Runtime MatMulNBits (int8 activations in the kernel): "
                          "on DINOv2 ViT-S a file 6.4x smaller than FP32.",
            ("quantize", {"preset": "w4-ort"}), ("export", {"format": "onnx"})),
)}
