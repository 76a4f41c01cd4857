"""Commands vitslim prints (the report, "run it: ...") run as printed, and the report's HTML
renders their Markdown."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from vitslim.compress.report import _markdown_to_html
from vitslim.output import markdown_code, markdown_text, vitslim_command

ROOT = Path(__file__).resolve().parents[1]


def _run_as_printed(line: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(line, shell=True, capture_output=True, text=True, env=env, cwd=ROOT)


def test_outside_uv_run_without_vitslim_on_path_the_script_is_named_by_its_path(monkeypatch, tmp_path):
    monkeypatch.delenv("UV_RUN_RECURSION_DEPTH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on it
    line = vitslim_command("--help")
    assert line.endswith("/vitslim --help") and Path(line.split()[0]).is_absolute()
    proc = _run_as_printed(line, dict(os.environ))
    assert proc.returncode == 0 and "Usage: vitslim" in proc.stdout


@pytest.mark.skipif(shutil.which("uv") is None, reason="uv is not installed here")
def test_under_uv_run_the_command_is_uv_run(monkeypatch):
    monkeypatch.setenv("UV_RUN_RECURSION_DEPTH", "1")
    line = vitslim_command("recipes")
    assert line == "uv run vitslim recipes"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "UV_RUN_RECURSION_DEPTH")}
    env["PATH"] = os.pathsep.join([str(Path(shutil.which("uv")).parent), os.defpath])  # a fresh shell's PATH
    proc = _run_as_printed(line + " --help", env)
    assert proc.returncode == 0 and "Usage: vitslim recipes" in proc.stdout, proc.stderr


def test_arguments_are_quoted_for_the_shell(monkeypatch):
    monkeypatch.setenv("UV_RUN_RECURSION_DEPTH", "1")
    line = vitslim_command("predict", "my model.onnx", "--data", "a;b\nc")
    assert line == "uv run vitslim predict 'my model.onnx' --data 'a;b c'"


def test_report_html_renders_code_spans_and_keeps_escaped_backticks_literal():
    markdown = (f"## How to use {markdown_code('model.onnx')}\n\nCheck it with `vitslim predict`; "
                f"the data folder is {markdown_text('my `odd` <folder>')}.\n")
    page = _markdown_to_html(markdown)
    assert "<h2>How to use <code>model.onnx</code></h2>" in page
    assert "<code>vitslim predict</code>" in page
    assert "my `odd` &lt;folder&gt;" in page and "`" not in page.replace("my `odd`", "")
