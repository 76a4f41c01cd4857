"""One saved-model format: every kind of result saves and loads back, and whatever else is
found where an artifact should be is refused with one line, before anything is built."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
from typer.testing import CliRunner

import vitslim
from conftest import TINY_VIT_ARGS, make_tiny_vit
from vitslim import prune, quant
from vitslim.artifact import ModelSource, read_contract, save
from vitslim.artifact.store import CHECKSUM_KEY, _checksum, _contract_checksum
from vitslim.cli import app
from vitslim.deploy import apply, predict_folder
from vitslim.errors import ModelLoadError, OutputPathError
from vitslim.recipes import Recipe

TINY = ModelSource("vit_tiny_patch16_224", timm_kwargs=TINY_VIT_ARGS)


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vitslim", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def _one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    """Exit code 2 and the run's last line is its one error line (warnings may come before)."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for word in words:
        assert word in errors[0], proc.stderr


def _strict(text: str) -> dict:
    """JSON as strict readers (and `vitslim predict`) parse it: NaN/Infinity are not numbers."""
    return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} written into strict JSON"))


def _rewrite(folder: Path, edit, recompute: bool = True) -> None:
    """Edit a saved folder's vitslim.json; ``recompute`` its checksum as an adversary would."""
    meta = json.loads((folder / "vitslim.json").read_text())
    edit(meta)
    body = {k: v for k, v in meta.items() if k != "checksum"}
    meta["checksum"] = _checksum(body) if recompute else meta["checksum"]
    (folder / "vitslim.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return save(make_tiny_vit(), tmp_path_factory.mktemp("saved") / "m", TINY)


def _copy(folder: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(folder, tmp_path / "copy"))


def test_fp32_apply_writes_strict_json_and_predict_runs_it(tmp_path, example_images):
    """An FP32 copy has infinite SQNR: written as "inf", read back as infinity, never a bare
    Infinity token that strict JSON readers refuse."""
    model = make_tiny_vit()
    artifact, figures = apply(model, "fp32", example_images, tmp_path / "m", TINY, n_calib=4, n_eval=4)
    assert figures["sqnr_db"] == float("inf")
    meta = _strict((tmp_path / "m" / "vitslim.json").read_text())
    assert meta["contract"]["fidelity"]["sqnr_db"] == "inf"
    preds = predict_folder(tmp_path / "m", example_images, limit=3)
    with torch.no_grad():
        assert torch.allclose(preds.outputs, model(torch.stack([artifact.contract.transform()(
            __import__("PIL").Image.open(f).convert("RGB")) for f in preds.files])), atol=1e-5)


def test_every_kind_of_result_round_trips(tmp_path):
    """Plain, quantized, pruned, token-reduced + bf16: the loaded model computes exactly what
    was saved; the ONNX file of a pruned model runs what PyTorch ran."""
    from vitslim.dtype import DtypeConfig
    from vitslim.recipes import apply_recipe
    from vitslim.tokens import ToMeConfig

    model, x = make_tiny_vit(), torch.randn(3, 3, 32, 32)
    quantized = quant.quantize_(copy.deepcopy(model), quant.preset("w8a8"), torch.randn(8, 3, 32, 32))
    pruned = prune.prune_(copy.deepcopy(model), prune.PruneConfig(macs=0.7), torch.randn(16, 3, 32, 32))
    recipe = Recipe("tome-bf16", (ToMeConfig(r=2), DtypeConfig("bfloat16")))
    reduced = apply_recipe(model, recipe, x)
    cases = {"plain": (model, None), "quantized": (quantized, None), "pruned": (pruned, None),
             "tome-bf16": (reduced, recipe)}
    with torch.no_grad():
        for name, (m, r) in cases.items():
            loaded = vitslim.load(save(m, tmp_path / name, TINY, r))
            assert torch.equal(loaded(x), m(x.to(next(m.parameters()).dtype)).float()), name
        onnx_file = vitslim.load(save(pruned, tmp_path / "pruned.onnx", TINY))
        assert (onnx_file(x) - pruned(x)).abs().max() < 1e-4
    assert onnx_file.contract.output == {"kind": "logits", "classes": 10, "class_names": "the model's own class order"}


def test_pruned_and_4bit_folders_export_after_save_and_load(tmp_path):
    """`vitslim export pruned/ --out p.onnx` works, and 4-bit weights (group scales, codes)
    survive save -> load -> export: ONNX Runtime computes what the saved model computes."""
    model, x = make_tiny_vit(), torch.randn(4, 3, 32, 32)
    pruned = prune.prune_(copy.deepcopy(model), prune.PruneConfig(macs=0.7), torch.randn(16, 3, 32, 32))
    w4 = quant.quantize_(copy.deepcopy(model), quant.preset("w4-ort"), torch.randn(16, 3, 32, 32))
    for name, m in (("pruned", pruned), ("w4", w4)):
        save(m, tmp_path / name, TINY)
        proc = _cli("export", tmp_path / name, "--out", tmp_path / f"{name}.onnx")
        assert proc.returncode == 0, proc.stderr[-2000:]
        exported = vitslim.load(tmp_path / f"{name}.onnx")
        with torch.no_grad():
            reference = vitslim.load(tmp_path / name).model(x)
            assert torch.equal(reference, m(x)), name
            assert (exported(x) - reference).abs().max() < 0.05 * reference.abs().max(), name
        steps = [next(iter(s)) for s in exported.contract.recipe["steps"]]
        assert steps == (["prune", "export"] if name == "pruned" else ["quantize", "export"])


@pytest.mark.parametrize("kwargs, words", [
    ({"checkpoint_path": "weights.pth"}, "checkpoint_path"),
    ({"img_size": "/etc/passwd"}, "a path is not a constructor keyword"),
    ({"pretrained": True}, "pretrained"),
    ({"depth": 100_000}, "expected a number in 0..256"),
], ids=["checkpoint", "passwd", "pretrained", "depth"])
def test_architecture_arguments_are_bounded_before_anything_is_built(tiny_folder, tmp_path, kwargs, words):
    folder = _copy(tiny_folder, tmp_path)
    _rewrite(folder, lambda m: m["contract"]["source"]["timm_kwargs"].update(kwargs))
    with pytest.raises(ModelLoadError, match="cannot be used") as err:
        vitslim.load(folder)
    assert words in str(err.value)


def test_edits_that_change_behaviour_are_refused(tiny_folder, tmp_path):
    """A ToMe step added to the recipe, or another class count: refused by the checksum; and
    with the checksum recomputed, a class count the head does not have is still refused."""
    folder = _copy(tiny_folder, tmp_path)
    _rewrite(folder, lambda m: m["contract"]["recipe"]["steps"].append({"tokens": {"method": "tome", "r": 4}}),
             recompute=False)
    with pytest.raises(ModelLoadError, match="changed after it was saved"):
        vitslim.load(folder)
    folder = _copy(tiny_folder, tmp_path / "b")
    _rewrite(folder, lambda m: m["contract"]["output"].update(classes=1000))
    with pytest.raises(ModelLoadError, match="the contract says the output is 1000 class logits, but the model gives "
                                             "10 class logits"):
        vitslim.load(folder)
    folder = _copy(tiny_folder, tmp_path / "c")
    _rewrite(folder, lambda m: m["contract"]["recipe"]["steps"].append({"prune": {}}))
    with pytest.raises(ModelLoadError, match=r"missing knob\(s\) \[.macs.\]"):
        vitslim.load(folder)


def test_onnx_contract_edits_are_refused(tmp_path):
    """"features, dim 7" on a graph with 10 outputs, or a `prune: {}` recipe: one error each."""
    path = save(make_tiny_vit(), tmp_path / "m.onnx", TINY)

    def edit(field: str, value, recompute: bool = True) -> Path:
        graph = onnx.load(str(path))
        props = {p.key: p.value for p in graph.metadata_props} | {f"vitslim.{field}": json.dumps(value)}
        if recompute:
            props[CHECKSUM_KEY] = json.dumps(_contract_checksum(props))
        del graph.metadata_props[:]
        onnx.helper.set_model_props(graph, props)
        out = tmp_path / f"{field}-{recompute}.onnx"
        onnx.save(graph, str(out))
        return out

    with pytest.raises(ModelLoadError, match="changed after it was saved"):
        vitslim.load(edit("output", {"kind": "features", "dim": 7}, recompute=False))
    with pytest.raises(ModelLoadError, match="features of dim 7, but the graph gives 10 values"):
        vitslim.load(edit("output", {"kind": "features", "dim": 7}))
    bad_recipe = edit("recipe", {"name": "x", "steps": [{"prune": {}}, {"export": {}}]})
    with pytest.raises(ModelLoadError, match="unusable vitslim contract"):
        vitslim.load(bad_recipe)
    _one_line_error(_cli("predict", bad_recipe, "--data", tmp_path), "unusable vitslim contract")


@pytest.mark.parametrize("text", ["{garbage", "", "[]"], ids=["garbage", "empty", "list"])
def test_old_or_garbage_model_folders_give_one_line(tmp_path, text):
    folder = tmp_path / "q"
    folder.mkdir()
    (folder / "quant.json").write_text(text)
    (folder / "model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match="saved by `vitslim quantize` of vitslim 0.1"):
        vitslim.load(folder)
    if text == "{garbage":
        _one_line_error(_cli("export", folder, "--out", tmp_path / "q.onnx"), "format 1")
        (folder / "quant.json").rename(folder / "prune.json")
        _one_line_error(_cli("eval", folder, "--data", tmp_path), "vitslim prune")


def test_garbage_vitslim_json_and_foreign_weights_are_one_error(tiny_folder, tmp_path):
    folder = _copy(tiny_folder, tmp_path)
    for text in ("{garbage", "", "null", json.dumps({"format": 2})):
        (folder / "vitslim.json").write_text(text)
        with pytest.raises(ModelLoadError, match="cannot be used"):
            vitslim.load(folder)
    other = save(make_tiny_vit(num_classes=5), tmp_path / "other", ModelSource(
        "vit_tiny_patch16_224", timm_kwargs={**TINY_VIT_ARGS, "num_classes": 5}))
    folder = _copy(tiny_folder, tmp_path / "b")
    (other / "model.safetensors").replace(folder / "model.safetensors")
    with pytest.raises(ModelLoadError, match="not the weights file vitslim.json was saved with"):
        vitslim.load(folder)


def test_artifacts_name_no_local_path_and_hf_sources_load_from_anywhere(tmp_path, example_images):
    """A relative hf: folder: the artifact carries the architecture's config, so it loads from
    another directory after the Hugging Face folder is gone; no absolute path in the file."""
    transformers = pytest.importorskip("transformers", reason="needs the `hf` extra")
    hf_model = transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=56,
        patch_size=14, layerscale_value=0.5, layer_norm_eps=1e-6)).eval()
    work = tmp_path / "work"
    hf_model.save_pretrained(work / "some" / "folder")
    os.chdir(work)
    try:
        model = vitslim.load_model("hf:some/folder")
        apply(model, "fp32", example_images, work / "out", ModelSource("hf:some/folder"), n_calib=2, n_eval=2)
        checkpointed = save(make_tiny_vit(), work / "ckpt", ModelSource(
            "vit_tiny_patch16_224", str(work / "deit.pth"), TINY_VIT_ARGS))
    finally:
        os.chdir(Path(__file__).parent)
    import shutil

    shutil.rmtree(work / "some")
    elsewhere = tmp_path / "elsewhere"
    shutil.move(work / "out", elsewhere)
    for folder in (elsewhere, checkpointed):
        assert str(tmp_path) not in (folder / "vitslim.json").read_text()
    contract = read_contract(elsewhere)
    assert contract.source["name"] == "hf:folder" and contract.calibration["data"] == example_images.name
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(vitslim.load(elsewhere)(x), model(x))


def test_hf_folder_faults_are_one_line(tmp_path):
    transformers = pytest.importorskip("transformers", reason="needs the `hf` extra")
    folder = tmp_path / "hf"
    transformers.ViTModel(transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                 intermediate_size=128, image_size=32, patch_size=8)
                          ).save_pretrained(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    with pytest.raises(ModelLoadError, match="could not load Hugging Face folder"):
        vitslim.load_model(f"hf:{folder}")
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage" + b"\0" * 64)  # corrupt header
    with pytest.raises(ModelLoadError, match="could not load Hugging Face folder"):
        vitslim.load_model(f"hf:{folder}")
    with pytest.raises(ModelLoadError, match="is a file; give the folder that holds config.json"):
        vitslim.load_model(f"hf:{folder / 'config.json'}")
    weights.unlink()
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")  # not the model's weights
    with pytest.raises(ModelLoadError, match="weights lack .* of the model's tensors"):
        vitslim.load_model(f"hf:{folder}")


def test_save_reads_what_the_model_went_through_also_after_a_load(tmp_path):
    """Without a recipe, ``save`` records the model's own steps (pruning, quantization); a
    pruned folder loaded back, then quantized, saves and loads again as that."""
    pruned = prune.prune_(make_tiny_vit(), prune.PruneConfig(macs=0.7), torch.randn(16, 3, 32, 32))
    reloaded = vitslim.load(save(pruned, tmp_path / "p", TINY)).model
    q = quant.quantize_(reloaded, quant.preset("w8a8"), torch.randn(8, 3, 32, 32))
    again = vitslim.load(save(q, tmp_path / "pq", TINY))
    assert [next(iter(s)) for s in again.contract.recipe["steps"]] == ["prune", "quantize"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(x), q(x))


# ---------------------------------------------------------------- --out never destroys the user's files


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random vit_tiny_patch16_224 (224 px, 5.7 M parameters) for the real command line."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_file(timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict(), str(path))
    return path


def _users_folder(root: Path) -> dict[Path, bytes]:
    """A folder of the user's, with what a careless --out would replace."""
    files = {root / "model.onnx": b"the user's own model", root / "report.html": b"<p>mine</p>",
             root / "model" / "weights.bin": b"\x01\x02", root / "result.json": b"{}"}
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def test_out_holding_the_users_files_is_refused_before_any_work(tmp_path, example_images):
    files = _users_folder(tmp_path / "mine")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "mine")  # a real symlink to the user's folder
    for out in (tmp_path / "mine", link):
        _one_line_error(_cli("compress", "no-such-model", "--data", example_images, "--out", out),
                        "vitslim did not write there", "--force")
    data = ("--data", example_images)
    for args, words in ((("apply", "fp32", "no-such-model", *data, "--out", tmp_path / "mine"),
                         "not written by vitslim"),
                        (("apply", "ort-fp32", "no-such-model", *data, "--out", tmp_path / "mine" / "model.onnx"),
                         "not written by vitslim"),
                        (("prune", "no-such-model", *data, "--macs", "0.7", "--out",
                          tmp_path / "mine" / "report.html"),
                         "exists and is not a folder"),
                        (("quantize", "no-such-model", *data, "--out", tmp_path / "mine"), "not written by vitslim"),
                        (("export", "no-such-model", "--out", tmp_path / "mine" / "model.onnx"),
                         "not written by vitslim")):
        result = CliRunner().invoke(app, list(map(str, args)))
        assert isinstance(result.exception, OutputPathError) and words in str(result.exception), result.output
    assert all(path.read_bytes() == data for path, data in files.items())


def test_compress_into_a_marked_folder_keeps_a_users_model_folder(tmp_path, example_images):
    """Inside a results folder of vitslim's, a `model/` folder that is not an artifact (or a
    symlink to the user's folder) is not replaced."""
    from vitslim.artifact.outputs import MARKER
    from vitslim.compress import compress

    out = tmp_path / "out"
    files = _users_folder(tmp_path / "mine")
    out.mkdir()
    (out / MARKER).touch()
    (out / "model").symlink_to(tmp_path / "mine" / "model")
    with pytest.raises(OutputPathError, match="was not written by vitslim"):
        compress(make_tiny_vit(), example_images, "speedup=0.001", recipes=["fp32"], n_calib=2, n_eval=2,
                 batch_size=2, iters=1, cache_dir=tmp_path / "cache", sensitivity_preset=None, out=out, source=TINY)
    assert all(path.read_bytes() == data for path, data in files.items())
    assert not list(out.glob(".vitslim-staging*"))


def test_two_runs_into_one_out_end_with_one_in_use_error(tmp_path, example_images, tiny_checkpoint):
    """Two real processes: the second stops at once with one line; the first completes."""
    import time

    out = tmp_path / "out"
    args = ("compress", "vit_tiny_patch16_224", "-c", tiny_checkpoint, "--data", example_images, "--recipe",
            "fp32", "--recipe", "tome-8", "--calib-images", "2", "--eval-images", "2", "--batch-size", "1",
            "--cache", tmp_path / "c", "--out", out, "--quiet")
    first = subprocess.Popen([sys.executable, "-m", "vitslim", *map(str, args)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / ".vitslim-output").exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, first.communicate()
    _one_line_error(_cli(*args), "is in use by another vitslim run")
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert (out / "model" / "vitslim.json").is_file() and (out / "report.html").is_file()


# ---------------------------------------------------------------- faults are not cached


def test_a_full_disk_fails_the_run_in_one_line_and_caches_nothing(tmp_path, example_images, tiny_checkpoint):
    """`ulimit -f` (a real EFBIG): compress and quantize stop with one line; the cache holds no
    failed result, and a rerun with room completes and renders its report."""
    common = ("--data", example_images, "--calib-images", "2", "--eval-images", "2")
    compress_args = ("compress", "vit_tiny_patch16_224", "-c", tiny_checkpoint, *common, "--recipe", "fp32",
                     "--recipe", "ort-fp32", "--batch-size", "1", "--cache", tmp_path / "cache", "--out",
                     tmp_path / "out", "--quiet")
    quantize_args = ("quantize", "vit_tiny_patch16_224", "-c", tiny_checkpoint, *common, "--preset", "minmax-w8a8",
                     "--out", tmp_path / "q")
    for args in (compress_args, quantize_args):
        command = " ".join(f"'{a}'" for a in (sys.executable, "-m", "vitslim", *map(str, args)))
        proc = subprocess.run(["bash", "-c", f"ulimit -f 2000 && exec {command}"], capture_output=True, text=True,
                              timeout=300)
        _one_line_error(proc, "File too large")
    cached = [json.loads(p.read_text()) for p in (tmp_path / "cache").glob("*.json")]
    assert all(c.get("error") is None for c in cached if isinstance(c, dict))
    proc = _cli(*compress_args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "out" / "report.html").is_file()
    assert _strict((tmp_path / "out" / "result.json").read_text())["chosen"]["error"] is None


def test_the_report_renders_when_every_candidate_failed(tmp_path):
    from vitslim.compress import write_report
    from vitslim.compress.search import CandidateResult, SearchResult, Target

    failed = [CandidateResult(recipe={"name": n, "steps": []}, key=n, error="ExportError: no") for n in ("a", "b")]
    result = SearchResult(Target("speedup", 2.0), None, False, "every candidate failed", failed)
    html_path, _ = write_report(result, tmp_path, "tiny")
    assert "ExportError: no" in html_path.read_text() and "No candidate has figures" in html_path.read_text()
