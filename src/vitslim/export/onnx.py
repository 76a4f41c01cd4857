"""Export to ONNX, with vitslim's own 8-bit scales as QuantizeLinear/DequantizeLinear pairs.

What runs in integer: every 8-bit uniform quantizer (linear inputs, weights, q/k/v) becomes a
Q/DQ pair with vitslim's scale and zero point (nothing is re-calibrated by ONNX Runtime), and
ORT's graph optimizer fuses Q/DQ around MatMul/Gemm into int8 kernels (QLinearMatMul,
MatMulIntegerToFloat, QGemm), which use AVX-512 VNNI here; each int8 linear is written as one
``MatMulIntegerToFloat`` with its bias and layer scale inside (``vitslim.export.int8_linear``).
What stays in float: LayerNorm, Softmax, GELU, residual adds, and the non-uniform quantizers
(log2, SULQ, AdaLog) and sub-8-bit uniform quantizers, which are exported as their float
quantize–dequantize arithmetic so the ONNX model computes what the PyTorch model does.
Token-reduced models (ToMe, EViT) export with their fixed schedules; ATS (data-dependent token
counts) does not export.
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from torch import nn

from vitslim import metrics
from vitslim.errors import ConfigError, ExportError
from vitslim.export.graph import GraphIndex, drop_unused
from vitslim.export.int8_gates import integer_hardswish_gates
from vitslim.export.int8_linear import fuse_int8_linears
from vitslim.models.loading import input_size
from vitslim.output import atomic_path
from vitslim.quant.quantizers import lowered_for_onnx
from vitslim.runtime import OnnxModel
from vitslim.tokens import token_state


@contextlib.contextmanager
def export_mode(model: nn.Module) -> Iterator[None]:
    """The model as the exporter needs it while inside the block: quantizers lowered to
    Q/DQ ops (``vitslim.quant.lowered_for_onnx``), parameters without gradients (with them,
    torch picks fake-quant variants that do not export)."""
    grads = {p: p.requires_grad for p in model.parameters()}
    for p in grads:
        p.requires_grad_(False)
    try:
        with lowered_for_onnx(model):
            yield
    finally:
        for p, flag in grads.items():
            p.requires_grad_(flag)


def export_onnx(model: nn.Module, path: str | Path, batch_size: int = 1, dynamic_batch: bool = True,
                ort_kernels: bool = True) -> Path:
    """Export ``model`` (FP32, vitslim-quantized and/or token-reduced) to an ONNX file,
    written atomically. The graph takes (batch, 3, H, W) images. By default int8 linears and
    Hardswish gates are written as ONNX Runtime contrib kernels (``vitslim.export.int8_linear``,
    ``vitslim.export.int8_gates``); ``ort_kernels=False`` keeps standard Q/DQ + MatMul + Add and
    HardSigmoid (for runtimes other than ONNX Runtime, and to measure what the rewrite buys)."""
    state = token_state(model)
    if state is not None and state.method == "ats":
        raise ExportError("ATS keeps a data-dependent number of tokens per image, which a static ONNX graph "
                          "cannot express; export ToMe or EViT instead")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"export batch_size must be a whole number >= 1, got {batch_size!r}")
    path = Path(path)
    model = model.eval()
    # A dynamic batch is traced at >= 2 so that no size-1 batch dimension gets specialized away.
    x = torch.randn(max(batch_size, 2) if dynamic_batch else batch_size, *input_size(model))
    quantized = any(hasattr(m, "quant_sites") or hasattr(m, "weight_quantizer") for m in model.modules())
    with atomic_path(path) as tmp_path:
        _export_to(model, x, str(tmp_path), quantized, dynamic_batch)
        if quantized:  # 4-bit weights as packed MatMulNBits, int8 linears as one kernel with their bias
            from vitslim.export.nbits import store_nbits_weights

            store_nbits_weights(model, tmp_path)
            if ort_kernels:
                fuse_int8_linears(tmp_path)
                integer_hardswish_gates(tmp_path)
    return path


def _export_to(model: nn.Module, x: torch.Tensor, tmp: str, quantized: bool, dynamic_batch: bool) -> None:
    try:
        with export_mode(model), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            if quantized:  # the TorchScript exporter maps fake-quant ops to Q/DQ; torch.export cannot
                torch.onnx.export(model, (x,), tmp, input_names=["images"], output_names=["output"], opset_version=20,
                                  dynamo=False, dynamic_axes={"images": {0: "batch"}} if dynamic_batch else None)
            else:
                shapes = ({0: torch.export.Dim("batch", min=1, max=1024)},) if dynamic_batch else None
                program = torch.onnx.export(model, (x,), input_names=["images"], output_names=["output"],
                                            dynamo=True, dynamic_shapes=shapes, verbose=False)
                program.save(tmp)
    except Exception as err:
        raise ExportError(f"ONNX export of {type(model).__name__} failed: {type(err).__name__}: "
                          f"{(str(err).splitlines() or [''])[0][:400]}") from err
    finally:
        for leftover in Path(tmp).parent.glob(Path(tmp).name + ".data"):
            leftover.unlink()
    if quantized:
        store_int8_weights(tmp)


def store_int8_weights(path: str | Path) -> int:
    """Fold each QuantizeLinear of a constant weight into an int8 initializer, in place.

    The exporter writes weights as float followed by Q/DQ; storing the quantized integers
    instead (DequantizeLinear reads them directly) makes the file ~4x smaller, and ONNX
    Runtime fuses DQ(int8 weight) + MatMul into the same integer kernels. Rounding is
    half-to-even, as QuantizeLinear's. Returns how many weights were folded.
    """
    model = onnx.load(str(path))
    graph = model.graph
    index = GraphIndex(graph)
    value = index.const
    folded = []
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] not in index.initializers:
            continue
        w, scale, zero = value(node.input[0]), value(node.input[1]), value(node.input[2])
        if scale is None or zero is None:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * w.ndim
        if scale.ndim:  # per channel: broadcast along ``axis``
            shape[axis] = -1
        info = np.iinfo(zero.dtype)
        q = np.clip(np.rint(w / scale.reshape(shape)) + zero.reshape(shape).astype(np.int64), info.min, info.max)
        graph.initializer.append(numpy_helper.from_array(q.astype(zero.dtype), node.input[0] + "_int8"))
        for consumer in graph.node:
            consumer.input[:] = [node.input[0] + "_int8" if i == node.output[0] else i for i in consumer.input]
        folded.append(node)
    for node in folded:
        graph.node.remove(node)
    drop_unused(graph)
    onnx.save(model, str(path))
    return len(folded)


def validate_onnx(model: nn.Module, path: str | Path, images: torch.Tensor, threads: int | None = None,
                  runner: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
    """Run the ONNX file in a fresh ONNX Runtime session (or in ``runner``, e.g. the file loaded
    in OpenVINO) and compare with PyTorch on ``images``."""
    session = runner or OnnxModel(path, threads)
    with torch.no_grad():
        expected = model(images).float()
    got = session(images)
    return {"images": len(images), "max_abs_diff": (got - expected).abs().max().item(),
            "cosine": metrics.cosine_similarity(expected, got), "sqnr_db": metrics.sqnr_db(expected, got)}


def integer_ops(path: str | Path) -> dict[str, int]:
    """Count the integer kernels ONNX Runtime actually runs (its optimized graph)."""
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        opts.log_severity_level = 3  # its note that a fully optimized graph is CPU-specific is ours to know
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        graph = onnx.load(opts.optimized_model_filepath).graph
    counts: dict[str, int] = {}
    for node in graph.node:
        op = node.op_type
        if "Integer" in op or op.startswith("QLinear") or op in ("QGemm", "DynamicQuantizeMatMul", "MatMulNBits"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
