"""4-bit GPTQ weights exported as ONNX Runtime MatMulNBits (tiny random ViTs: runs, matches)."""

import copy
from dataclasses import replace

import onnx
import pytest
import torch

from conftest import make_tiny_vit
from vitslim import quant
from vitslim.bench import OnnxModel
from vitslim.errors import ExportError
from vitslim.export import export_onnx
from vitslim.export.nbits import pack_layer
from vitslim.quant.config import SITES, SiteConfig


def weight_only_w4(group_size, act_order=False):
    float_site = SiteConfig(8, "float")
    return replace(quant.preset("w4-ort"), gptq_group_size=group_size, gptq_act_order=act_order,
                   **{s: float_site for s in SITES})


def op_counts(path):
    counts = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


@pytest.mark.parametrize(("group_size", "act_order"), [(None, False), (32, False), (32, True)])
def test_matmulnbits_file_computes_the_simulated_4bit_model_and_is_small(tmp_path, group_size, act_order):
    model = make_tiny_vit()
    torch.manual_seed(1)
    calib, images = torch.randn(8, 3, 32, 32), torch.randn(4, 3, 32, 32)
    qmodel = quant.quantize_(copy.deepcopy(model), weight_only_w4(group_size, act_order), calib)
    path = export_onnx(qmodel, tmp_path / "w4.onnx")
    assert op_counts(path).get("MatMulNBits") == 8  # 4 linears x 2 blocks, none left as float MatMul weights
    with torch.no_grad():
        simulated, original = qmodel(images), model(images)
    graph = onnx.load(str(path))  # accuracy_level 0: float activations, so only the weights differ
    for node in graph.graph.node:
        for attr in node.attribute:
            if attr.name == "accuracy_level":
                attr.i = 0
    onnx.save(graph, str(tmp_path / "exact.onnx"))
    got = OnnxModel(tmp_path / "exact.onnx")(images)
    # The file holds the 4-bit weights: it reproduces the simulated model, not the FP32 one.
    assert (got - simulated).abs().max() < 1e-4 * simulated.abs().max()
    assert (simulated - original).abs().max() > 100 * (got - simulated).abs().max()
    # Default (int8 activations inside the kernel): close to the simulated model too.
    fast = OnnxModel(path)(images)
    assert torch.nn.functional.cosine_similarity(fast, simulated).min() > 0.99
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    linear_bytes = sum(m.linear.weight.numel() * 4 for m in qmodel.modules() if hasattr(m, "qweight"))
    # 4-bit codes + scales: the linears' weights take less than a quarter of their FP32 bytes
    assert path.stat().st_size < fp32_bytes - 0.75 * linear_bytes, (path.stat().st_size, fp32_bytes, linear_bytes)


def test_weights_off_their_grid_are_refused():
    qmodel = quant.quantize_(make_tiny_vit(), weight_only_w4(None), torch.randn(8, 3, 32, 32))
    layer = next(m for m in qmodel.modules() if hasattr(m, "qweight"))
    pack_layer(layer, None)  # as calibrated: fine
    layer.qweight = layer.qweight + 0.3 * layer.weight_quantizer.scale  # no longer scale x integer
    with pytest.raises(ExportError, match="not on its scales' grid"):
        pack_layer(layer, None)


@pytest.mark.parametrize("preset", ["w4-ort", "w4a8", "w4a4"])
def test_every_4bit_preset_saved_by_quantize_exports_from_its_folder(tmp_path, example_images, preset):
    """``vitslim quantize --out q`` then ``vitslim export q``: the saved folder keeps each grouped
    weight's steps, so its 4-bit codes are packed as they were calibrated."""
    transformers = pytest.importorskip("transformers", reason="the tiny CLI model is a Hugging Face folder")
    from typer.testing import CliRunner

    import vitslim
    from vitslim.cli import app

    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=128, image_size=32, patch_size=8)
    transformers.ViTModel(config).save_pretrained(tmp_path / "hf")
    runner = CliRunner()
    res = runner.invoke(app, ["quantize", f"hf:{tmp_path / 'hf'}", "--data", str(example_images), "--preset", preset,
                              "--calib-images", "8", "--eval-images", "2", "--out", str(tmp_path / "q")])
    assert res.exit_code == 0, res.output
    simulated = ["--simulate"] if preset != "w4-ort" else []  # their activations are simulated
    res = runner.invoke(app, ["export", str(tmp_path / "q"), "--out", str(tmp_path / "q.onnx"), *simulated])
    assert res.exit_code == 0, res.output
    assert op_counts(tmp_path / "q.onnx").get("MatMulNBits") == 8
    loaded, x = vitslim.load(tmp_path / "q").model, torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        simulated = loaded(x)
    got = OnnxModel(tmp_path / "q.onnx")(x)
    assert torch.nn.functional.cosine_similarity(got, simulated).min() > 0.99
