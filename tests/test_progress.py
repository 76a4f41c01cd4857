"""Progress off a terminal (CI logs, nohup): plain lines on stderr once a phase runs long."""

import torch

from conftest import make_tiny_vit
from vitslim import progress
from vitslim.compress.search import block_sensitivity


def test_plain_lines_once_a_phase_runs_long_one_per_step(monkeypatch, capsys):
    monkeypatch.delenv("VITSLIM_QUIET", raising=False)
    assert list(progress.progress_bar(range(3), "quick")) == [0, 1, 2]
    assert capsys.readouterr().err == ""  # under PLAIN_EVERY seconds: nothing
    monkeypatch.setattr(progress, "PLAIN_EVERY", 0.0)  # every step is past the threshold
    assert list(progress.progress_bar(iter("abc"), "calibration", total=3)) == ["a", "b", "c"]
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" after ")[0] for line in lines] == ["calibration: 1/3", "calibration: 2/3", "calibration: 3/3"]
    assert "left" in lines[0] and "left" not in lines[-1]


def test_quiet_prints_nothing(monkeypatch, capsys):
    monkeypatch.setenv("VITSLIM_QUIET", "1")
    monkeypatch.setattr(progress, "PLAIN_EVERY", 0.0)
    assert list(progress.progress_bar(range(2), "calibration")) == [0, 1]
    assert capsys.readouterr().err == ""


def test_compress_sensitivity_tail_reports_each_block(monkeypatch, capsys):
    monkeypatch.delenv("VITSLIM_QUIET", raising=False)
    monkeypatch.setattr(progress, "PLAIN_EVERY", 0.0)
    torch.manual_seed(0)
    rows = block_sensitivity(make_tiny_vit(), torch.randn(8, 3, 32, 32), torch.randn(4, 3, 32, 32), "minmax-w8a8")
    err = capsys.readouterr().err
    assert len(rows) == 2
    assert "per-block sensitivity (minmax-w8a8): 1/2" in err and "per-block sensitivity (minmax-w8a8): 2/2" in err
