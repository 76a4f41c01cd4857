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
    "BlockParts", "ViTParts", "UnsupportedModelError", "register_block_adapter", "vit_parts",
    "REFERENCE_NAME", "ModelLoadError", "load_model", "read_state_dict", "load_reference_model",
]
