"""vitslim sweep: models × recipes in one table, resumable from the cache; bad files named."""

import csv
import json

import pytest
import timm
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from vitslim.cli import app
from vitslim.errors import ConfigError
from vitslim.sweep import load_sweep

MODELS = ("vit_tiny_patch16_224", "deit_tiny_patch16_224")


def _sweep_file(folder, images):
    for i, name in enumerate(MODELS):
        torch.manual_seed(i)
        save_file(timm.create_model(name, pretrained=False).state_dict(), folder / f"{name}.safetensors")
    models = "".join(f"\n  - {{name: {n}, checkpoint: {n}.safetensors}}" for n in MODELS)
    path = folder / "sweep.yaml"
    path.write_text(f"models:{models}\nrecipes: [fp32, {{name: half, steps: [{{dtype: {{dtype: bfloat16}}}}]}}]\n"
                    f"data: {images}\ntarget: fidelity=0.9\ncalib_images: 2\neval_images: 4\nbatch_size: 2\n")
    return path


def test_sweep_writes_one_table_and_a_rerun_is_all_cached(tmp_path, example_images):
    path = _sweep_file(tmp_path, example_images)
    args = ["sweep", str(path), "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    rows = list(csv.DictReader((tmp_path / "out" / "sweep.csv").open()))
    assert [(r["model"], r["name"]) for r in rows] == [(m, n) for m in MODELS for n in ("fp32", "half")]
    assert all(r["error"] == "" and 0.9 < float(r["cosine"]) <= 1 for r in rows)
    assert [r["chosen"] for r in rows].count("True") == 2  # one choice per model
    assert [(r["model"], r["name"]) for r in json.loads((tmp_path / "out" / "sweep.json").read_text())["rows"]] == [
        (r["model"], r["name"]) for r in rows]
    assert all(m in (tmp_path / "out" / "sweep.html").read_text() for m in MODELS)
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and again.output.count("(cached)") == 4, again.output


def test_bad_sweep_files_name_what_is_wrong(tmp_path, example_images):
    path = tmp_path / "s.yaml"
    for text, message in [("models: [a]\nrecipes: [fp32]\ndata: x\nepochs: 3\n", r"unknown key\(s\) \['epochs'\]"),
                          ("models: []\nrecipes: [fp32]\ndata: x\n", "models missing or empty"),
                          ("models: [a]\nrecipes: [nope]\ndata: x\n", "no built-in recipe or file named 'nope'"),
                          ("models: [a]\nrecipes: [fp32]\ndata: x\ntarget: faster\n", "not understood"),
                          ("models: [{name: a, weights: w}]\nrecipes: [fp32]\ndata: x\n", "a model is a name")]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_sweep(path)
