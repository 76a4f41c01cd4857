"""Reading checkpoints without executing pickled code, and loading them strictly."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from vitslim.errors import ModelLoadError


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict without executing pickled code.

    Accepts safetensors files and torch files saved as a plain state dict or wrapped as
    ``{"model": ...}`` (DeiT), ``{"state_dict": ...}`` or ``{"model_ema": ...}``.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"checkpoint {str(path)!r} does not exist or is not a file")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise ModelLoadError(f"cannot read checkpoint {str(path)!r} as safetensors ({type(err).__name__}: "
                                 f"{' '.join(str(err).split())[:200]}); is it truncated or another format "
                                 "renamed? Re-download or re-save it.") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ModelLoadError(
            f"cannot read checkpoint {str(path)!r} safely ({type(err).__name__}: {err}); "
            "vitslim loads .pth files with weights_only=True: re-save it as a plain state "
            "dict or as .safetensors."
        ) from err
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(f"checkpoint {str(path)!r} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load weights, failing with the mismatching keys named rather than half-loading."""
    own = model.state_dict()
    wrong_shape = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if wrong_shape:
        k = wrong_shape[0]
        raise ModelLoadError(
            f"checkpoint {source!r} does not fit {type(model).__name__}: {len(wrong_shape)} tensor(s) "
            f"of the wrong shape, e.g. {k} is {tuple(state[k].shape)} in the file but "
            f"{tuple(own[k].shape)} in the model. Is it the right model name?"
        )
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ModelLoadError(
            f"checkpoint {source!r} does not fit {type(model).__name__}: "
            f"missing {result.missing_keys[:5]}{'...' if len(result.missing_keys) > 5 else ''}, "
            f"unexpected {result.unexpected_keys[:5]}"
            f"{'...' if len(result.unexpected_keys) > 5 else ''}. Is it the right model name?"
        )
