"""Which architectures token reduction can patch, and why the others are refused.

ToMe, EViT, ATS and MCTF drop or merge tokens between global-attention blocks: every later block
must accept any number of tokens in any order. Hierarchical and hybrid models do not: their
windowed attention, convolutions, pooling and patch merging read tokens as a fixed H×W grid.
Neither does BEiT: its relative position bias is a table over every pair of grid positions.
"""

from __future__ import annotations

from torch import nn

from vitslim.errors import UnsupportedModelError

WINDOWED = "its windowed attention and patch merging need the full H×W token grid in fixed windows"
GRID = ("its convolution / pooling / downsampling stages read tokens as a fixed 2D grid, so merged or "
        "dropped tokens have no place in them")
RELATIVE_POSITIONS = ("its attention adds a learned relative position bias indexed by each token pair's fixed 2D "
                      "offset (BEiT); a merged token has no single position and a dropped one leaves the table "
                      "misaligned")
# timm class name -> why its token sequence cannot shrink.
REASONS = {
    "SwinTransformer": WINDOWED, "SwinTransformerV2": WINDOWED, "SwinTransformerV2Cr": WINDOWED,
    "TinyVit": "its conv stage and windowed attention need the full H×W token grid",
    "EfficientFormer": GRID, "EfficientFormerV2": GRID, "ByobNet": GRID, "MobileVitV2": GRID,
    "EfficientVit": GRID, "EfficientVitMsra": GRID, "EfficientVitLarge": GRID, "NextViT": GRID,
    "ConvNeXt": GRID, "Levit": GRID, "LevitDistilled": GRID, "FastVit": GRID, "Beit": RELATIVE_POSITIONS,
}


def _has_position_bias(blocks: nn.Sequential) -> bool:
    return any(getattr(getattr(b, "attn", None), "position_bias", None) is not None for b in blocks)


def refuse_unsupported(model: nn.Module, method: str) -> None:
    """Raise ``UnsupportedModelError`` with the reason when ``model`` has no ViT ``blocks``
    sequence that token reduction could patch, or its attention is tied to the full token grid."""
    blocks = getattr(model, "blocks", None)
    name = getattr(model, "hf_class", None) or type(model).__name__  # the Hugging Face class a wrapper holds
    if isinstance(blocks, nn.Sequential):
        if not _has_position_bias(blocks):
            return
        reason, instead = RELATIVE_POSITIONS, "quantization (vitslim.quant) or pruning (vitslim.prune)"
    else:
        reason = REASONS.get(name, "it has no `blocks` sequence of global-attention transformer blocks")
        instead = "quantization (vitslim.quant.hybrid)"
    raise UnsupportedModelError(f"token reduction ({method}) cannot be applied to {name}: {reason}; "
                                f"compress it with {instead} instead")
