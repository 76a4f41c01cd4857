"""ORT's transformer fusions on vitslim's exports keep the int8 scales and the outputs."""

import onnx
import torch

from conftest import make_tiny_vit
from vitslim import quant
from vitslim.bench import OnnxModel
from vitslim.export import export_onnx, integer_ops
from vitslim.export.fuse import fuse_transformer


def count(path, op):
    return sum(n.op_type == op for n in onnx.load(str(path)).graph.node)


def test_fusion_keeps_qdq_int8_kernels_and_outputs(tmp_path):
    torch.manual_seed(0)
    qmodel = quant.quantize(make_tiny_vit(), torch.randn(8, 3, 32, 32), "w8a8-ort")
    path = export_onnx(qmodel, tmp_path / "int8.onnx")
    counts = fuse_transformer(qmodel, path, tmp_path / "fused.onnx")
    fused = tmp_path / "fused.onnx"
    # 2 blocks: both residual adds before a LayerNorm (3 of 4; the last feeds the final norm too)
    assert counts["SkipLayerNormalization"] >= 3 and counts["BiasGelu"] == 2, counts
    assert count(fused, "LayerNormalization") + counts["SkipLayerNormalization"] == count(path, "LayerNormalization")
    assert count(fused, "QuantizeLinear") == count(path, "QuantizeLinear") > 0  # vitslim's scales kept
    assert integer_ops(fused) == integer_ops(path)  # still the same int8 kernels
    images = torch.randn(4, 3, 32, 32)
    before, after = OnnxModel(path)(images), OnnxModel(fused)(images)
    assert (before - after).abs().max() < 1e-3 * before.abs().max()
