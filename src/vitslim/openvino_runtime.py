"""OpenVINO as a deploy runtime: a vitslim ONNX export run by OpenVINO's CPU plugin.

OpenVINO reads the portable export (standard Q/DQ ops, ``export_onnx(..., ort_kernels=False)``)
as it is: it folds each Q/DQ pair around a MatMul into an int8 kernel (AMX or AVX-512 VNNI where
the CPU has them), fuses attention into one scaled-dot-product-attention op, and runs the float
parts at the precision its hint asks: ``bf16`` (native on CPUs with AVX512_BF16 or AMX) or
``f32``. The hint changes what the model computes, so it is a measured choice: the artifact
records it (its recipe's export step) and its fidelity is measured like any other candidate's.

Needs the ``openvino`` extra (``pip install 'vitslim[openvino]'``); nothing else in vitslim
imports OpenVINO, and ``openvino_available()`` says whether it is there.
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitslim.bench import SETTLE_SECONDS, CpuFeatures, Runner, cpu_features
from vitslim.errors import ConfigError, ModelLoadError

PRECISIONS = ("bf16", "f32")
RUNTIME = "openvino"
MAX_SHAPES = 4  # input shapes compiled and kept per model


def openvino_available() -> bool:
    """Whether the ``openvino`` package is installed (without importing it)."""
    try:
        return importlib.util.find_spec("openvino") is not None
    except ValueError:  # a module set to None in sys.modules: imports of it are blocked
        return False


def require_openvino():
    """The openvino module; a ConfigError saying how to install it when it is missing."""
    if not openvino_available():
        raise ConfigError("OpenVINO is not installed: `pip install 'vitslim[openvino]'` (or choose the "
                          "onnxruntime runtime)")
    import openvino

    return openvino


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ConfigError(f"OpenVINO precision {precision!r} is not one of {list(PRECISIONS)}")
    return precision


def default_precision(cpu: CpuFeatures | None = None) -> str:
    """``bf16`` where the CPU computes bfloat16 natively (AVX512_BF16 or AMX), else ``f32``."""
    return "bf16" if (cpu or cpu_features()).bf16 else "f32"


class OpenVinoModel:
    """An ONNX file (or OpenVINO IR ``.xml``) compiled for this CPU by OpenVINO, used like a
    model: takes a float tensor of images, returns a float tensor."""

    def __init__(self, path: str | Path, precision: str = "f32", threads: int | None = None,
                 num_classes: int | None = None) -> None:
        ov = require_openvino()
        self.path = Path(path)
        self.precision = check_precision(precision)
        if not self.path.is_file():
            raise ModelLoadError(f"model file {str(self.path)!r} does not exist or is not a file")
        self.threads = threads or torch.get_num_threads()
        core = ov.Core()
        try:
            model = core.read_model(str(self.path))
        except Exception as err:  # OpenVINO reports unreadable files as RuntimeError subclasses
            raise ModelLoadError(f"OpenVINO cannot read {str(self.path)!r} ({type(err).__name__}: "
                                 f"{' '.join(str(err).split())[:200]}); is it a complete .onnx or .xml file?") from None
        shape = model.inputs[0].get_partial_shape() if len(model.inputs) == 1 else None
        if shape is None or shape.rank.is_dynamic or shape.rank.get_length() != 4:
            raise ModelLoadError(f"model {str(self.path)!r} does not take one (batch, channels, height, width) "
                                 "image input, as an exported vision model does")
        dims = [d.get_length() if d.is_static else None for d in shape[1:]]
        self.input_size = tuple(dims) if None not in dims else (3, 224, 224)
        self._core, self._model = core, model
        self._requests: dict[tuple[int, ...], Any] = {}
        # compiled for one image now (and kept): a model this CPU cannot compile fails at load, not later
        self._request((1, *self.input_size))
        width = model.outputs[0].get_partial_shape()[-1]
        imagenet_head = 1000 if width.is_static and width.get_length() == 1000 else 0
        self.num_classes = imagenet_head if num_classes is None else num_classes
        self.contract = None  # the vitslim contract, set by whoever read it from the file

    def _compile(self, model, profile: bool = False):
        return self._core.compile_model(model, "CPU", {
            "INFERENCE_PRECISION_HINT": self.precision, "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": self.threads, "PERF_COUNT": profile})

    def _static(self, shape: tuple[int, ...]):
        """The model with every shape fixed for inputs of ``shape``: OpenVINO then picks its
        kernels for the real sizes (and a token-merged model's token counts become constants),
        faster than with a free batch size."""
        model = self._model.clone()
        model.reshape({0: list(shape)})
        return model

    def _request(self, shape: tuple[int, ...], profile: bool = False):
        """An inference request compiled for inputs of ``shape`` (one per shape, kept, at most
        ``MAX_SHAPES``: a dataset's last, smaller batch adds one)."""
        if profile:
            return self._compile(self._static(shape), profile=True).create_infer_request()
        if shape not in self._requests:
            if len(self._requests) >= MAX_SHAPES:
                self._requests.pop(next(iter(self._requests)))
            self._requests[shape] = self._compile(self._static(shape)).create_infer_request()
        return self._requests[shape]

    def profile_ms(self, images: torch.Tensor, runs: int = 3) -> dict[str, float]:
        """Milliseconds per batch of ``images`` spent in each kind of executed operation (OpenVINO's
        performance counters: ``FullyConnected`` for the linears, ``Subgraph`` for fused attention
        and element-wise chains, ...), averaged over ``runs`` after one warm-up, largest first."""
        feed = np.ascontiguousarray(images.float().numpy())
        request = self._request(feed.shape, profile=True)
        request.infer({0: feed})
        totals: Counter = Counter()
        for _ in range(runs):
            request.infer({0: feed})
            for info in request.get_profiling_info():
                totals[f"{info.node_type} ({info.exec_type})"] += info.real_time.total_seconds() * 1e3 / runs
        return {k: round(v, 3) for k, v in totals.most_common() if v > 0}

    @property
    def runtime(self) -> str:
        return f"{RUNTIME}-{self.precision}"

    def _infer(self, feed: np.ndarray) -> np.ndarray:
        request = self._request(feed.shape)
        request.infer({0: feed})
        return request.get_output_tensor(0).data

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        try:
            out = self._infer(np.ascontiguousarray(images.float().numpy()))
        except Exception as err:  # e.g. images of another size than the graph takes
            raise ModelLoadError(f"OpenVINO cannot run {str(self.path)!r} on images of shape {tuple(images.shape)} "
                                 f"({type(err).__name__}: {' '.join(str(err).split())[:200]}); does it take this "
                                 "input size?") from None
        return torch.from_numpy(out.copy())

    def runner(self, name: str, images: torch.Tensor) -> Runner:
        """A ``vitslim.bench`` Runner of one batch of ``images``. OpenVINO's worker threads
        spin after a run as ONNX Runtime's do, so it gets the same settle pause."""
        feed = np.ascontiguousarray(images.float().numpy())
        request = self._request(feed.shape)
        return Runner(name, lambda: request.infer({0: feed}), self.runtime, self.threads, SETTLE_SECONDS)

    def executed_ops(self) -> Counter:
        """How many of each operation the compiled model runs (OpenVINO's execution graph):
        shows what was fused (``ScaledDotProductAttention``) and what runs in int8."""
        compiled = self._request((1, *self.input_size)).get_compiled_model()
        return Counter(op.get_rt_info()["layerType"].astype(str) for op in compiled.get_runtime_model().get_ops())
