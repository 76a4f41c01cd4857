"""Hardswish after an int8 conv, in integer: its gate as one ONNX Runtime ``QLinearAdd``.

Hybrid W8A8 (``vitslim.quant.hybrid.QuantHardswish``) computes Hardswish as x · q(hardsigmoid(x))
with the gate on the 8-bit grid that spans [0, 1] exactly. The exporter writes the gate as
``Q(HardSigmoid(DQ(x_q)))``, which ONNX Runtime runs in float (it has no quantized HardSigmoid),
with layout transposes around it: on EfficientViT-B1 that float chain cost more kernel time
than all of its int8 convs. But hardsigmoid(x) = clip((x + 3) / 6, 0, 1), so on that grid the
gate's codes are those of x + 3 on a grid 6× as coarse, saturated at the type's bounds:
``QLinearAdd(x_q, 3)`` with output scale 6·s computes them from x's codes (the same up to float
rounding inside the kernel). ORT's own QDQ rules then fuse x · gate into ``QLinearMul``, and the
chain from conv to conv stays int8.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from vitslim.export.graph import GraphIndex, rewrite_nodes


def _spans_unit_interval(scale: np.ndarray, zero: np.ndarray) -> bool:
    """Whether the grid's saturation bounds are exactly 0 and 1 (so saturating is the clip)."""
    info = np.iinfo(zero.dtype)
    lo, hi = (info.min - int(zero)) * float(scale), (info.max - int(zero)) * float(scale)
    return lo == 0 and abs(hi - 1) < 1e-6


def _integer_gate(g: GraphIndex, hardsigmoid: onnx.NodeProto) -> tuple[onnx.NodeProto, list, list] | None:
    """The ``QLinearAdd`` (its constant initializers, and the nodes it replaces) computing the
    quantized ``hardsigmoid``, or None when it is not Q(HardSigmoid(DQ(x_q))) on a [0, 1] grid."""
    attrs = {a.name: a.f for a in hardsigmoid.attribute}
    dq = g.made_by(hardsigmoid.input[0], "DequantizeLinear")
    q = g.only_consumer(hardsigmoid.output[0], "QuantizeLinear")
    if dq is None or q is None or abs(attrs.get("alpha", 0.2) - 1 / 6) > 1e-6 or attrs.get("beta", 0.5) != 0.5:
        return None
    x_scale, x_zero = (g.const(name) for name in dq.input[1:3])
    scale, zero = (g.const(name) for name in q.input[1:3])
    if any(v is None or v.size != 1 for v in (x_scale, x_zero, scale, zero)) or x_zero.dtype != zero.dtype:
        return None
    if not _spans_unit_interval(scale, zero):
        return None
    top = np.iinfo(zero.dtype).max
    name = hardsigmoid.name or hardsigmoid.output[0]
    tensors = {"three": np.array(top, zero.dtype), "three_scale": np.array(3 / top, np.float32),
               "three_zero": np.array(0, zero.dtype), "scale": (6 * scale).astype(np.float32).reshape(()),
               "zero": zero.reshape(())}
    inits = [numpy_helper.from_array(v, f"{name}/int8_{k}") for k, v in tensors.items()]
    node = helper.make_node("QLinearAdd", [*dq.input[:3], *(i.name for i in inits)], [q.output[0]],
                            name=f"{name}/int8", domain="com.microsoft")
    return node, inits, [hardsigmoid, q]


def integer_hardswish_gates(path: str | Path) -> int:
    """Rewrite each ``Q(HardSigmoid(DQ(x_q)))`` gate on a [0, 1] grid of the ONNX file at
    ``path`` as one ``QLinearAdd``, in place. Returns how many; the rest of the graph is kept."""
    return rewrite_nodes(path, ("HardSigmoid",), _integer_gate)
