"""The fuzz script with a small budget (CI): generated inputs to every parser end as a result
or a one-line error; no traceback, hang or wrong result. The full run (10 000 per parser) is
`uv run python benchmarks/fuzz_inputs.py`."""

import importlib.util
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parents[1] / "benchmarks" / "fuzz_inputs.py"


@pytest.mark.timeout(600)
def test_fuzzed_inputs_never_crash_hang_or_mislead(capsys):
    spec = importlib.util.spec_from_file_location("fuzz_inputs", FUZZ)
    fuzz = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = fuzz  # its dataclasses look their module up
    spec.loader.exec_module(fuzz)
    results = fuzz.run(budget=60, seed=1, timeout=30)
    report = capsys.readouterr().out
    assert set(results) == set(fuzz.PARSERS)
    for name, tally in results.items():
        assert tally.counts["crash"] == tally.counts["hang"] == tally.counts["wrong"] == 0, report
        assert tally.counts["refused"] > 0, name  # the generator does reach the error paths
