"""Saving and loading quantized models: ``model.safetensors`` + ``quant.json`` in a folder.

The folder holds everything an integer runtime or a later session needs: the (reparameterized)
weights, every quantizer's scale / zero point / bits, the quantized weights on their grid, and
the config and model name to rebuild the module structure.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from vitslim.output import write_json
from vitslim.quant.api import CONFIG_ATTR, install
from vitslim.quant.config import QuantConfig
from vitslim.quant.modules import set_mode

STATE_FILE, META_FILE = "model.safetensors", "quant.json"


def save_quantized(model: nn.Module, out_dir: str | Path, model_name: str, timm_kwargs: dict | None = None) -> Path:
    """Write a quantized model to ``out_dir`` (created; files written atomically)."""
    from safetensors.torch import save_file

    from vitslim.bench import _dedupe_shared

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = _dedupe_shared({k: v.detach().contiguous() for k, v in model.state_dict().items()})
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".tmp")
    os.close(fd)
    save_file(state, tmp)
    os.replace(tmp, out_dir / STATE_FILE)
    write_json(out_dir / META_FILE, {"model": model_name, "timm_kwargs": timm_kwargs or {},
                                     "config": getattr(model, CONFIG_ATTR).to_dict()})
    return out_dir


def load_quantized(model_dir: str | Path) -> nn.Module:
    """Rebuild a model saved by ``save_quantized``, ready to run (no calibration needed)."""
    from safetensors.torch import load_file

    from vitslim.models import load_model
    from vitslim.models.reference import load_reference_model

    model_dir = Path(model_dir)
    meta_path = model_dir / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{str(model_dir)!r} is not a vitslim quantized model folder (no {META_FILE}); "
                                "make one with `vitslim quantize ... --out DIR`")
    meta = json.loads(meta_path.read_text())
    config = QuantConfig.from_dict(meta["config"])
    from vitslim.models import REFERENCE_NAME

    model = (load_reference_model() if meta["model"] == REFERENCE_NAME
             else load_model(meta["model"], pretrained=False, **meta["timm_kwargs"]))
    return restore_quantized(model, config, load_file(str(model_dir / STATE_FILE)))


def restore_quantized(model: nn.Module, config: QuantConfig, state: dict[str, torch.Tensor]) -> nn.Module:
    """Turn a fresh float ``model`` into the quantized one whose state dict is ``state``, in place."""
    install(model, config)
    _assign(model, state)
    set_mode(model, "quant")
    setattr(model, CONFIG_ATTR, config)
    return model.eval()


def _assign(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Set every parameter and buffer from ``state`` (shapes may differ from the fresh,
    uncalibrated quantizers', e.g. per-channel scales)."""
    modules = dict(model.named_modules())
    expected = set(model.state_dict())
    missing = expected - set(state)
    qweights = {k for k in state if k.endswith(".qweight")}
    if missing or (set(state) - expected - qweights):
        raise ValueError(f"saved state does not match the model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(set(state) - expected - qweights)[:5]}")
    for key, tensor in state.items():
        owner, _, name = key.rpartition(".")
        module = modules[owner]
        if name in module._parameters:
            module._parameters[name] = nn.Parameter(tensor, requires_grad=False)
        else:
            module._buffers[name] = tensor
