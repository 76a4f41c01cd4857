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
