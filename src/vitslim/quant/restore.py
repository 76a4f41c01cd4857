"""Restoring a quantized model from its saved state: the quantizers a ``QuantConfig`` installs,
with the calibrated values (scales, zero points, grids, packed low-bit codes) put back from the
tensors an artifact holds (``vitslim.artifact``), no calibration needed."""

from __future__ import annotations

import torch
from torch import nn

from vitslim.errors import ModelLoadError
from vitslim.quant.config import QuantConfig
from vitslim.quant.modules import set_mode
from vitslim.quant.ptq import CONFIG_ATTR, install
from vitslim.quant.rotate import rotate


def restore_quantized(model: nn.Module, config: QuantConfig, state: dict[str, torch.Tensor],
                      source: str = "saved state", installed: bool = False) -> nn.Module:
    """Turn a fresh float ``model`` (or one whose quantizers are ``installed`` already) into the
    quantized one whose state dict is ``state``, in place."""
    if not installed:
        install(with_rotation(model, config), config)
    _assign(model, state, source)
    set_mode(model, "quant")
    setattr(model, CONFIG_ATTR, config)
    return model.eval()


def with_rotation(model: nn.Module, config: QuantConfig) -> nn.Module:
    """A rotated model has other modules (RMSNorm, the un-rotating final linear): rebuild them
    (the saved state then overwrites the weights)."""
    if config.rotation:
        rotate(model, config.rotation, config.rotation_seed)
    return model


def _assign(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Set every parameter and buffer from ``state``. Shapes may differ from the fresh,
    uncalibrated quantizers' (e.g. per-channel scales), and buffers calibration fills (the
    grid weights, group scales of low-bit weights) are registered empty until then."""
    modules = dict(model.named_modules())
    expected = set(model.state_dict())
    missing = expected - set(state)
    unexpected = sorted(k for k in set(state) - expected if not is_empty_buffer(modules, k))
    if missing or unexpected:
        raise ModelLoadError(f"{source!r} does not match the model: missing {sorted(missing)[:5]}, "
                             f"unexpected {unexpected[:5]}")
    for key, tensor in state.items():
        owner, _, name = key.rpartition(".")
        module = modules[owner]
        if name in module._parameters:
            module._parameters[name] = nn.Parameter(tensor, requires_grad=False)
        else:
            module._buffers[name] = tensor


def is_empty_buffer(modules: dict[str, nn.Module], key: str) -> bool:
    """Whether ``key`` names a buffer its module registered empty (``None``): quantization state
    that calibration fills, so a fresh model's state dict does not list it."""
    owner, _, name = key.rpartition(".")
    module = modules.get(owner)
    return module is not None and name in module._buffers and module._buffers[name] is None
