"""One ONNX Runtime int8 kernel per quantized linear, bias and per-channel output scale included.

The exporter writes a quantized linear as ``DQ(x_q) @ Transpose(DQ(W_q)) + b`` (then, on DINOv2,
``× γ`` for the layer scale). ONNX Runtime fuses the Q/DQ matmul into ``MatMulIntegerToFloat``
but leaves the bias and the layer scale as separate float passes over the activations (and
fuses fc1's bias into ``BiasGelu``, which is slower than ``Gelu`` here). On a 2-D input (a
classifier head on pooled features) the exporter writes ``Gemm(DQ(x_q), DQ(W_q), b)`` instead,
which ORT fuses only with an int32 bias: it ran the head in float and dequantized its weight on
every run (on TinyViT at batch 1, 18 of 71 ms). This pass writes the contrib op
``com.microsoft.MatMulIntegerToFloat`` directly for both, with the same int8 codes and scales
and its bias input, which the kernel adds in the GEMM epilogue; a following multiplication by a
constant per-output vector γ is folded in exactly as ``(x W + b) γ = x (W diag γ) + b γ``
(the weight scale and the bias times γ; the int8 codes are unchanged). The file then needs
ONNX Runtime, as ``MatMulNBits`` (``vitslim.export.nbits``) does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from vitslim.export.graph import GraphIndex, rewrite_nodes


def _matmul_parts(g: GraphIndex, matmul: onnx.NodeProto) -> tuple | None:
    """``DQ(x) @ Transpose(DQ(W)) + b``: the activation DQ, weight DQ, bias and the nodes it spans."""
    transpose = g.made_by(matmul.input[1], "Transpose")
    weight = g.made_by(transpose.input[0], "DequantizeLinear") if transpose is not None else None
    add = g.only_consumer(matmul.output[0], "Add")
    if weight is None or add is None:
        return None
    return g.made_by(matmul.input[0], "DequantizeLinear"), weight, g.other_input(add, matmul.output[0]), [matmul, add]


def _gemm_parts(g: GraphIndex, gemm: onnx.NodeProto) -> tuple | None:
    """``Gemm(DQ(x), DQ(W), b, transB=1)``, as a classifier head on pooled features is exported
    (ORT fuses it only with a quantized int32 bias, so it dequantized the weight on every run)."""
    attrs = {a.name: (a.f if a.type == onnx.AttributeProto.FLOAT else a.i) for a in gemm.attribute}
    if len(gemm.input) != 3 or attrs.get("transA", 0) or attrs.get("transB", 0) != 1 or \
            attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
        return None
    return (g.made_by(gemm.input[0], "DequantizeLinear"), g.made_by(gemm.input[1], "DequantizeLinear"),
            g.const(gemm.input[2]), [gemm])


LINEAR_PATTERNS = {"MatMul": _matmul_parts, "Gemm": _gemm_parts}


def _int8_linear(g: GraphIndex, node: onnx.NodeProto) -> tuple[onnx.NodeProto, list[onnx.TensorProto], list] | None:
    """The fused node (and its new initializers, and the nodes it replaces) for one int8 linear
    ``DQ(x) @ DQ(W int8)ᵀ + b [× γ]``, or None when ``node`` does not start one."""
    parts = LINEAR_PATTERNS[node.op_type](g, node)
    if parts is None:
        return None
    act, weight, bias, replaced = parts
    if act is None or weight is None or weight.input[0] not in g.initializers:
        return None
    codes, w_scale, w_zero = (g.const(name) for name in weight.input[:3])
    x_scale, x_zero = (g.const(name) for name in act.input[1:3])
    if any(v is None for v in (w_scale, w_zero, x_scale, x_zero, bias)) or codes.ndim != 2 or x_scale.size != 1:
        return None
    axis = next((a.i for a in weight.attribute if a.name == "axis"), 1)
    if axis != 0 or bias.shape != (codes.shape[0],) or w_scale.shape != (codes.shape[0],):
        return None  # per-output-channel weight scales and a bias vector only
    last = replaced[-1]
    mul = g.only_consumer(last.output[0], "Mul")
    gamma = g.other_input(mul, last.output[0]) if mul is not None else None
    if gamma is not None and gamma.shape == bias.shape:  # layer scale folded into the output scale
        w_scale, bias, last = w_scale * gamma, bias * gamma, mul
        replaced.append(mul)
    name = node.name or node.output[0]
    tensors = {"w": np.ascontiguousarray(codes.T), "x_scale": x_scale.astype(np.float32).reshape(()),
               "w_scale": w_scale.astype(np.float32), "x_zero": x_zero.reshape(()), "w_zero": w_zero,
               "bias": bias.astype(np.float32)}
    inits = [numpy_helper.from_array(v, f"{name}/int8_{k}") for k, v in tensors.items()]
    fused = helper.make_node("MatMulIntegerToFloat", [act.input[0], *(i.name for i in inits)], [last.output[0]],
                             name=f"{name}/int8", domain="com.microsoft")
    return fused, inits, replaced


def fuse_int8_linears(path: str | Path) -> int:
    """Rewrite each Q/DQ int8 linear of the ONNX file at ``path`` as one
    ``MatMulIntegerToFloat`` with its bias (and a following per-channel scale), in place.
    Returns how many were fused; anything else in the graph is left as it is."""
    return rewrite_nodes(path, LINEAR_PATTERNS, _int8_linear)
