import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from conftest import make_tiny_vit, tiny_vit_source
from vitslim.compress import Recipe, Target, compress, load_recipe, recipe_from_dict, save_recipe, write_report
from vitslim.compress import search as search_mod
from vitslim.compress.search import speed_tie
from vitslim.dtype import DtypeConfig
from vitslim.errors import ConfigError

GRID = [
    Recipe("fp32"),
    Recipe("bf16", (DtypeConfig("bfloat16"),)),
    Recipe("f32-cast", (DtypeConfig("float32"),)),
]


def _run(images, cache, target="fidelity=0.9", **kw):
    kw.setdefault("sensitivity_preset", None)
    return compress(make_tiny_vit(), images, target, recipes=GRID, n_calib=4, n_eval=8,
                    batch_size=2, iters=2, cache_dir=cache, source=tiny_vit_source(), **kw)


def test_recipe_validation_names_what_is_wrong(tmp_path):
    with pytest.raises(ConfigError, match="unknown step 'prune_all'.*valid steps are"):
        recipe_from_dict({"name": "x", "steps": [{"prune_all": {}}]})
    with pytest.raises(ConfigError, match=r"unknown knob\(s\) \['bits'\].*valid knobs are \['dtype'\]"):
        recipe_from_dict({"name": "x", "steps": [{"dtype": {"bits": 8}}]})
    with pytest.raises(ConfigError, match=r"unknown knob\(s\) \['keep_rate'\].*\['method', 'prop_attn', 'r'\]"):
        recipe_from_dict({"name": "x", "steps": [{"tokens": {"method": "tome", "keep_rate": 0.5}}]})
    with pytest.raises(ConfigError, match="method 'magic' is not one of"):
        recipe_from_dict({"name": "x", "steps": [{"tokens": {"method": "magic"}}]})
    with pytest.raises(ConfigError, match="cannot be quantized after it has been exported"):
        recipe_from_dict({"name": "x", "steps": [{"export": {"format": "onnx"}}, {"quantize": {"preset": "w8a8"}}]})
    with pytest.raises(ConfigError, match="repeats"):
        recipe_from_dict({"name": "x", "steps": [{"dtype": {}}, {"quantize": {"preset": "w8a8"}}]})
    with pytest.raises(ConfigError, match="no built-in recipe or file named 'nope'"):
        load_recipe("nope")
    with pytest.raises(ConfigError, match="speedup=N"):
        Target.parse("faster=3")


def test_recipe_yaml_and_json_round_trip(tmp_path):
    recipe = load_recipe("int8-tome")
    for name in ("r.yaml", "r.json"):
        save_recipe(recipe, tmp_path / name)
        assert load_recipe(tmp_path / name) == recipe
    assert yaml.safe_load((tmp_path / "r.yaml").read_text())["steps"][0] == {"tokens": {"method": "tome", "r": 8}}


def test_repeated_search_is_served_from_cache(tmp_path, example_images, monkeypatch):
    first = _run(example_images, tmp_path / "cache")
    assert all(c.error is None for c in first.candidates)
    monkeypatch.setattr(search_mod, "evaluate_candidate", lambda *a, **k: pytest.fail("re-evaluated"))
    seen = []
    second = _run(example_images, tmp_path / "cache", on_result=lambda r, cached: seen.append(cached))
    assert seen == [True, True, True]
    assert [c.cosine for c in second.candidates] == [c.cosine for c in first.candidates]


def test_resume_after_kill_loses_and_duplicates_nothing(tmp_path, example_images):
    cache = tmp_path / "cache"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r}); sys.path.insert(0, {str(Path(__file__).parents[1])!r})
        from test_compress import _run
        from pathlib import Path
        done = []
        def die_after_two(result, cached):
            done.append(result)
            if len(done) == 2:
                os.kill(os.getpid(), signal.SIGKILL)  # a crash, mid-search
        _run(Path({str(example_images)!r}), Path({str(cache)!r}), on_result=die_after_two)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr
    assert len(list(cache.glob("*.json"))) == 2
    seen = []
    result = _run(example_images, cache, on_result=lambda r, cached: seen.append(cached))
    assert seen == [True, True, False]  # two resumed from cache, one evaluated now
    files = sorted(cache.glob("*.json"))
    assert len(files) == 3 and not list(cache.glob("*.tmp"))
    keys = [json.loads(f.read_text())["key"] for f in files]
    assert len(set(keys)) == 3 and {c.key for c in result.candidates} == set(keys)


def test_infeasible_target_returns_the_closest(tmp_path, example_images):
    result = _run(example_images, tmp_path / "cache", target="speedup=1000")
    assert not result.met
    best = max(result.candidates, key=lambda c: c.speedup)
    assert result.chosen is best and "closest" in result.reason


def test_chosen_recipe_meets_the_target_in_its_own_measurement(tmp_path, example_images):
    result = _run(example_images, tmp_path / "cache", target="fidelity=0.999")
    assert result.met and result.chosen.cosine >= 0.999
    feasible = [c for c in result.candidates if c.cosine >= 0.999]
    fastest = max(feasible, key=lambda c: c.speedup)
    tied = [c for c in feasible if speed_tie(c, fastest)]  # speed intervals overlapping the fastest's
    assert result.chosen is max(tied, key=lambda c: c.cosine)
    assert (len(tied) > 1) == any("speed intervals of" in note for note in result.within_noise)


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("no Chromium on this machine (CI installs Debian's `chromium`; install it to run this test)")


def test_html_report_renders_in_headless_chromium(tmp_path, example_images):
    result = _run(example_images, tmp_path / "cache", sensitivity_preset="w4a4")
    assert all(0 < r["cosine"] < 1 for r in result.sensitivity)  # each block alone changes the output
    cached = _run(example_images, tmp_path / "cache", sensitivity_preset="w4a4")
    assert cached.sensitivity == result.sensitivity and len(list((tmp_path / "cache").glob("sensitivity-*"))) == 1
    html_path, md_path = write_report(result, tmp_path / "report", "tiny random ViT")
    page = html_path.read_text()
    assert "<svg" in page and "<table>" in page and "fp32" in page
    assert [r["block"] for r in result.sensitivity] == [0, 1] and "Per-block sensitivity" in page
    assert "| recipe |" in md_path.read_text()
    shot = tmp_path / "shot.png"
    subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1100,1400",
                    f"--screenshot={shot}", html_path.as_uri()],
                   capture_output=True, timeout=120, check=True)
    from PIL import Image

    image = Image.open(shot).convert("L")
    assert image.size == (1100, 1400)
    # A rendered page has text, a chart and a table: far from a blank (single-colour) screen.
    assert len(set(image.getdata())) > 20


def test_cache_key_changes_when_a_preset_changes(monkeypatch):
    from dataclasses import replace

    from vitslim.compress.search import candidate_key
    from vitslim.quant import config
    from vitslim.recipes import recipe_from_dict

    recipe = recipe_from_dict({"name": "q", "steps": [{"quantize": {"preset": "w8a8-ort"}}]})
    before = candidate_key("m", "d", recipe, {})
    assert candidate_key("m", "d", recipe, {}) == before
    monkeypatch.setitem(config.PRESETS, "w8a8-ort", replace(config.PRESETS["w8a8-ort"], weight_method="rtn"))
    assert candidate_key("m", "d", recipe, {}) != before
