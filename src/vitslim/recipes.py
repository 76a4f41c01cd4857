"""Recipes: an ordered list of method configs, stored as plain data (YAML/JSON).

A recipe reads as what it does::

    name: int8-tome
    steps:
      - prune: {macs: 0.7}
      - tokens: {method: tome, r: 8}
      - quantize: {preset: w8a8}
      - export: {format: onnx}

In Python the same recipe is ``Recipe("int8-tome", (PruneConfig(macs=0.7), ToMeConfig(r=8),
quant.preset("w8a8"), ExportConfig()))``: each step is the config a method family's verb takes
(``vitslim.registry`` maps one to the other). Steps run in a fixed stage order (pruning, token
reduction, numeric format, export) because each stage consumes what the one before produces:
quantizing an exported graph, or reducing tokens of an already-quantized model's ONNX file,
cannot work. Knobs are checked on load.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from torch import nn

from vitslim import registry
from vitslim.datafile import brief, check_mapping, check_type, read_data_file
from vitslim.dtype import DtypeConfig
from vitslim.errors import ConfigError
from vitslim.export.config import ExportConfig
from vitslim.output import write_text_atomic
from vitslim.prune import PruneConfig
from vitslim.quant import HybridQuantConfig, preset
from vitslim.tokens import EViTConfig, ToMeConfig

if TYPE_CHECKING:
    from vitslim.bench import CpuFeatures

MAX_NAME_CHARS = 100


@dataclass(frozen=True)
class Need:
    """A CPU feature a step needs to have a chance of being faster than FP32, and what
    happens without it (the reason the search gives for leaving the candidate out)."""

    feature: str  # a field of vitslim.bench.CpuFeatures
    without: str


# dtype -> what it needs from the CPU: without AVX512_BF16 or AMX, PyTorch emulates bfloat16
# and runs it several times slower than FP32.
DTYPE_NEEDS = {"bfloat16": Need("bf16", "this CPU has no native bfloat16 (no AVX512_BF16/AMX); PyTorch "
                                        "emulates it, several times slower than FP32")}


def need_of(step: Any) -> Need | None:
    """What ``step`` needs from the CPU (steps not listed run anywhere)."""
    return DTYPE_NEEDS.get(step.dtype) if isinstance(step, DtypeConfig) else None


@dataclass(frozen=True)
class Recipe:
    """A named, validated sequence of method configs. An empty sequence is the FP32 original."""

    name: str
    steps: tuple[Any, ...] = ()
    description: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", tuple(self.steps))
        validate_name(self.name)
        validate_steps(self.name, self.steps)

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description,
                "steps": [registry.to_step(s) for s in self.steps]}

    @property
    def exports(self) -> bool:
        """Whether the recipe ends in an ONNX file rather than a PyTorch model."""
        return any(isinstance(s, ExportConfig) for s in self.steps)

    def in_runtime(self, step: ExportConfig) -> Recipe:
        """The same recipe exported for another runtime (``step``, added when it has no export
        step), named ``name@runtime``."""
        steps = (*(s for s in self.steps if not isinstance(s, ExportConfig)), step)
        return Recipe(f"{self.name}@{step.label}", steps, self.description)

    def unmet_needs(self, cpu: CpuFeatures) -> list[str]:
        """Why this recipe cannot win on ``cpu``: one reason per step whose need it lacks."""
        needs = [need_of(s) for s in self.steps]
        return [f"{n.feature}: {n.without}" for n in needs if n and not getattr(cpu, n.feature)]

    @property
    def summary(self) -> str:
        parts = []
        for step in self.steps:
            (kind, knobs), = registry.to_step(step).items()
            parts.append(f"{kind}(" + ", ".join(f"{k}={v}" for k, v in knobs.items()) + ")")
        return " → ".join(parts) or "FP32 original"


def validate_name(name: Any) -> None:
    """A recipe's name is shown in tables and reports and turned into file names (through
    ``vitslim.output.safe_filename``): printable text of at most 100 characters."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"a recipe's name must be non-empty text, got {brief(name)}")
    if len(name) > MAX_NAME_CHARS or not name.isprintable():
        raise ConfigError(f"recipe name {brief(name)}: use at most {MAX_NAME_CHARS} printable characters")


def validate_steps(name: str, steps: tuple[Any, ...]) -> None:
    """Steps that are not method configs, repeated stages, and impossible orders are errors."""
    last_stage = -1
    for i, step in enumerate(steps):
        try:
            method = registry.method_of(step)
        except ConfigError as err:
            raise ConfigError(f"recipe {name!r}: step {i + 1}: {err}") from None
        stage, kind = method.stage, method.step
        if stage == last_stage:
            raise ConfigError(f"recipe {name!r}: step {i + 1} ({kind}) repeats the "
                              f"{registry.STAGES[stage]} stage; use one step per stage")
        if stage < last_stage:
            raise ConfigError(
                f"recipe {name!r}: step {i + 1} ({kind}) comes after a later stage; steps must "
                f"run in the order {' → '.join(registry.STAGES)} (e.g. a model cannot be quantized "
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
    name = data.get("name", "custom")
    validate_name(name)
    steps = []
    for raw in data["steps"] or []:
        if not isinstance(raw, dict) or len(raw) != 1:
            raise ConfigError(f"each step is a one-key mapping like {{tokens: {{method: tome}}}}, got {brief(raw)}")
        (kind, knobs), = raw.items()
        try:
            steps.append(registry.from_step(kind, knobs))
        except ConfigError as err:
            raise ConfigError(f"recipe {name!r}: {err}") from None
    description = check_type(data.get("description") or "", str, "recipe description")
    return Recipe(name, tuple(steps), description)


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


def apply_recipe(model: nn.Module, recipe: Recipe, calib: torch.Tensor) -> nn.Module:
    """A compressed PyTorch copy of ``model`` after the recipe's model-changing steps (the
    original is untouched). The export step is the artifact's format: ``vitslim.save`` writes
    what this returns."""
    out: nn.Module = copy.deepcopy(model).eval()
    for config in recipe.steps:
        out = registry.apply_(out, config, calib)
    return out


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write a recipe as YAML or JSON (by suffix), atomically."""
    data = recipe.to_dict()
    text = json.dumps(data, indent=2) if str(path).endswith(".json") else yaml.safe_dump(data, sort_keys=False)
    write_text_atomic(path, text)


W8A8_ORT = preset("w8a8-ort")

BUILTIN_RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("fp32", (), "The original model, unchanged: the baseline."),
    Recipe("bf16", (DtypeConfig("bfloat16"),),
           "bfloat16 weights and activations in PyTorch (fast on CPUs with AVX-512 BF16)."),
    Recipe("tome-8", (ToMeConfig(r=8),), "Token merging, 8 tokens merged per block (ToMe)."),
    Recipe("tome-13", (ToMeConfig(r=13),), "Token merging, 13 tokens merged per block (ToMe)."),
    Recipe("evit-0.7", (EViTConfig(keep_rate=0.7),), "EViT: keep 70% of tokens at 1/4, 1/2, 3/4 depth, fuse the rest."),
    Recipe("bf16-tome", (ToMeConfig(r=8), DtypeConfig("bfloat16")), "Token merging (r=8) in bfloat16."),
    Recipe("bf16-tome-13", (ToMeConfig(r=13), DtypeConfig("bfloat16")), "Token merging (r=13) in bfloat16."),
    Recipe("int8-fast", (W8A8_ORT, ExportConfig()),
           "W8A8 post-training quantization, exported to ONNX Runtime integer kernels."),
    Recipe("int8-tome", (ToMeConfig(r=8), W8A8_ORT, ExportConfig()),
           "Token merging (r=8), then W8A8 on ONNX Runtime integer kernels."),
    Recipe("int8-tome-13", (ToMeConfig(r=13), W8A8_ORT, ExportConfig()),
           "Token merging (r=13), then W8A8 on ONNX Runtime integer kernels."),
    Recipe("ort-fp32", (ExportConfig(),), "The FP32 model exported to ONNX Runtime."),
    Recipe("prune-0.7", (PruneConfig(macs=0.7), ExportConfig()),
           "Structured pruning to 70% of the MACs (Hessian importance, least-squares refit), on ONNX Runtime."),
    Recipe("prune-int8-tome", (PruneConfig(macs=0.7), ToMeConfig(r=8), W8A8_ORT, ExportConfig()),
           "Pruning to 70% of the MACs, token merging (r=8), W8A8 on ONNX Runtime."),
    Recipe("w4a8-small", (preset("w4a8"),),
           "4-bit weights (GPTQ), 8-bit activations: the smallest model (simulated)."),
    Recipe("int8-hybrid", (HybridQuantConfig(), ExportConfig()),
           "W8A8 for timm models that are not plain ViTs (Swin, EfficientFormer, MobileViT, EfficientViT, "
           "...): Q-HyViT granularity choice, ONNX Runtime integer kernels."),
    Recipe("int4-small", (preset("w4-ort"), ExportConfig()),
           "4-bit GPTQ weights packed in ONNX Runtime MatMulNBits (int8 activations in the kernel): "
           "on DINOv2 ViT-S a file 6.4x smaller than FP32."),
)}
