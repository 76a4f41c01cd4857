"""Hybrid W8A8 (Q-HyViT granularity choice) on tiny random timm models: accuracy where the
choice matters, exactness of the folds, int8 kernels in ONNX Runtime, clear refusals."""

from __future__ import annotations

import copy

import onnx
import pytest
import timm
import torch
from torch import nn

from vitslim import tokens
from vitslim.bench import OnnxModel
from vitslim.errors import UnsupportedModelError
from vitslim.export import export_onnx, integer_ops, validate_onnx
from vitslim.export.int8_gates import integer_hardswish_gates
from vitslim.quant.hybrid import HybridQuantConfig, QuantHardswish, QuantSiLU, quantize_hybrid_
from vitslim.quant.modules import set_mode


@pytest.fixture(autouse=True)
def one_thread():
    # Many tiny ops: one thread is ~50x faster than two on a loaded 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_swin(depths: tuple[int, ...] = (1, 1)) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=64, embed_dim=16,
                             depths=depths, num_heads=(1, 2)[: len(depths)], window_size=4, num_classes=10).eval()


def planted_swin() -> nn.Module:
    """A bridge-like outlier: one LayerNorm output channel ~40x wider than the others, the kind
    of inter-channel variation a per-tensor scale cannot hold. One stage, and branch outputs
    as large as the residual (random init makes them ~50x smaller), so the block's error shows."""
    model = tiny_swin(depths=(1,))
    block = model.layers[0].blocks[0]
    with torch.no_grad():
        for norm in (block.norm1, block.norm2):
            norm.weight[3], norm.bias[3] = 40.0, 20.0
        block.attn.proj.weight.mul_(30)
        block.mlp.fc2.weight.mul_(30)
    return model


def rel_error(model: nn.Module, qmodel: nn.Module, x: torch.Tensor, features: bool = False) -> float:
    with torch.no_grad():
        ref, out = (model.forward_features(x), qmodel.forward_features(x)) if features else (model(x), qmodel(x))
    return ((out - ref).pow(2).mean() / ref.pow(2).mean()).item()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(12, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_granularity_choice_wins_on_a_planted_outlier_channel(images):
    model = planted_swin()
    calib, held_out = images[:8], images[8:]
    # Only the two layers the outlier feeds are quantized, so their error is what is compared.
    keep = ("patch_embed", "layers.0.blocks.0.attn.proj", "layers.0.blocks.0.mlp.fc2", "head")
    layer = quantize_hybrid_(copy.deepcopy(model), HybridQuantConfig(granularity="layer", keep_float=keep), calib)
    auto = quantize_hybrid_(copy.deepcopy(model), HybridQuantConfig(granularity="auto", keep_float=keep), calib)
    choice = auto.vitslim_hybrid_choices["layers.0.blocks.0.attn.qkv"]
    assert choice["norm"] == "layers.0.blocks.0.norm1" and choice["choice"] == "channel"
    assert choice["errors"]["channel"] < 0.3 * min(v for k, v in choice["errors"].items() if k != "channel")
    assert rel_error(model, auto, held_out, True) < 0.5 * rel_error(model, layer, held_out, True)
    set_mode(auto, "off")  # the folds alone: the FP32 function is unchanged
    assert rel_error(model, auto, held_out) < 1e-8


def test_swin_exports_to_int8_kernels_matching_the_simulation(images, tmp_path):
    qmodel = quantize_hybrid_(tiny_swin(), HybridQuantConfig(), images[:8])
    path = export_onnx(qmodel, tmp_path / "swin.onnx")
    ops = integer_ops(path)
    # the patch embedding; 4 linears x 2 blocks
    assert ops.get("QLinearConv", 0) >= 1 and ops.get("MatMulIntegerToFloat", 0) >= 8
    check = validate_onnx(qmodel, path, images[8:])
    assert check["cosine"] > 0.999


def test_conv_batchnorm_model_folds_bn_and_runs_qlinearconv(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("efficientformer_l1", pretrained=False, depths=(1, 1, 1, 1), embed_dims=(8, 8, 16, 16),
                              num_vit=1, num_classes=10).eval()
    x = torch.randn(6, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    qmodel = quantize_hybrid_(copy.deepcopy(model), HybridQuantConfig(error_images=1), x[:4])
    assert not any(isinstance(m, nn.BatchNorm2d) for m in qmodel.modules())
    assert rel_error(model, qmodel, x[4:]) < 1e-2
    path = export_onnx(qmodel, tmp_path / "ef.onnx")
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert integer_ops(path).get("QLinearConv", 0) == convs
    assert validate_onnx(qmodel, path, x[4:])["cosine"] > 0.999


def test_batchnorm_with_its_activation_inside_is_folded_too():
    """timm's ConvNormAct puts the activation inside the norm (BatchNormAct2d), as MobileViT and
    EfficientFormerV2 do; a norm left unfolded costs ORT a float BatchNormalization per conv."""
    torch.manual_seed(0)
    model = nn.Sequential(timm.layers.ConvNormAct(3, 8, 3, act_layer=nn.GELU),
                          timm.layers.ConvNormAct(8, 8, 3, act_layer=nn.GELU),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):  # trained-looking statistics
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    x = torch.randn(10, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    qmodel = quantize_hybrid_(copy.deepcopy(model), HybridQuantConfig(error_images=1), x[:8])
    assert not any(isinstance(m, nn.BatchNorm2d) for m in qmodel.modules())
    assert sum(isinstance(m, nn.GELU) for m in qmodel.modules()) == 2  # the activations stay
    assert rel_error(model, qmodel, x[8:]) < 2e-2


class ScaledResidual(nn.Module):
    """EfficientFormer(V2)'s MLP branch: x + γ · conv(x), γ per channel (timm's LayerScale2d)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = timm.layers.ConvNormAct(dim, dim, 1, apply_act=False)
        self.ls = timm.layers.LayerScale2d(dim)
        self.ls.gamma.data.uniform_(-1.5, 1.5)
        self.conv.bn.bias.data.uniform_(-0.5, 0.5)  # a nonzero bias, which the fold must scale too

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ls(self.conv(x))


def test_layer_scale_after_a_conv_is_folded_into_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), ScaledResidual(8), ScaledResidual(8),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    x = torch.randn(10, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    qmodel = quantize_hybrid_(copy.deepcopy(model), HybridQuantConfig(error_images=1), x[:8])
    assert not any(isinstance(m, timm.layers.LayerScale2d) for m in qmodel.modules())
    assert rel_error(model, qmodel, x[8:]) < 2e-2


def test_silu_after_an_int8_conv_stays_on_int8_kernels(tmp_path):
    """MobileViT's conv blocks: conv → SiLU → conv. With the sigmoid on an 8-bit grid ORT runs
    QLinearSigmoid + QLinearMul between the QLinearConvs instead of float Sigmoid and Mul."""
    torch.manual_seed(0)
    model = nn.Sequential(timm.layers.ConvNormAct(3, 8, 3, act_layer=nn.SiLU),
                          timm.layers.ConvNormAct(8, 8, 3, act_layer=nn.SiLU),
                          nn.Conv2d(8, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    x = torch.randn(10, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    qmodel = quantize_hybrid_(copy.deepcopy(model), HybridQuantConfig(error_images=1), x[:8])
    assert sum(isinstance(m, QuantSiLU) for m in qmodel.modules()) == 2
    assert rel_error(model, qmodel, x[8:]) < 1e-2
    ops = integer_ops(export_onnx(qmodel, tmp_path / "silu.onnx"))
    assert ops.get("QLinearSigmoid", 0) == 2 and ops.get("QLinearMul", 0) == 2, ops
    assert validate_onnx(qmodel, tmp_path / "silu.onnx", x[8:])["cosine"] > 0.999


def test_hardswish_after_an_int8_conv_runs_as_integer_add_and_mul(tmp_path):
    """EfficientViT's conv blocks: conv → Hardswish → conv. The gate sits on the [0, 1] grid,
    the export writes it as one QLinearAdd (ORT has no quantized HardSigmoid) with the same
    outputs as the standard-ops file, and ORT runs the product as QLinearMul."""
    torch.manual_seed(0)
    model = nn.Sequential(timm.layers.ConvNormAct(3, 8, 3, act_layer=nn.Hardswish),
                          timm.layers.ConvNormAct(8, 8, 3, act_layer=nn.Hardswish),
                          nn.Conv2d(8, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    x = torch.randn(10, 3, 224, 224, generator=torch.Generator().manual_seed(1)) * 2
    qmodel = quantize_hybrid_(copy.deepcopy(model), HybridQuantConfig(error_images=1), x[:8])
    gates = [m.gate_quantizer for m in qmodel.modules() if isinstance(m, QuantHardswish)]
    assert len(gates) == 2 and all(torch.allclose(torch.stack(q.saturation()), torch.tensor([0.0, 1.0])) for q in gates)
    assert rel_error(model, qmodel, x[8:]) < 1e-2

    fast = export_onnx(qmodel, tmp_path / "fast.onnx")
    portable = export_onnx(qmodel, tmp_path / "portable.onnx", ort_kernels=False)
    assert [n.op_type for n in onnx.load(str(fast)).graph.node].count("HardSigmoid") == 0
    ops = integer_ops(fast)
    assert ops.get("QLinearAdd", 0) == 2 and ops.get("QLinearMul", 0) == 2, ops
    assert integer_ops(portable).get("QLinearMul", 0) == 2 and "QLinearAdd" not in integer_ops(portable)
    with torch.no_grad():
        quantization_error = (OnnxModel(portable)(x[8:]) - model(x[8:])).abs().max()
    assert (OnnxModel(fast)(x[8:]) - OnnxModel(portable)(x[8:])).abs().max() < 0.25 * quantization_error
    assert validate_onnx(qmodel, fast, x[8:])["cosine"] > 0.999

    gates[0].scale.mul_(0.9)  # a grid that ends below 1 saturates elsewhere than the clip: left as it is
    off_grid = export_onnx(qmodel, tmp_path / "off_grid.onnx", ort_kernels=False)
    assert integer_hardswish_gates(off_grid) == 1


def test_unsupported_modules_are_named_and_the_model_is_untouched(images):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(2), nn.Conv1d(8, 8, 1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedModelError, match=r"2 \(Conv1d\)"):
        quantize_hybrid_(model, HybridQuantConfig(), images[:2])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    std = nn.Sequential(timm.layers.StdConv2d(3, 8, 3))
    with pytest.raises(UnsupportedModelError, match="StdConv2d"):
        quantize_hybrid_(std, HybridQuantConfig(), images[:2])


def test_token_reduction_refuses_windowed_attention_with_the_reason():
    with pytest.raises(UnsupportedModelError, match="windowed attention"):
        tokens.reduce_tokens_(tiny_swin(), tokens.ToMeConfig(r=2))


def test_hybrid_quantization_is_a_registered_verb(images):
    from vitslim import registry

    model = tiny_swin()
    direct = quantize_hybrid_(copy.deepcopy(model), HybridQuantConfig(granularity="layer"), images[:4])
    via_registry = registry.apply_(copy.deepcopy(model), HybridQuantConfig(granularity="layer"), images[:4])
    with torch.no_grad():
        assert torch.equal(direct(images[4:6]), via_registry(images[4:6]))
        assert not torch.equal(direct(images[4:6]), model(images[4:6]))  # it did quantize


@pytest.mark.parametrize("name, kwargs", [
    ("efficientformer_l1", dict(depths=(1, 1, 1, 1), embed_dims=(32, 48, 64, 96), num_vit=1)),
    ("mobilevit_xxs", {}),
])
def test_hybrid_int8_file_holds_int8_weights_and_is_a_quarter_of_fp32(name, kwargs, tmp_path):
    """Every conv and linear weight is stored once, as int8 with its scales (DequantizeLinear
    reads it; ORT fuses it into QLinearConv / MatMulIntegerToFloat), so the file is about a
    quarter of the FP32 one and ONNX Runtime computes what the quantized model does."""
    from onnx import numpy_helper

    from vitslim.models.loading import input_size

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    x = torch.randn(6, *input_size(model), generator=torch.Generator().manual_seed(2))
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    fp32 = export_onnx(model, tmp_path / "fp32.onnx", ort_kernels=False)
    qmodel = quantize_hybrid_(copy.deepcopy(model), HybridQuantConfig(ranges=("minmax",), error_images=1), x[:4])
    path = export_onnx(qmodel, tmp_path / "int8.onnx")
    stored = [numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer]
    assert sum(a.size for a in stored if a.dtype == "int8") >= weights
    assert path.stat().st_size <= 0.3 * fp32.stat().st_size
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert integer_ops(path).get("QLinearConv", 0) == convs
    check = validate_onnx(qmodel, path, x[4:])
    assert check["cosine"] > 0.999
