import copy

import onnxruntime as ort
import pytest
import torch

from conftest import make_tiny_vit
from vitslim import load_image_folder, quant, tokens
from vitslim.data import calibration_images
from vitslim.errors import ConfigError
from vitslim.export import ExportError, export_onnx, integer_ops, validate_onnx


@pytest.fixture(scope="module")
def real_images(example_images, reference_model):
    return calibration_images(load_image_folder(example_images, reference_model, limit=6))


def test_fp32_export_matches_pytorch_on_real_images(tmp_path, reference_model, real_images):
    path = export_onnx(reference_model, tmp_path / "fp32.onnx")
    report = validate_onnx(reference_model, path, real_images)
    assert report["max_abs_diff"] < 1e-3 and report["cosine"] > 0.999999


def test_w8a8_export_runs_on_integer_kernels(tmp_path, reference_model, real_images):
    qmodel = quant.quantize_(copy.deepcopy(reference_model), quant.preset("w8a8-int"), real_images[:4])
    path = export_onnx(qmodel, tmp_path / "w8a8.onnx")
    fp32_mb = sum(p.numel() for p in reference_model.parameters()) * 4 / 1e6
    assert path.stat().st_size / 1e6 < 0.35 * fp32_mb  # int8 weights in the file, not float + Q
    kernels = integer_ops(path)
    # 4 linears and both attention matmuls per block × 12 blocks: int8, with vitslim's own scales.
    assert sum(kernels.values()) >= 72, kernels
    report = validate_onnx(qmodel, path, real_images)
    assert report["cosine"] > 0.995, report  # rounding-tie differences between the runtimes only


def test_float_attention_probabilities_keep_int8_kernels_and_fidelity(tmp_path, reference_model, real_images):
    from vitslim import metrics

    with torch.no_grad():
        fp = reference_model(real_images)
        cosine = {
            p: metrics.cosine_similarity(
                fp, quant.quantize_(copy.deepcopy(reference_model), quant.preset(p), real_images[:4])(real_images)
            )
            for p in ("w8a8-int", "w8a8-ort")
        }
    # Uniform 8-bit cannot hold power-law attention probabilities; leaving attn·v in float fixes most of it.
    assert 1 - cosine["w8a8-ort"] < 0.5 * (1 - cosine["w8a8-int"]), cosine
    path = export_onnx(
        quant.quantize_(copy.deepcopy(reference_model), quant.preset("w8a8-ort"), real_images[:4]),
        tmp_path / "ort.onnx",
    )
    assert sum(integer_ops(path).values()) >= 60  # 4 linears + q·kᵀ per block, 12 blocks


def test_quantized_and_token_reduced_export(tmp_path, capfd):
    model = make_tiny_vit(img_size=64, depth=3)
    qmodel = tokens.reduce_tokens_(
        quant.quantize_(copy.deepcopy(model), quant.preset("w8a8-int"), torch.randn(8, 3, 64, 64)),
        tokens.ToMeConfig(r=8),
    )
    path = export_onnx(qmodel, tmp_path / "q_tome.onnx")
    x = torch.randn(3, 3, 64, 64)  # another batch size than the export's
    assert validate_onnx(qmodel, path, x)["cosine"] > 0.99
    assert integer_ops(path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # as a user would run it
    session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert "VerifyOutputSizes" not in capfd.readouterr().err  # no shape warning from ORT on every run


@pytest.mark.parametrize("batch", [1, 3])
def test_quantized_token_reduced_static_batch_export(tmp_path, batch):
    """A fixed-batch export takes exactly that batch (batch 1 included) and loads in ORT."""
    qmodel = tokens.reduce_tokens_(
        quant.quantize_(make_tiny_vit(img_size=64, depth=3), quant.preset("w8a8-ort"), torch.randn(8, 3, 64, 64)),
        tokens.ToMeConfig(r=8),
    )
    path = export_onnx(qmodel, tmp_path / "static.onnx", batch_size=batch, dynamic_batch=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == batch
    assert validate_onnx(qmodel, path, torch.randn(batch, 3, 64, 64))["cosine"] > 0.99


@pytest.mark.parametrize("batch", [0, -2, 2.5, True])
def test_a_batch_size_that_is_no_count_of_images_is_refused(tmp_path, batch):
    with pytest.raises(ConfigError, match=f"batch_size must be a whole number >= 1, got {batch!r}"):
        export_onnx(make_tiny_vit(img_size=64, depth=1), tmp_path / "m.onnx", batch_size=batch, dynamic_batch=False)
    assert not list(tmp_path.iterdir())


def test_ats_export_is_refused_with_a_reason(tmp_path):
    model = tokens.reduce_tokens_(make_tiny_vit(img_size=64), tokens.ATSConfig(budget=0.5, blocks=[1]))
    with pytest.raises(ExportError, match="data-dependent number of tokens"):
        export_onnx(model, tmp_path / "ats.onnx")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_every_preset_said_deployable_runs_each_linear_on_an_integer_kernel(tmp_path):
    """What ``deployment`` promises, checked in ONNX Runtime's own optimized graph: every
    linear of every block of a deployable preset's export is an integer kernel, and the file
    computes what the quantized PyTorch model computes."""
    from vitslim import metrics
    from vitslim.bench import OnnxModel
    from vitslim.quant.config import PRESETS, deployable_presets, deployment

    model, calib, x = make_tiny_vit(), torch.randn(8, 3, 32, 32), torch.randn(4, 3, 32, 32)
    assert {"w8a8-ort", "w8a8-dyn", "w4-ort", "w4a8-ort"} <= set(deployable_presets())
    assert not {"w8a8", "w6a6", "w4a8", "w4a4", "w3a3"} & set(deployable_presets())
    for name in deployable_presets():
        assert deployment(PRESETS[name]).startswith("deployable: ONNX Runtime")
        qmodel = quant.quantize_(copy.deepcopy(model), quant.preset(name), calib)
        path = export_onnx(qmodel, tmp_path / f"{name}.onnx")
        kernels = integer_ops(path)
        linears = kernels.get("MatMulIntegerToFloat", 0) + kernels.get("MatMulNBits", 0) + \
            kernels.get("DynamicQuantizeMatMul", 0)
        assert linears >= 4 * 2, (name, kernels)
        with torch.no_grad():
            assert metrics.min_cosine_similarity(qmodel(x), OnnxModel(path)(x)) > 0.99, name


def test_w8a8_dyn_runs_per_row_int8_in_onnx_runtime_and_outlier_tokens_do_not_coarsen_the_rest(tmp_path):
    """A token with a huge norm (DINOv2 has a few) sets a static per-tensor int8 range and
    coarsens every other token; ranges per row at run time (``w8a8-dyn``) do not. Exported, the
    dynamic model's linears are integer kernels and compute what the PyTorch model computes."""
    from vitslim import metrics
    from vitslim.bench import OnnxModel

    model = make_tiny_vit()
    with torch.no_grad():
        model.pos_embed[0, 3] += 30.0  # one high-norm token
    calib, x = torch.randn(16, 3, 32, 32), torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)
    errors = {}
    for name in ("w8a8-ort", "w8a8-dyn"):
        qmodel = quant.quantize_(copy.deepcopy(model), quant.preset(name), calib)
        path = export_onnx(qmodel, tmp_path / f"{name}.onnx")
        got = OnnxModel(path)(x)
        errors[name] = 1 - metrics.cosine_similarity(reference, got)
        if name == "w8a8-dyn":
            assert integer_ops(path).get("MatMulNBits", 0) == 4 * 2  # every linear: 8-bit weights, int8 compute
            with torch.no_grad():
                assert metrics.min_cosine_similarity(qmodel(x), got) > 0.999
    assert errors["w8a8-dyn"] < errors["w8a8-ort"] / 3, errors
