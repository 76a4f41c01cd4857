"""Each int8 linear (MatMul or classifier-head Gemm) becomes one MatMulIntegerToFloat carrying its
bias and layer scale."""

import copy
import shutil

import onnx
import torch
from torch import nn

from conftest import make_tiny_vit
from vitslim import quant
from vitslim.bench import OnnxModel
from vitslim.export import export_onnx, integer_ops
from vitslim.export.int8_linear import fuse_int8_linears
from vitslim.quant.hybrid import HybridQuantConfig, quantize_hybrid_


def ops(path):
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_int8_linears_carry_bias_and_layer_scale_with_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    model = make_tiny_vit(init_values=0.1)  # layer scale, as DINOv2
    for block in model.blocks:  # distinct layer scales and nonzero biases, so a wrong fold shows
        block.ls1.gamma.data.uniform_(-0.5, 0.5)
        block.ls2.gamma.data.uniform_(-0.5, 0.5)
        for linear in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
            linear.bias.data.normal_(0, 0.5)
    qmodel = quant.quantize_(copy.deepcopy(model), quant.preset("w8a8-ort"), torch.randn(8, 3, 32, 32))
    plain = export_onnx(qmodel, tmp_path / "plain.onnx", ort_kernels=False)
    fused = tmp_path / "fused.onnx"
    shutil.copy(plain, fused)

    linears = 4 * len(model.blocks)  # qkv, proj, fc1, fc2
    assert fuse_int8_linears(fused) == linears
    before, after = ops(plain), ops(fused)
    assert after.count("MatMulIntegerToFloat") == linears
    assert before.count("Add") - after.count("Add") == linears  # every bias inside the kernel
    assert before.count("Mul") - after.count("Mul") == 2 * len(model.blocks)  # both layer scales folded
    # GELU as one op (opset 20): ORT cannot re-fuse the Erf pattern once its input is split into
    # a DequantizeLinear per consumer, as it is after an int8 conv in hybrid models
    assert "Erf" not in after and after.count("Gelu") == len(model.blocks)
    graph = onnx.load(str(fused)).graph
    assert all(len(n.input) == 7 for n in graph.node if n.op_type == "MatMulIntegerToFloat")  # bias input set

    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = qmodel(images)
    err_plain = (OnnxModel(plain)(images) - expected).abs().max()
    err_fused = (OnnxModel(fused)(images) - expected).abs().max()
    assert err_fused <= 2 * err_plain + 1e-5 * expected.abs().max(), (err_fused, err_plain)
    assert export_onnx(qmodel, tmp_path / "default.onnx") and ops(tmp_path / "default.onnx") == after  # the default


def test_float_linears_and_graphs_without_int8_are_left_alone(tmp_path):
    path = export_onnx(make_tiny_vit(), tmp_path / "fp32.onnx")
    before = path.read_bytes()
    assert fuse_int8_linears(path) == 0 and path.read_bytes() == before


def test_a_classifier_head_gemm_becomes_one_int8_kernel(tmp_path):
    """A Linear on pooled (2-D) features exports as Gemm, which ORT runs in float with its int8
    weight dequantized on every run; the pass makes it one MatMulIntegerToFloat."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16)).eval()
    model[-1].bias.data.normal_(0, 0.5)
    x = torch.randn(10, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    qmodel = quantize_hybrid_(copy.deepcopy(model), HybridQuantConfig(error_images=1), x[:8])
    plain = export_onnx(qmodel, tmp_path / "plain.onnx", ort_kernels=False)
    fused = export_onnx(qmodel, tmp_path / "fused.onnx")
    assert ops(plain).count("Gemm") == 1 and "Gemm" not in ops(fused)
    assert integer_ops(fused).get("MatMulIntegerToFloat", 0) == 1 and "MatMulIntegerToFloat" not in integer_ops(plain)
    with torch.no_grad():
        quantization_error = (OnnxModel(plain)(x[8:]) - model(x[8:])).abs().max()
    assert (OnnxModel(fused)(x[8:]) - OnnxModel(plain)(x[8:])).abs().max() < 0.25 * quantization_error
