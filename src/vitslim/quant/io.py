"""Saving and loading quantized models: ``model.safetensors`` + ``quant.json`` in a folder.

The folder holds everything an integer runtime or a later process needs: the (reparameterized)
weights, every quantizer's scale / zero point / bits, the quantized weights on their grid, and
the config and model name to rebuild the module structure.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from vitslim.bench import dedupe_shared_tensors
from vitslim.datafile import brief, check_mapping, check_type, read_data_file
from vitslim.errors import ConfigError, ModelLoadError
from vitslim.models import REFERENCE_NAME, load_model
from vitslim.models.reference import _create_backbone, load_reference_model
from vitslim.output import atomic_path, write_json
from vitslim.quant.config import QuantConfig
from vitslim.quant.modules import set_mode
from vitslim.quant.ptq import CONFIG_ATTR, install

STATE_FILE, META_FILE = "model.safetensors", "quant.json"
META_FORMAT = 1
# quant.json: key -> type. ``checksum`` covers the rest of the file, ``weights_sha256`` ties
# it to model.safetensors: an edited quant.json, or a pair from two different saves (an
# interrupted save over an older one), is refused instead of silently computing wrong values.
META_FIELDS = {"format": int, "model": str, "timm_kwargs": dict[str, Any], "config": dict[str, Any],
               "weights_sha256": str, "checksum": str}


def save_quantized(model: nn.Module, out_dir: str | Path, model_name: str, timm_kwargs: dict | None = None) -> Path:
    """Write a quantized model to ``out_dir`` (created; files written atomically)."""
    out_dir = Path(out_dir)
    state = dedupe_shared_tensors({k: v.detach().contiguous() for k, v in model.state_dict().items()})
    with atomic_path(out_dir / STATE_FILE) as tmp:
        save_file(state, str(tmp))
        weights_sha256 = _file_sha256(tmp)
    meta = {"format": META_FORMAT, "model": model_name, "timm_kwargs": timm_kwargs or {},
            "config": getattr(model, CONFIG_ATTR).to_dict(), "weights_sha256": weights_sha256}
    write_json(out_dir / META_FILE, {**meta, "checksum": _meta_checksum(meta)})
    return out_dir


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _meta_checksum(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_meta(model_dir: str | Path) -> dict:
    """quant.json of a saved folder, checked: schema, its checksum, and that model.safetensors
    is the file it was saved with. Errors name the file and what to do."""
    model_dir = Path(model_dir)
    meta_path, state_path = model_dir / META_FILE, model_dir / STATE_FILE
    if not meta_path.is_file() or not state_path.is_file():
        missing = META_FILE if not meta_path.is_file() else STATE_FILE
        raise ModelLoadError(f"{str(model_dir)!r} is not a vitslim quantized model folder (no {missing}); "
                             "make one with `vitslim quantize ... --out DIR`")
    redo = "re-create the folder with `vitslim quantize`"
    try:
        meta = check_mapping(read_data_file(meta_path, META_FILE), str(meta_path))
        missing = sorted(set(META_FIELDS) - set(meta))
        if missing:
            raise ConfigError(f"missing field(s) {missing} (written by an older vitslim, or edited)")
        for key, hint in META_FIELDS.items():
            check_type(meta[key], hint, key)
    except ConfigError as err:
        raise ModelLoadError(f"{str(meta_path)!r} cannot be used: {err}; {redo}") from None
    if meta["format"] != META_FORMAT:
        raise ModelLoadError(f"{str(meta_path)!r} has format {brief(meta['format'])}; this vitslim reads format "
                             f"{META_FORMAT}; {redo}")
    if meta["checksum"] != _meta_checksum(meta):
        raise ModelLoadError(f"{str(meta_path)!r} was changed after it was saved (checksum mismatch); "
                             f"edited configs give wrong results silently, so it is refused: {redo} "
                             "(with --config for a different QuantConfig)")
    if meta["weights_sha256"] != _file_sha256(state_path):
        raise ModelLoadError(f"{str(state_path)!r} is not the weights file {META_FILE} was saved with "
                             f"(an interrupted save, or files mixed from two folders); {redo}")
    return meta


def load_quantized(model_dir: str | Path) -> nn.Module:
    """Rebuild a model saved by ``save_quantized``, ready to run (no calibration needed)."""
    model_dir = Path(model_dir)
    meta = read_meta(model_dir)
    try:
        config = QuantConfig.from_dict(meta["config"])
    except ConfigError as err:
        raise ModelLoadError(f"{str(model_dir / META_FILE)!r}: {err}") from None
    state_path = model_dir / STATE_FILE
    shapes = _file_shapes(state_path)
    depth = meta["timm_kwargs"].get("depth")
    if isinstance(depth, int) and depth > len(shapes):  # building a model costs time per block
        raise ModelLoadError(f"{META_FILE}: depth={depth} but {str(state_path)!r} holds only {len(shapes)} tensors")
    probe = _with_rotation(_build(meta, torch.device("meta")), config)
    install(probe, config)
    _check_shapes(probe, shapes, state_path)
    return restore_quantized(_build(meta), config, load_file(str(state_path)), str(state_path))


def restore_quantized(model: nn.Module, config: QuantConfig, state: dict[str, torch.Tensor],
                      source: str = "saved state") -> nn.Module:
    """Turn a fresh float ``model`` into the quantized one whose state dict is ``state``, in place."""
    install(_with_rotation(model, config), config)
    _assign(model, state, source)
    set_mode(model, "quant")
    setattr(model, CONFIG_ATTR, config)
    return model.eval()


def _with_rotation(model: nn.Module, config: QuantConfig) -> nn.Module:
    """A rotated model has other modules (RMSNorm, the un-rotating final linear): rebuild them
    (the saved state then overwrites the weights)."""
    if config.rotation:
        from vitslim.quant.rotate import rotate

        rotate(model, config.rotation, config.rotation_seed)
    return model


def _build(meta: dict, device: torch.device | None = None) -> nn.Module:
    """The unquantized architecture (on ``device``: ``meta``
    allocates nothing, so a folder naming a huge architecture is refused cheaply)."""
    try:
        with device or torch.device("cpu"):
            if meta["model"] == REFERENCE_NAME:
                model = _create_backbone() if device is not None else load_reference_model()
            else:
                model = load_model(meta["model"], pretrained=False, **meta["timm_kwargs"])
    except ModelLoadError:
        raise
    except Exception as err:  # timm rejects unusable keyword arguments with many exception types
        raise ModelLoadError(f"{META_FILE}: model {meta['model']!r} with timm_kwargs "
                             f"{brief(meta['timm_kwargs'])} cannot be built ({type(err).__name__}: "
                             f"{' '.join(str(err).split())[:200]})") from None
    return model


def _file_shapes(state_path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from the safetensors header (no data is read)."""
    try:
        with safe_open(str(state_path), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safetensors handles are not mappings)
    except (SafetensorError, OSError) as err:
        raise ModelLoadError(f"{str(state_path)!r} is not a readable safetensors file ({err}); "
                             "re-create the folder with `vitslim quantize`") from None


def _check_shapes(probe: nn.Module, shapes: dict[str, tuple[int, ...]], state_path: Path) -> None:
    """Every tensor of the architecture must have the file's shape (quantizer ranges aside)."""
    for key, tensor in probe.state_dict().items():
        if key in shapes and tuple(tensor.shape) != shapes[key] and "quantizer" not in key:
            raise ModelLoadError(f"{str(state_path)!r} does not fit the model in {META_FILE}: {key} is "
                                 f"{shapes[key]} in the file but {tuple(tensor.shape)} in the model")


def _assign(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Set every parameter and buffer from ``state`` (shapes may differ from the fresh,
    uncalibrated quantizers', e.g. per-channel scales)."""
    modules = dict(model.named_modules())
    expected = set(model.state_dict())
    missing = expected - set(state)
    qweights = {k for k in state if k.endswith((".qweight", ".qweight_group_scales"))}  # None until calibrated
    if missing or (set(state) - expected - qweights):
        raise ModelLoadError(f"{source!r} does not match the model: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(set(state) - expected - qweights)[:5]}")
    for key, tensor in state.items():
        owner, _, name = key.rpartition(".")
        module = modules[owner]
        if name in module._parameters:
            module._parameters[name] = nn.Parameter(tensor, requires_grad=False)
        else:
            module._buffers[name] = tensor
