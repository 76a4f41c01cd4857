"""An unreachable model hub: the clear error at once, not a minute of retries."""

import os
import subprocess
import sys

import pytest

from vitslim.models.hub import hub_reachable


@pytest.mark.timeout(90)  # the hub client's own retries take 50-105 s per model
@pytest.mark.parametrize("model", ["deit_tiny_patch16_224", "hf:facebook/dinov2-small"])
def test_hub_names_fail_at_once_with_the_clear_error_when_the_hub_is_unreachable(tmp_path, example_images, model):
    if hub_reachable():
        pytest.skip("the model hub is reachable from this machine")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "VITSLIM_QUIET": "1"}  # an empty hub cache
    env.pop("HF_HUB_OFFLINE", None)
    proc = subprocess.run([sys.executable, "-m", "vitslim", "eval", model, "--data", str(example_images), "-n", "2"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 2, proc.stderr
    # One line: no "Retrying in 8s" from the hub client's back-off before it.
    assert proc.stderr.startswith("error: could not") and proc.stderr.count("\n") == 1, proc.stderr
    assert "unreachable" in proc.stderr
