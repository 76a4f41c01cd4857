"""Models: loading (timm names, checkpoints, the offline reference) and the part adapter."""

from vitslim.models.adapter import (
    BlockParts,
    UnsupportedModelError,
    ViTParts,
    register_block_adapter,
    vit_parts,
)
from vitslim.models.loading import REFERENCE_NAME, ModelLoadError, load_model, read_state_dict
from vitslim.models.reference import load_reference_model

__all__ = [
    "REFERENCE_NAME",
    "BlockParts",
    "ModelLoadError",
    "UnsupportedModelError",
    "ViTParts",
    "load_model",
    "load_reference_model",
    "read_state_dict",
    "register_block_adapter",
    "vit_parts",
]
