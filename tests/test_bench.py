import torch

from conftest import make_tiny_vit
from vitslim.bench import OnnxModel, compare, count_gmacs


def test_macs_are_counted_not_estimated():
    model = torch.nn.Sequential(torch.nn.Linear(100, 30), torch.nn.ReLU(), torch.nn.Linear(30, 7))
    assert count_gmacs(model, (100,)) * 1e9 == 100 * 30 + 30 * 7


def test_compare_pytorch_and_onnx_side_by_side(tmp_path):
    model = make_tiny_vit()
    path = tmp_path / "tiny.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, 32, 32),), str(path), input_names=["images"],
                      dynamic_axes={"images": {0: "batch"}}, dynamo=False)
    onnx_model = OnnxModel(path, threads=1)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(onnx_model(x), model(x).detach(), atol=1e-4, rtol=1e-4)
    results = compare({"eager": model, "ort": path}, batch_size=2, warmup=1, iters=3, threads=1)
    eager, ort = results
    assert eager.speedup == 1.0 and eager.runtime == "pytorch" and ort.runtime == "onnxruntime"
    assert ort.speedup == ort.throughput / eager.throughput
    assert ort.threads == 1 and eager.gmacs_per_image > 0 and ort.size_mb > 0


def test_warm_each_runs_every_model_once_right_before_each_of_its_timed_batches():
    calls = []

    class Named(torch.nn.Linear):
        def __init__(self, name):
            super().__init__(4, 2)
            self.name = name

        def forward(self, x):
            calls.append(self.name)
            return super().forward(x.flatten(1)[:, :4])

    models = {"a": Named("a"), "b": Named("b")}
    compare(models, batch_size=1, warmup=1, iters=2, input_size=(4,), flops=False)
    assert calls == ["a", "b"] + ["a", "b"] * 2  # warm-up, then round robin
    calls.clear()
    compare(models, batch_size=1, warmup=1, iters=2, input_size=(4,), flops=False, warm_each=True)
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 2  # the untimed call sits right before the timed one
