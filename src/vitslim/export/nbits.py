"""Real 4-bit weights in ONNX Runtime: vitslim's GPTQ weights packed into ``MatMulNBits``.

GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", ICLR 2023) rounds each weight to ``scale × code`` with a 4-bit code. The export
writes those codes and scales, not a re-quantization: ONNX Runtime's weight-only
``com.microsoft.MatMulNBits`` stores B as uint8 ``[N, K / block, block / 2]`` (two codes a
byte, the first in the low nibble, code + 8 since the default zero point is 8) and one float
scale per (output column, block of ``block`` input rows). A per-channel GPTQ weight gives the
same scale to every block of a column; a grouped one (``gptq_group_size``) its group's scale,
so the block is the group. ``accuracy_level=4`` lets ONNX Runtime quantize activations to int8
per block inside the kernel (its fast VNNI path); 0 keeps activations in float.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vitslim.errors import ExportError

NBITS = 4
BLOCKS = (128, 64, 32, 16)  # per-channel weights: any block holds them; the largest that divides K
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits: 0/1 float32 compute ... 4 int8 compute


@dataclass(frozen=True)
class PackedWeight:
    """One linear's 4-bit weight in MatMulNBits' layout."""

    codes: np.ndarray  # uint8 [N, K / block, block / 2]
    scales: np.ndarray  # float32 [N, K / block]
    k: int
    n: int
    block: int


def nbits_layers(model: nn.Module) -> list[nn.Module]:
    """The model's calibrated 4-bit ``QuantLinear``s (what ``MatMulNBits`` can hold)."""
    from vitslim.quant.modules import QuantLinear

    return [m for m in model.modules() if isinstance(m, QuantLinear) and m.qweight is not None
            and m.weight_quantizer.bits == NBITS]


def pack_layer(layer: nn.Module, group_size: int | None) -> PackedWeight:
    """The integer codes and block scales of a 4-bit ``QuantLinear``'s weight (checked: they
    reproduce its fake-quantized weight)."""
    qweight = layer.qweight.detach().float()  # (N, K)
    n, k = qweight.shape
    grouped = layer.qweight_group_scales
    if grouped is not None:
        block = group_size or 0
        if block < 16 or block & (block - 1):
            raise ExportError(f"MatMulNBits needs a block of a power of two >= 16 input rows; GPTQ groups of "
                              f"{group_size} do not fit: quantize with gptq_group_size 16, 32, 64 or 128")
        scales = grouped.float()
    else:
        block = next((b for b in BLOCKS if k % b == 0), BLOCKS[0])  # else K is padded with zero codes
        scales = layer.weight_quantizer.scale.detach().float().reshape(n, 1).expand(n, -(-k // block))
    blocks = -(-k // block)
    if scales.shape != (n, blocks):
        raise ExportError(f"4-bit weight of shape {tuple(qweight.shape)}: expected {blocks} scales per output, "
                          f"got {scales.shape[1]}; re-run vitslim quantize")
    padded = torch.zeros(n, blocks * block)
    padded[:, :k] = qweight
    step = scales.repeat_interleave(block, 1)
    codes = torch.round(padded / step).clamp(-(2 ** (NBITS - 1)), 2 ** (NBITS - 1) - 1)
    if not torch.allclose(codes[:, :k] * step[:, :k], qweight, atol=1e-6, rtol=1e-5):
        raise ExportError("a 4-bit weight is not on its scales' grid (was it changed after quantization?); "
                          "re-run vitslim quantize")
    unsigned = (codes + 2 ** (NBITS - 1)).to(torch.uint8).reshape(n, blocks, block // 2, 2)
    packed = unsigned[..., 0] | (unsigned[..., 1] << 4)
    return PackedWeight(packed.numpy(), scales.contiguous().numpy(), k, n, block)


def _weight_hash(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def store_nbits_weights(model: nn.Module, path: str | Path, accuracy_level: int = 4) -> int:
    """Replace, in the ONNX file at ``path`` (exported from ``model``), each MatMul whose
    constant weight is one of ``model``'s 4-bit weights by ``MatMulNBits`` with the packed
    codes, in place. Returns how many were replaced; every 4-bit weight must be found."""
    import onnx
    from onnx import helper, numpy_helper

    from vitslim.export.graph import drop_unused, use_contrib_domain

    if accuracy_level not in ACCURACY_LEVELS:
        raise ExportError(f"accuracy_level must be one of {ACCURACY_LEVELS}, got {accuracy_level}")
    layers = nbits_layers(model)
    if not layers:
        return 0
    config = getattr(model, "vitslim_quant_config", None)
    group_size = config.gptq_group_size if config is not None else None
    by_weight = {_weight_hash(layer.qweight.detach().float().T.numpy()): layer for layer in layers}
    graph_model = onnx.load(str(path))
    graph = graph_model.graph
    inits = {i.name: i for i in graph.initializer}
    replaced: dict[int, str] = {}
    for index, node in enumerate(list(graph.node)):
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        layer = by_weight.get(_weight_hash(weight)) if weight.ndim == 2 else None
        if layer is None:
            continue
        packed = pack_layer(layer, group_size)
        name = node.input[1]
        graph.initializer.extend([numpy_helper.from_array(packed.codes, f"{name}_q4"),
                                  numpy_helper.from_array(packed.scales, f"{name}_scales")])
        fused = helper.make_node("MatMulNBits", [node.input[0], f"{name}_q4", f"{name}_scales"], list(node.output),
                                 name=f"{node.name or name}_q4", domain="com.microsoft", K=packed.k, N=packed.n,
                                 bits=NBITS, block_size=packed.block, accuracy_level=accuracy_level)
        graph.node.remove(node)
        graph.node.insert(index, fused)
        replaced[id(layer)] = name
    if len(replaced) != len({id(m) for m in layers}):
        raise ExportError(f"found {len(replaced)} of the {len(layers)} 4-bit weights in the exported graph; "
                          "MatMulNBits export needs each as a constant MatMul weight")
    drop_unused(graph)
    use_contrib_domain(graph_model)
    onnx.save(graph_model, str(path))
    return len(replaced)
