"""OpenVINO as a deploy runtime: real OpenVINO on small random ViTs (skipped without the extra)."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from conftest import make_tiny_vit, tiny_vit_source
from vitslim import metrics
from vitslim.bench import compare
from vitslim.compress import Recipe
from vitslim.data import calibration_images, load_image_folder
from vitslim.deploy import build_artifact, load_artifact, predict_folder, read_contract
from vitslim.errors import ConfigError
from vitslim.export import ExportConfig
from vitslim.quant import preset
from vitslim.recipes import apply_recipe
from vitslim.tokens import ToMeConfig

pytest.importorskip("openvino", reason="the openvino extra is not installed")

TINY = dict(img_size=48, patch_size=8)
OV_F32, OV_BF16 = ExportConfig(runtime="openvino", precision="f32"), ExportConfig(runtime="openvino", precision="bf16")


def _images(folder, model, limit):
    return calibration_images(load_image_folder(folder, model, limit=limit))


def _reference(model, recipe, calib, images):
    expected = apply_recipe(model, recipe, calib)
    with torch.inference_mode():
        return expected(images).float()


@pytest.mark.parametrize(("steps", "max_rel_err"), [
    ((OV_F32,), 1e-5),  # float graph at f32: OpenVINO computes what PyTorch does
    ((ToMeConfig(r=4), preset("w8a8-ort"), OV_F32), 2e-2),  # int8 kernels: rounding differs at the edges
    ((ToMeConfig(r=4), preset("w8a8-ort"), OV_BF16), 6e-2),  # float parts in bfloat16 as well
], ids=["fp32-f32", "tome+w8a8-f32", "tome+w8a8-bf16"])
def test_openvino_artifact_runs_what_pytorch_computes(tmp_path, example_images, steps, max_rel_err):
    model, recipe = make_tiny_vit(**TINY), Recipe("r", steps)
    images = _images(example_images, model, limit=8)
    path = build_artifact(model, recipe, images[:4], tmp_path / "model.onnx", tiny_vit_source(**TINY))
    artifact = load_artifact(path)
    assert artifact.runtime == f"openvino-{steps[-1].precision}"
    want, got = _reference(model, recipe, images[:4], images), artifact(images)
    assert (got - want).abs().max().item() < max_rel_err * want.abs().max().item()
    assert metrics.cosine_similarity(want, got) > 1 - max_rel_err
    # portable: standard ONNX ops only (no ONNX Runtime contrib kernels), which OpenVINO reads
    assert {n.domain for n in onnx.load(str(path)).graph.node} <= {"", "ai.onnx"}
    # predict feeds it as its contract says, through the same OpenVINO model
    preds = predict_folder(path, example_images, top_k=2, limit=8)
    assert torch.allclose(preds.outputs, got, atol=1e-5)


def test_the_precision_hint_changes_what_is_computed(tmp_path, example_images):
    """bf16 and f32 are two models, not one: the hint is recorded and measured, not implied."""
    model = make_tiny_vit(**TINY)
    images = _images(example_images, model, limit=8)
    outs = {}
    for step in (OV_F32, OV_BF16):
        path = build_artifact(model, Recipe("r", (step,)), images[:0], tmp_path / f"{step.precision}.onnx",
                              tiny_vit_source(**TINY))
        assert read_contract(path).recipe["steps"] == [{"export": {"format": "onnx", "runtime": "openvino",
                                                                   "precision": step.precision}}]
        outs[step.precision] = load_artifact(path)(images)
    with torch.inference_mode():
        want = model(images)
    err = {p: (o - want).abs().max().item() for p, o in outs.items()}
    assert err["f32"] < 1e-4 < err["bf16"]


def test_each_input_shape_gets_its_own_fixed_shape_model_and_the_same_outputs(tmp_path):
    from vitslim import openvino_runtime
    from vitslim.openvino_runtime import OpenVinoModel

    model = make_tiny_vit(**TINY)
    path = build_artifact(model, Recipe("r", (OV_F32,)), torch.empty(0), tmp_path / "m.onnx", tiny_vit_source(**TINY))
    ov_model = OpenVinoModel(path, "f32")
    images = torch.randn(openvino_runtime.MAX_SHAPES + 1, 3, 48, 48)
    one_by_one = torch.cat([ov_model(images[i : i + 1]) for i in range(len(images))])
    torch.testing.assert_close(ov_model(images[:3]), one_by_one[:3], atol=1e-5, rtol=1e-5)
    compiled = {shape: request.get_compiled_model() for shape, request in ov_model._requests.items()}
    assert set(compiled) == {(1, 3, 48, 48), (3, 3, 48, 48)}
    assert all(c.inputs[0].get_partial_shape().is_static for c in compiled.values())
    for n in range(2, len(images) + 1):  # more shapes than are kept: the oldest make room
        ov_model(images[:n])
    assert len(ov_model._requests) == openvino_runtime.MAX_SHAPES
    assert (len(images), 3, 48, 48) in ov_model._requests and (1, 3, 48, 48) not in ov_model._requests


def test_openvino_model_times_beside_pytorch_in_one_interleaved_run(tmp_path, example_images):
    model = make_tiny_vit(**TINY)
    path = build_artifact(model, Recipe("r", (OV_F32,)), torch.empty(0), tmp_path / "m.onnx", tiny_vit_source(**TINY))
    results = compare({"fp32": model, "ov": load_artifact(path).model}, batch_size=2, warmup=1, iters=2, flops=False)
    assert [r.runtime for r in results] == ["pytorch", "openvino-f32"]
    assert results[1].rounds == 2 and results[1].size_mb == pytest.approx(path.stat().st_size / 1e6)


def test_vitslim_export_runtime_openvino(tmp_path, example_images):
    import vitslim
    from vitslim.cli import app
    from vitslim.quant import quantize_

    model = make_tiny_vit(**TINY)
    qmodel = quantize_(copy.deepcopy(model), preset("w8a8-ort"), _images(example_images, model, limit=8))
    vitslim.save(qmodel, tmp_path / "q", tiny_vit_source(**TINY))
    out = tmp_path / "q.onnx"
    res = CliRunner().invoke(app, ["export", str(tmp_path / "q"), "--out", str(out), "--runtime", "openvino",
                                   "--precision", "f32", "--verify", str(example_images)])
    assert res.exit_code == 0, res.output
    contract = read_contract(out)
    assert contract.recipe["steps"][-1] == {"export": {"format": "onnx", "runtime": "openvino", "precision": "f32"}}
    assert contract.fidelity["cosine"] > 0.99 and "openvino-f32 vs PyTorch" in res.output
    assert load_artifact(out).runtime == "openvino-f32"
    res = CliRunner().invoke(app, ["export", str(tmp_path / "q"), "--out", str(tmp_path / "x.onnx"),
                                   "--precision", "bf16"])
    assert isinstance(res.exception, ConfigError) and "--runtime openvino" in str(res.exception)
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize(("knobs", "message"), [
    ({"runtime": "openvino"}, "needs precision bf16 or f32"),
    ({"runtime": "openvino", "precision": "fp16"}, "needs precision"),
    ({"precision": "bf16"}, "takes none"),
    ({"runtime": "tensorrt"}, "is not one of"),
])
def test_export_step_knobs_are_checked(knobs, message):
    with pytest.raises(ConfigError, match=message):
        ExportConfig(**knobs)


def test_without_openvino_nothing_imports_it_and_an_openvino_artifact_says_how_to_get_it(tmp_path, example_images):
    model = make_tiny_vit(**TINY)
    for name, step in (("ort.onnx", ExportConfig()), ("ov.onnx", OV_F32)):
        build_artifact(model, Recipe("r", (step,)), torch.empty(0), tmp_path / name, tiny_vit_source(**TINY))
    code = ("import sys; sys.modules['openvino'] = None\n"
            "from vitslim.cli import app\nfrom vitslim.deploy import load_artifact\n"
            f"load_artifact({str(tmp_path / 'ort.onnx')!r})\n"
            "assert not any(m.startswith('openvino') and sys.modules[m] for m in sys.modules)\n"
            f"load_artifact({str(tmp_path / 'ov.onnx')!r})\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 1 and "OpenVINO is not installed" in res.stderr and "vitslim[openvino]" in res.stderr


def test_report_snippet_runs_the_artifact_in_openvino_without_vitslim(tmp_path, example_images):
    from vitslim.deploy import usage_markdown

    model = make_tiny_vit(**TINY)
    path = build_artifact(model, Recipe("r", (OV_BF16,)), torch.empty(0), tmp_path / "m.onnx", tiny_vit_source(**TINY))
    markdown = usage_markdown(path, next(example_images.iterdir()), read_contract(path), example_images)
    assert "OpenVINO, precision hint bf16" in markdown
    code = markdown.split("```python\n")[1].split("```")[0]
    check = ("\nimport sys\nassert 'vitslim' not in sys.modules and 'torch' not in sys.modules\n"
             f"np.save({str(tmp_path / 'out.npy')!r}, output)\n")
    image = code.split("IMAGE = '")[1].split("'")[0]  # names beside the report, no local path
    shutil.copy(example_images / image, tmp_path / image)
    proc = subprocess.run([sys.executable, "-c", code + check], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    preds = predict_folder(path, example_images)
    row = [f.name for f in preds.files].index(image)
    assert np.allclose(np.load(tmp_path / "out.npy"), preds.outputs[row].numpy(), atol=1e-4)


def test_eval_and_bench_run_an_onnx_file_in_the_runtime_its_contract_names(tmp_path, example_images):
    from vitslim.bench import OnnxModel
    from vitslim.openvino_runtime import OpenVinoModel
    from vitslim.workflows import evaluate_on_folder, load_any

    model = make_tiny_vit(**TINY)
    path = build_artifact(model, Recipe("r", (OV_F32,)), torch.empty(0), tmp_path / "m.onnx", tiny_vit_source(**TINY))
    chosen = {spec: load_any(spec) for spec in (str(path), f"{path}@onnxruntime", f"{path}@openvino-bf16")}
    assert [type(m) for m in chosen.values()] == [OpenVinoModel, OnnxModel, OpenVinoModel]
    assert [getattr(m, "runtime", "onnxruntime") for m in chosen.values()] == [
        "openvino-f32", "onnxruntime", "openvino-bf16"]
    result = evaluate_on_folder(str(path), example_images, reference=f"{path}@onnxruntime", limit=8)
    assert result.images == 8 and result.cosine > 0.99999  # the same graph in two runtimes, both at f32
    with pytest.raises(ConfigError, match="@openvino-f32"):
        load_any(f"{path}@openvino-fp16")


def test_compress_times_each_exported_recipe_in_every_runtime_and_names_the_chosen_one(tmp_path, example_images):
    from vitslim.compress import compress

    model = make_tiny_vit(**TINY)
    recipe = Recipe("int8-tome", (ToMeConfig(r=4), preset("w8a8-ort"), ExportConfig()))
    result = compress(model, example_images, "fidelity=0.9", recipes=[recipe], runtimes=(ExportConfig(), OV_F32),
                      n_calib=8, n_eval=8, batch_size=2, iters=2, cache_dir=tmp_path / "cache",
                      sensitivity_preset=None, out=tmp_path / "out", save_all=True, source=tiny_vit_source(**TINY))
    assert [(c.name, c.runtime) for c in result.candidates] == [
        ("int8-tome", "onnxruntime"), ("int8-tome@openvino-f32", "openvino-f32")]
    assert all(c.error is None and c.cosine > 0.9 for c in result.candidates)
    assert result.artifact == result.artifacts[result.chosen.name]
    assert load_artifact(result.artifact).runtime == result.chosen.runtime  # the chosen artifact names its runtime
    # the twin was exported from the model its ONNX Runtime sibling was built from: it computes
    # what a build of its own (same calibration images) computes
    from vitslim.deploy.workflow import calibration_batch, split_images

    _, calib_set, _ = split_images(model, example_images, 8, 8, 0)
    alone = build_artifact(model, recipe.in_runtime(OV_F32), calibration_batch(calib_set), tmp_path / "alone.onnx",
                           tiny_vit_source(**TINY))
    images = _images(example_images, model, limit=8)
    twin = load_artifact(result.artifacts["int8-tome@openvino-f32"])
    assert torch.allclose(twin(images), load_artifact(alone)(images), atol=1e-5)


def test_the_default_grid_gets_an_openvino_twin_of_each_onnx_runtime_recipe_at_the_cpus_precision():
    from vitslim.bench import CpuFeatures
    from vitslim.compress import load_recipe
    from vitslim.compress.search import default_runtimes, in_every_runtime

    amx = CpuFeatures.from_flags("avx2 avx512f avx512_vnni avx512_bf16 amx_tile amx_int8 amx_bf16")
    avx2 = CpuFeatures.from_flags("avx2")
    assert default_runtimes(amx) == (ExportConfig(), OV_BF16) and default_runtimes(avx2) == (ExportConfig(), OV_F32)
    grid = [load_recipe(n) for n in ("fp32", "int8-tome-13", "tome-13", "ort-fp32")]
    twins = in_every_runtime(grid, default_runtimes(amx))
    assert [r.name for r in twins] == ["fp32", "int8-tome-13", "int8-tome-13@openvino-bf16", "tome-13",
                                       "tome-13@openvino-bf16", "ort-fp32", "ort-fp32@openvino-bf16"]
    assert twins[2].steps[:-1] == grid[1].steps[:-1] and twins[2].steps[-1] == OV_BF16
    assert twins[4].steps == (*grid[2].steps, OV_BF16)  # token merging alone: exported for OpenVINO
    assert in_every_runtime([load_recipe("bf16-tome")], default_runtimes(amx)) == [load_recipe("bf16-tome")]
    assert in_every_runtime([twins[2]], default_runtimes(amx)) == [twins[2]]  # a twin gets no twin of its own


def test_the_profile_says_where_openvino_spends_a_batch(tmp_path, example_images):
    from vitslim.openvino_runtime import OpenVinoModel

    model = make_tiny_vit(**TINY)
    path = build_artifact(model, Recipe("r", (OV_F32,)), torch.empty(0), tmp_path / "m.onnx", tiny_vit_source(**TINY))
    profile = OpenVinoModel(path, "f32").profile_ms(torch.randn(2, 3, 48, 48), runs=2)
    assert any(k.startswith("FullyConnected") for k in profile) and all(v > 0 for v in profile.values())
    assert list(profile.values()) == sorted(profile.values(), reverse=True)
