"""Benchmark: latency, throughput, size and FLOPs, on this machine, for PyTorch or ONNX Runtime.

Speed on a shared CPU is noisy, so comparisons are measured in one run with the candidates
interleaved (one timed batch of each in turn) and reported as ratios to a baseline.
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import timm
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vitslim.errors import ConfigError, ModelLoadError
from vitslim.models.loading import input_size


@dataclass
class BenchResult:
    """Speed and size of one model at one batch size."""

    name: str
    runtime: str  # "pytorch" or "onnxruntime"
    batch_size: int
    threads: int
    latency_ms_median: float
    latency_ms_p90: float
    throughput: float  # images per second, from the median batch latency
    params_m: float | None
    size_mb: float
    gmacs_per_image: float | None
    speedup: float | None = None  # throughput ratio to the baseline measured in the same run

    def to_dict(self) -> dict:
        return asdict(self)


class OnnxModel:
    """An ONNX Runtime session used like a model: takes a float tensor, returns a tensor."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelLoadError(f"ONNX model {str(self.path)!r} does not exist or is not a file")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # shape-inference warnings of exported graphs are noise here
        self.threads = opts.intra_op_num_threads
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as err:  # ORT reports bad files as several exception types
            raise ModelLoadError(f"ONNX Runtime cannot load {str(self.path)!r} ({type(err).__name__}: "
                                 f"{' '.join(str(err).split())[:200]}); is it a complete .onnx file?") from None
        if len(self.session.get_inputs()) != 1 or len(self.session.get_inputs()[0].shape) != 4:
            raise ModelLoadError(f"ONNX model {str(self.path)!r} does not take one (batch, channels, height, "
                                 "width) image input, as an exported vision model does")
        graph_input = self.session.get_inputs()[0]
        self.input_name = graph_input.name
        dims = graph_input.shape[1:]
        # (C, H, W) from the graph when static; 224x224 RGB when the export left it dynamic.
        self.input_size = tuple(dims) if all(isinstance(d, int) for d in dims) else (3, 224, 224)
        outputs = self.session.get_outputs()[0].shape
        self.contract = self._contract()
        # Without a vitslim contract, a 1000-wide output is taken as ImageNet logits.
        imagenet_head = 1000 if outputs and outputs[-1] == 1000 else 0
        self.num_classes = self.contract.num_classes if self.contract else imagenet_head

    def _contract(self):
        """The vitslim contract in the file's metadata (preprocessing, output meaning), if any."""
        from vitslim.deploy.contract import Contract  # deferred: deploy imports bench (through export)
        metadata = self.session.get_modelmeta().custom_metadata_map
        if "vitslim.preprocessing" not in metadata:
            return None
        try:
            return Contract.from_metadata(metadata)
        except ConfigError as err:
            raise ModelLoadError(f"{str(self.path)!r}: unusable vitslim contract: {err}; re-create the file "
                                 "with `vitslim apply`, `vitslim compress` or `vitslim export`") from None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        try:
            out = self.session.run(None, {self.input_name: images.float().numpy()})[0]
        except Exception as err:  # e.g. images of another size than the graph takes
            raise ModelLoadError(f"ONNX Runtime cannot run {str(self.path)!r} on images of shape "
                                 f"{tuple(images.shape)} ({type(err).__name__}: {' '.join(str(err).split())[:200]}); "
                                 "does it take this input size?") from None
        return torch.from_numpy(out)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def size_on_disk_mb(model: nn.Module | OnnxModel) -> float:
    """Size of the model file: the ONNX file, or the state dict saved as safetensors."""
    if isinstance(model, OnnxModel):
        return model.path.stat().st_size / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(dedupe_shared_tensors(state), str(path))
        return path.stat().st_size / 1e6


def dedupe_shared_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (tied weights): keep one copy of each."""
    seen, out = set(), {}
    for k, v in state.items():
        key = (v.data_ptr(), v.shape, v.dtype) if v.numel() else (k,)
        if key not in seen:
            seen.add(key)
            out[k] = v
    return out


def count_gmacs(model: nn.Module, input_size: tuple[int, ...]) -> float:
    """Multiply-accumulates per image (in G), counted by ``torch.utils.flop_counter``
    (which counts 2 FLOPs per MAC; papers' "GFLOPs" for ViTs are these GMACs)."""
    dtype = next(model.parameters()).dtype
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.randn(1, *input_size, dtype=dtype))
    return counter.get_total_flops() / 2 / 1e9


def _input_size(model: nn.Module | OnnxModel) -> tuple[int, ...]:
    return model.input_size if isinstance(model, OnnxModel) else input_size(model)


def as_runnable(model: nn.Module | OnnxModel | str | Path, threads: int | None = None):
    """A model, or the path of an ONNX file opened in ONNX Runtime."""
    if isinstance(model, (str, Path)):
        return OnnxModel(model, threads)
    return model


def _timed_call(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


# Pause before every timed batch: ONNX Runtime's worker threads spin-wait for tens of ms after a
# run, and in a round robin they take the cores from the next model; 0.1 s lets them go to
# sleep (10 ms is not enough).
SETTLE_SECONDS = 0.1


def compare(
    models: dict[str, nn.Module | OnnxModel | str | Path],
    batch_size: int = 8,
    warmup: int = 3,
    iters: int = 10,
    threads: int | None = None,
    input_size: tuple[int, ...] | None = None,
    flops: bool = True,
    stop: Callable[[dict[str, list[float]]], bool] | None = None,
    warm_each: bool = False,
) -> list[BenchResult]:
    """Benchmark several models side by side; the first is the baseline for ``speedup``.

    Timed batches are interleaved across models (round robin), so a slow period of the
    machine hits every candidate alike; each waits ``SETTLE_SECONDS`` first, so the threads of
    the model before it are idle. ``stop(times)``, called after each round with every
    model's batch times so far (ms), ends the timing early when it returns True; the figures
    are then those of the rounds timed. Round robin evicts each model's weights from the CPU
    caches before its turn; ``warm_each`` runs every model once, untimed, right before each
    of its timed batches, as a process serving that model alone would find its caches (DINOv2's
    23 MB of int8 weights fit a 32 MB L3). It doubles the time taken.
    """
    if batch_size < 1 or iters < 1 or warmup < 0:
        raise ValueError(f"need batch_size >= 1, iters >= 1, warmup >= 0; got {batch_size}, {iters}, {warmup}")
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    runnables = {name: as_runnable(m, threads) for name, m in models.items()}
    size = input_size or _input_size(next(iter(runnables.values())))
    x = torch.randn(batch_size, *size)
    calls = {name: _batch_call(m, x) for name, m in runnables.items()}
    with torch.inference_mode():
        for call in calls.values():
            for _ in range(warmup):
                call()
        times = {name: [] for name in calls}
        for _ in range(iters):
            for name, call in calls.items():
                if warm_each:
                    call()
                time.sleep(SETTLE_SECONDS)
                times[name].append(_timed_call(call))
            if stop and stop(times):
                break
    results = [_result(name, runnables[name], times[name], batch_size, threads, size, flops)
               for name in calls]
    base = results[0].throughput
    for r in results:
        r.speedup = r.throughput / base
    return results


def _batch_call(model: nn.Module | OnnxModel, x: torch.Tensor) -> Callable[[], object]:
    if isinstance(model, OnnxModel):
        feed = {model.input_name: x.numpy().astype(np.float32)}
        return lambda: model.session.run(None, feed)
    xd = x.to(next(model.parameters()).dtype)
    return lambda: model(xd)


def _result(name, model, times, batch_size, threads, size, flops) -> BenchResult:
    median = statistics.median(times)
    is_onnx = isinstance(model, OnnxModel)
    return BenchResult(
        name=name,
        runtime="onnxruntime" if is_onnx else "pytorch",
        batch_size=batch_size,
        threads=model.threads if is_onnx else threads,
        latency_ms_median=median,
        latency_ms_p90=float(np.percentile(times, 90)),
        throughput=batch_size / (median / 1e3),
        params_m=None if is_onnx else count_params(model) / 1e6,
        size_mb=size_on_disk_mb(model),
        gmacs_per_image=None if is_onnx or not flops else count_gmacs(model, size),
    )


def benchmark(model: nn.Module | OnnxModel | str | Path, batch_size: int = 8, **kwargs) -> BenchResult:
    """Benchmark one model (or ONNX file): latency, throughput, params, size, GMACs."""
    return compare({"model": model}, batch_size=batch_size, **kwargs)[0]


@dataclass(frozen=True)
class CpuFeatures:
    """What this CPU offers the kernels that decide whether a compressed model is faster:
    int8 dot products (VNNI: 4 int8 products summed per 32-bit lane in one instruction) and
    native bfloat16 (AVX512_BF16 or AMX; without it PyTorch emulates bf16 and is slower than FP32)."""

    avx2: bool = False
    avx512: bool = False
    vnni: bool = False  # AVX-512 VNNI or AVX-VNNI
    bf16: bool = False  # native bfloat16 arithmetic: avx512_bf16 or amx_bf16
    amx: bool = False
    model_name: str = ""

    @classmethod
    def from_flags(cls, flags: set[str] | str, model_name: str = "") -> CpuFeatures:
        """From /proc/cpuinfo's flag names (a set, or the space-separated line)."""
        flags = set(flags.split()) if isinstance(flags, str) else set(flags)
        return cls(avx2="avx2" in flags, avx512="avx512f" in flags,
                   vnni=bool(flags & {"avx512_vnni", "avx_vnni"}),
                   bf16=bool(flags & {"avx512_bf16", "amx_bf16"}),
                   amx=bool(flags & {"amx_tile", "amx_int8", "amx_bf16"}), model_name=model_name)

    @property
    def int8_isa(self) -> str:
        """The instruction set int8 kernels get here, which decides what int8 gains."""
        if self.vnni:
            return "AVX-512 VNNI" if self.avx512 else "AVX-VNNI"
        return "AVX2, no VNNI" if self.avx2 else ""

    @property
    def summary(self) -> str:
        names = [n for n, on in (("AVX2", self.avx2), ("AVX-512", self.avx512), ("VNNI", self.vnni),
                                 ("native bf16", self.bf16), ("AMX", self.amx)) if on]
        return ", ".join(names) or "none of AVX2, AVX-512, VNNI, bf16, AMX"


def cpu_features(cpuinfo: str | Path = "/proc/cpuinfo") -> CpuFeatures:
    """This machine's CPU features, read from ``cpuinfo`` (none known when it is unreadable)."""
    name, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = line.split(":", 1)[1]
                break
    except OSError:
        pass
    return CpuFeatures.from_flags(flags, name)


def machine_info() -> dict:
    """What the figures were measured on."""
    cpu = cpu_features()
    isa = cpu.int8_isa
    return {
        "cpu": f"{cpu.model_name} ({isa})" if isa else cpu.model_name,
        "cpu_features": cpu.summary,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "onnxruntime": ort.__version__,
    }
