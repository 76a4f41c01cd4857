"""compress and eval through a real two-node Ray cluster on the loopback give the in-process
results; a lost worker's candidate is retried; nothing imports Ray unless a cluster is asked for."""

import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import make_tiny_vit, tiny_vit_source
from vitslim.compress import Recipe, compress
from vitslim.dtype import DtypeConfig
from vitslim.export import ExportConfig
from vitslim.quant import preset

# Ray resolves 127.0.0.1 to the machine's outward address unless told this is a one-machine
# cluster; read when Ray is imported, so set before this module imports it.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
ray = pytest.importorskip("ray", reason="the cluster tests need Ray (installed with the dev group)")

pytestmark = pytest.mark.timeout(300)
TIMING_RESOURCE = "vitslim_target"
NODE = {"num_cpus": 1, "object_store_memory": 200 << 20, "node_ip_address": "127.0.0.1"}
GRID = [
    Recipe("fp32"),
    Recipe("ort-fp32", (ExportConfig(),)),
    Recipe("w8a8", (preset("w8a8"),)),
    Recipe("bf16", (DtypeConfig("bfloat16"),)),
]
FIGURES = ("cosine", "sqnr_db", "top1_agreement", "top1", "accuracy_drop")


@pytest.fixture(scope="module")
def ray_cluster():
    """Two one-CPU nodes on 127.0.0.1, the head offering the timing resource; this test
    process is the driver. Shut down at the end of the module."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args=NODE | {"include_dashboard": False,
                                                                   "resources": {TIMING_RESOURCE: 1}})
    cluster.add_node(**NODE)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def in_process(example_images, tmp_path_factory):
    """The search run here, without Ray: what every cluster run must reproduce."""
    return _search(example_images, tmp_path_factory.mktemp("in-process"))


def _search(images, cache, engine=None, **kw):
    # A speed target every candidate meets: the choice (the most faithful) depends on fidelity
    # alone, which must match; speed is timed on a busy machine, so it need not.
    return compress(make_tiny_vit(), images, "speedup=0.01", recipes=GRID, n_calib=4, n_eval=8, batch_size=2,
                    iters=2, cache_dir=cache, source=tiny_vit_source(), sensitivity_preset=None, engine=engine, **kw)


def _assert_same_search(a, b):
    assert [c.name for c in a.candidates] == [c.name for c in b.candidates]
    assert [c.recipe for c in a.candidates] == [c.recipe for c in b.candidates]
    assert a.chosen.name == b.chosen.name
    for x, y in zip(a.candidates, b.candidates):
        assert x.error is None and y.error is None, (x.error, y.error)
        assert x.eval_images == y.eval_images == 8
        for name in FIGURES:
            u, v = getattr(x, name), getattr(y, name)
            assert (u is None and v is None) or math.isclose(u, v, rel_tol=0, abs_tol=1e-6), (x.name, name, u, v)


def test_compress_on_the_cluster_matches_in_process_and_shares_the_cache(ray_cluster, in_process, example_images,
                                                                         tmp_path):
    from vitslim.cluster import RayEngine

    local = in_process
    remote = _search(example_images, tmp_path / "cluster", RayEngine(time_on=TIMING_RESOURCE))
    _assert_same_search(local, remote)
    assert "2 nodes" in remote.machine["engine"] and TIMING_RESOURCE in remote.machine["timed_on"]
    assert remote.machine["cpu"] == local.machine["cpu"]  # the timing node's CPU, named
    seen = []
    rerun = _search(example_images, tmp_path / "cluster", on_result=lambda c, cached: seen.append(cached))
    assert seen == [True] * len(GRID)  # in process, every cluster result reused from the cache
    _assert_same_search(rerun, remote)


def _kill_builds(times: int, killed: list[int], stop: threading.Event) -> None:
    """SIGKILL the worker running a candidate's build (its process title names the task), up
    to ``times`` times."""
    while len(killed) < times and not stop.is_set():
        for proc in Path("/proc").iterdir():
            try:
                title = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if proc.name.isdigit() and b"vitslim build w8a8" in title and int(proc.name) not in killed:
                os.kill(int(proc.name), signal.SIGKILL)
                killed.append(int(proc.name))
                break
        time.sleep(0.01)


def _search_while_killing(images, cache, times: int):
    from vitslim.cluster import RayEngine

    killed, stop = [], threading.Event()
    killer = threading.Thread(target=_kill_builds, args=(times, killed, stop), daemon=True)
    killer.start()
    try:
        engine = RayEngine()
        return _search(images, cache, engine), killed, engine
    finally:
        stop.set()
        killer.join()


def test_a_lost_worker_is_retried_once_then_the_candidate_fails_with_the_reason(ray_cluster, in_process,
                                                                                example_images, tmp_path):
    retried, killed, _ = _search_while_killing(example_images, tmp_path / "once", times=1)
    assert len(killed) == 1
    _assert_same_search(in_process, retried)

    failed, killed, engine = _search_while_killing(example_images, tmp_path / "twice", times=2)
    assert len(killed) == 2
    lost = {c.name: c.error for c in failed.candidates if c.error}
    assert list(lost) == ["w8a8"] and "lost its Ray worker 2 times" in lost["w8a8"]
    assert not (tmp_path / "twice" / f"{engine.not_to_cache.pop()}.json").exists()  # rerun next time


def test_nothing_imports_ray_without_a_cluster(example_images, tmp_path):
    code = ("import sys, vitslim, vitslim.cli, vitslim.compress, vitslim.workflows; "
            "from vitslim.cli import main; sys.argv = ['vitslim', 'recipes']; "
            "import contextlib\nwith contextlib.suppress(SystemExit): main()\n"
            "assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')], 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    blocked = "import sys; sys.modules['ray'] = None\nfrom vitslim.cli import main; main()"
    out = subprocess.run([sys.executable, "-c", blocked, "compress", "vit_tiny_patch16_224", "--data",
                          str(example_images), "--cluster", "local:1", "--out", str(tmp_path / "o")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "pip install 'vitslim[ray]'" in out.stderr


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """Random weights for timm's vit_tiny_patch16_224 (a 1000-class classifier), and its ONNX export."""
    import timm
    import torch
    from safetensors.torch import save_file

    from vitslim.export import export_onnx

    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    save_file(model.state_dict(), folder / "tiny.safetensors")
    export_onnx(model, folder / "tiny.onnx")
    return folder


@pytest.mark.parametrize("kind", ["bfloat16", "onnx"])
def test_eval_through_ray_data_equals_in_process(ray_cluster, tiny_checkpoint, example_images, kind):
    from vitslim.cluster import evaluate_on_cluster
    from vitslim.workflows import evaluate_on_folder

    weights = tiny_checkpoint / "tiny.safetensors"
    # bfloat16 against FP32, or the FP32 ONNX file against bfloat16: errors far above float rounding, so
    # figures computed on differently composed batches (and thread counts) agree to 1e-6.
    test, reference = (("vit_tiny_patch16_224@bfloat16", "vit_tiny_patch16_224") if kind == "bfloat16"
                       else (str(tiny_checkpoint / "tiny.onnx"), "vit_tiny_patch16_224@bfloat16"))
    args = {"model": test, "checkpoint": weights if kind == "bfloat16" else None, "data": example_images,
            "reference": reference, "reference_checkpoint": weights, "batch_size": 3}
    local, remote = evaluate_on_folder(**args), evaluate_on_cluster(**args)
    assert local.images == remote.images == 16 and local.labelled_images == remote.labelled_images > 0
    assert local.skipped_images == remote.skipped_images == 0
    for name in ("top1", "top5", "top1_agreement", "mean_kl", "cosine", "cosine_se", "min_cosine", "sqnr_db"):
        assert getattr(local, name) is not None
        assert math.isclose(getattr(local, name), getattr(remote, name), rel_tol=0, abs_tol=1e-6), name
    assert local.cosine < 1  # a real difference was measured, not two copies of one model
