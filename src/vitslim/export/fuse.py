"""Fused transformer graphs: ONNX Runtime's transformer optimizer on an exported ViT.

ORT's optimizer (``onnxruntime.transformers.optimizer``, model type ``vit``) replaces the
residual Add + LayerNorm pairs by ``SkipLayerNormalization`` and bias Add + GELU by
``BiasGelu`` (com.microsoft contrib ops: one pass over the activations instead of two or
three). It leaves vitslim's QuantizeLinear/DequantizeLinear pairs where they are, so the int8
matmuls keep vitslim's scales and ONNX Runtime still fuses them into integer kernels; the
attention pattern is not fused when q and k carry Q/DQ (ORT's fused Attention is float only).
Only graph fusions run here (``opt_level=0``); ORT's own session optimizations still apply.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from vitslim.errors import ExportError
from vitslim.output import atomic_path

FUSED_OPS = ("SkipLayerNormalization", "BiasGelu", "FastGelu", "Attention", "MultiHeadAttention")


def fuse_transformer(model: nn.Module, onnx_path: str | Path, out: str | Path | None = None) -> dict[str, int]:
    """Fuse the ONNX export of ``model`` at ``onnx_path`` (written to ``out``, default in place,
    atomically). Returns how many of each fused op the graph now has."""
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    from vitslim.models import vit_parts

    attn = vit_parts(model).blocks[0].attn
    qkv = attn.qkv if hasattr(attn.qkv, "in_features") else attn.qkv.linear  # plain or quantized linear
    heads, dim = attn.num_heads, qkv.in_features
    level = logging.getLogger("onnxruntime").level
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)  # it logs every pattern it tries
    try:
        fused = optimizer.optimize_model(str(onnx_path), model_type="vit", num_heads=heads, hidden_size=dim,
                                         opt_level=0, optimization_options=FusionOptions("vit"))
    except Exception as err:  # the optimizer reports unexpected graphs as assorted exceptions
        raise ExportError(f"ONNX Runtime's transformer optimizer failed on {str(onnx_path)!r}: "
                          f"{type(err).__name__}: {' '.join(str(err).split())[:300]}") from err
    finally:
        logging.getLogger("onnxruntime").setLevel(level)
    with atomic_path(out or onnx_path) as tmp:
        fused.save_model_to_file(str(tmp))
    counts = {op: 0 for op in FUSED_OPS}
    for node in fused.model.graph.node:
        if node.op_type in counts:
            counts[node.op_type] += 1
    return counts
