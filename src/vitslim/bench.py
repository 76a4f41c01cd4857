"""Benchmark: latency, throughput, size and FLOPs, on this machine, for any runtime.

The one timing engine of vitslim (``time_interleaved``): models are timed side by side, one
batch of each in turn, after a warm-up that lasts until their times stop falling; every ratio
is the median over rounds with a distribution-free confidence interval, and the machine's load
during the run is recorded, so a run disturbed by another process is flagged, not reported.
Any runtime plugs in as a ``Runner`` (a callable that processes one batch).
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vitslim.artifact.tensors import saved_size_bytes
from vitslim.models.loading import input_size
from vitslim.runtime import OnnxModel


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def size_on_disk_mb(model: nn.Module | OnnxModel) -> float:
    """Size of the model file: the ONNX file, or the state dict as a saved artifact holds it."""
    if not isinstance(model, nn.Module):
        return model.path.stat().st_size / 1e6
    return saved_size_bytes(model) / 1e6


def count_gmacs(model: nn.Module, input_size: tuple[int, ...]) -> float:
    """Multiply-accumulates per image (in G), counted by ``torch.utils.flop_counter``
    (which counts 2 FLOPs per MAC; papers' "GFLOPs" for ViTs are these GMACs)."""
    dtype = next(model.parameters()).dtype
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.randn(1, *input_size, dtype=dtype))
    return counter.get_total_flops() / 2 / 1e9


def _input_size(model: nn.Module | OnnxModel) -> tuple[int, ...]:
    return input_size(model) if isinstance(model, nn.Module) else model.input_size


def as_runnable(model: nn.Module | OnnxModel | str | Path, threads: int | None = None):
    """A model, or the path of an ONNX file opened in ONNX Runtime."""
    if isinstance(model, (str, Path)):
        return OnnxModel(model, threads)
    return model


# ---------------------------------------------------------------- statistics of timed rounds


def _binomial_tail(n: int, k: int) -> float:
    """P(B <= k) for B ~ Binomial(n, 1/2)."""
    return sum(math.comb(n, i) for i in range(k + 1)) / 2**n


def median_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """The median of ``values`` with a distribution-free confidence interval for it: the
    order statistics ``[x_(j), x_(n-j+1)]`` with the largest ``j`` whose coverage
    ``1 - 2 P(B <= j-1)``, ``B ~ Binomial(n, 1/2)``, is at least ``confidence`` (the sign-test
    interval; no assumption on the shape of the noise). With too few values for that, the
    interval is their range and ``confidence`` says what it covers (e.g. 0.9375 for 5)."""
    x = sorted(values)
    n = len(x)
    if n == 0:
        raise ValueError("no values to take the median of")
    j = 1
    while j + 1 <= n // 2 and 1 - 2 * _binomial_tail(n, j) >= confidence:
        j += 1
    covers = 1 - 2 * _binomial_tail(n, j - 1)
    return Interval(statistics.median(x), x[j - 1], x[n - j], covers, n)


def decimals_for(low: float, high: float, most: int = 2) -> int:
    """Decimals worth printing for a figure known to within ``[low, high]``: down to the
    interval's leading digit (width 0.8 -> 1 decimal, 0.05 -> 2), at most ``most``."""
    width = high - low
    if not (width > 0 and math.isfinite(width)):
        return most
    return max(0, min(most, -math.floor(math.log10(width))))


@dataclass(frozen=True)
class Interval:
    """A median over timed rounds with its confidence interval (see ``median_interval``)."""

    estimate: float
    low: float
    high: float
    confidence: float  # probability that [low, high] covers the true median
    rounds: int

    def text(self, unit: str = "×", most_decimals: int = 2) -> str:
        """``3.4× (3.0–3.8)``: printed at the precision the interval allows."""
        d = decimals_for(self.low, self.high, most_decimals)
        return f"{self.estimate:.{d}f}{unit} ({self.low:.{d}f}–{self.high:.{d}f})"

    def ms_text(self) -> str:
        """A latency, ``31.2 ms (30.9–31.6)``: three significant digits at most."""
        return self.text(" ms", max(0, 2 - math.floor(math.log10(abs(self.estimate)))) if self.estimate else 2)

    def overlaps(self, other: Interval) -> bool:
        return self.low <= other.high and other.low <= self.high

    def above(self, value: float) -> bool:
        """The whole interval is at or above ``value``."""
        return self.low >= value

    def below(self, value: float) -> bool:
        """The whole interval is below ``value``."""
        return self.high < value

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- machine state during a run

# A run is disturbed when other processes (or the hypervisor, as steal time) took more than
# this share of all cores' time while it ran: its figures are flagged, not reported.
DISTURBED_SHARE = 0.10
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class CpuTimes:
    """Cumulative CPU time (ticks) of the whole machine and of this process."""

    busy: int  # every core's non-idle time except steal
    steal: int  # taken by the hypervisor for other machines
    total: int  # everything, idle included
    own: int  # this process, all its threads (user + system)


def read_cpu_times(stat: str | None = None, self_stat: str | None = None) -> CpuTimes | None:
    """From ``/proc/stat`` and ``/proc/self/stat`` (or their given text); None where unreadable."""
    try:
        stat = stat if stat is not None else Path("/proc/stat").read_text()
        self_stat = self_stat if self_stat is not None else Path("/proc/self/stat").read_text()
    except OSError:
        return None
    fields_ = [int(v) for v in stat.splitlines()[0].split()[1:]]
    fields_ += [0] * (8 - len(fields_))
    user, nice, system, idle, iowait, irq, softirq, steal = fields_[:8]
    after_name = self_stat.rsplit(")", 1)[1].split()  # the command name may hold spaces
    own = int(after_name[11]) + int(after_name[12])  # utime, stime
    return CpuTimes(busy=user + nice + system + irq + softirq, steal=steal,
                    total=user + nice + system + idle + iowait + irq + softirq + steal, own=own)


def cpu_mhz() -> list[float]:
    """Every core's current clock where the system shows it (cpufreq, else /proc/cpuinfo)."""
    freqs = sorted(Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cpufreq/scaling_cur_freq"))
    try:
        if freqs:
            return [int(f.read_text()) / 1e3 for f in freqs]
        return [float(line.split(":")[1]) for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("cpu MHz")]
    except (OSError, ValueError):
        return []


@dataclass(frozen=True)
class MachineLoad:
    """What else the machine did while a timing ran."""

    seconds: float
    others_share: float | None  # other processes' CPU time / all cores' time (None: not visible)
    steal_share: float | None
    mhz_low: float | None  # lowest and highest core clock seen at the start and end
    mhz_high: float | None
    disturbed: bool

    def describe(self) -> str:
        if self.others_share is None:
            return "other processes' CPU use not visible here"
        text = f"other processes used {self.others_share:.0%} of the CPU"
        if self.steal_share and self.steal_share >= 0.005:
            text += f", the hypervisor stole {self.steal_share:.0%}"
        if self.mhz_low is not None:
            text += (f", cores at {self.mhz_low:.0f} MHz" if self.mhz_low == self.mhz_high
                     else f", cores at {self.mhz_low:.0f}–{self.mhz_high:.0f} MHz")
        return text

    def to_dict(self) -> dict:
        return asdict(self)


class LoadWatch:
    """Records the machine's CPU use between ``start()`` and ``stop()``: other processes' time
    is the machine's busy time (``/proc/stat``) minus this process's (``/proc/self/stat``)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter,
                 read: Callable[[], CpuTimes | None] = read_cpu_times) -> None:
        self.clock, self.read = clock, read

    def start(self) -> LoadWatch:
        self.began, self.first, self.mhz = self.clock(), self.read(), cpu_mhz()
        return self

    def stop(self) -> MachineLoad:
        last, mhz = self.read(), self.mhz + cpu_mhz()
        others = steal = None
        if self.first is not None and last is not None and last.total > self.first.total:
            total = last.total - self.first.total
            others = max(0, (last.busy - self.first.busy) - (last.own - self.first.own)) / total
            steal = (last.steal - self.first.steal) / total
        disturbed = others is not None and others + (steal or 0) > DISTURBED_SHARE
        return MachineLoad(self.clock() - self.began, others, steal, min(mhz, default=None),
                           max(mhz, default=None), disturbed)


# ---------------------------------------------------------------- runners and the engine

# Pause after each ONNX Runtime run: its worker threads spin-wait for tens of ms after a run,
# and in a round robin they take the cores from the next model; 0.1 s lets them go to sleep
# (10 ms is not enough).
SETTLE_SECONDS = 0.1


@dataclass
class Runner:
    """One model ready to time: ``run()`` processes one batch. Any runtime plugs in as a
    Runner; ``settle_s`` is the pause after each run that its worker threads need to go idle
    before the next model runs, ``threads`` the threads it computes with (stated in reports)."""

    name: str
    run: Callable[[], object]
    runtime: str = "python"
    threads: int | None = None
    settle_s: float = 0.0


def runner_for(name: str, model: nn.Module | OnnxModel | str | Path, images: torch.Tensor,
               threads: int | None = None) -> Runner:
    """A Runner for a PyTorch module, an ``OnnxModel`` or the path of an ONNX file, fed ``images``;
    a model of another runtime (e.g. ``vitslim.openvino_runtime.OpenVinoModel``) gives its own."""
    model = as_runnable(model, threads)
    if hasattr(model, "runner"):
        return model.runner(name, images)
    if isinstance(model, OnnxModel):
        feed = {model.input_name: images.numpy().astype(np.float32)}
        return Runner(name, lambda: model.session.run(None, feed), "onnxruntime", model.threads, SETTLE_SECONDS)
    x = images.to(next(model.parameters()).dtype)

    def run() -> object:
        with torch.inference_mode():
            return model(x)

    return Runner(name, run, "pytorch", threads or torch.get_num_threads())


# Warm-up goes on while some model's latest round is faster than this share of its best earlier one.
STILL_FALLING = 0.95


@dataclass
class Timing:
    """Models timed side by side: each one's batch times (ms) per interleaved round."""

    runners: list[dict]  # name, runtime, threads, settle_s
    times_ms: dict[str, list[float]]
    warmup_rounds: int
    load: MachineLoad | None = None  # None while the timing runs

    @property
    def names(self) -> list[str]:
        return list(self.times_ms)

    @property
    def rounds(self) -> int:
        return min(len(t) for t in self.times_ms.values())

    @property
    def disturbed(self) -> bool:
        return bool(self.load and self.load.disturbed)

    def ratio(self, name: str, baseline: str | None = None) -> Interval:
        """How many times faster ``name`` runs than ``baseline`` (default the first model):
        the median over rounds of baseline time / its time in the same round, with its interval."""
        base = self.times_ms[baseline or self.names[0]]
        return median_interval([b / t for b, t in zip(base, self.times_ms[name])])

    def latency_ms(self, name: str) -> Interval:
        return median_interval(self.times_ms[name])


def time_interleaved(
    runners: Sequence[Runner],
    rounds: int = 10,
    max_warmup: int = 10,
    stop: Callable[[Timing], bool] | None = None,
    warm_each: bool = False,
    clock: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], None] = time.sleep,
    watch: LoadWatch | None = None,
) -> Timing:
    """Time ``runners`` side by side: round after round, one batch of each in turn, so a slow
    period of the machine hits every model alike and ratios between them stay steady.

    Warm-up rounds (run the same way, not kept) go on until no model's latest round is faster
    than ``STILL_FALLING`` of its best earlier one, at most ``max_warmup`` (at least two unless
    that is lower). After each run a runner's ``settle_s`` pause lets its threads go idle. Then
    ``rounds`` timed rounds, fewer when ``stop(timing so far)`` returns True after one. With
    ``warm_each``, every model runs once, untimed, right before each of its timed batches (its
    weights back in the CPU caches, as in a process serving that model alone; twice the time).
    The machine's load during the timed rounds is recorded (``Timing.load``)."""
    if not runners or rounds < 1 or max_warmup < 0:
        raise ValueError(f"need runners, rounds >= 1 and max_warmup >= 0; got {len(runners)}, {rounds}, {max_warmup}")
    if len({r.name for r in runners}) != len(runners):
        raise ValueError(f"runner names must differ: {[r.name for r in runners]}")

    def timed(r: Runner) -> float:
        start = clock()
        r.run()
        elapsed = (clock() - start) * 1e3
        if r.settle_s:
            sleep(r.settle_s)
        return elapsed

    warm: dict[str, list[float]] = {r.name: [] for r in runners}
    for i in range(max_warmup):
        for r in runners:
            warm[r.name].append(timed(r))
        if i >= 1 and all(t[-1] >= STILL_FALLING * min(t[:-1]) for t in warm.values()):
            break
    timing = Timing([{"name": r.name, "runtime": r.runtime, "threads": r.threads, "settle_s": r.settle_s}
                     for r in runners], {r.name: [] for r in runners}, len(warm[runners[0].name]))
    watch = (watch or LoadWatch(clock)).start()
    for _ in range(rounds):
        for r in runners:
            if warm_each:
                timed(r)
            timing.times_ms[r.name].append(timed(r))
        if stop and stop(timing):
            break
    timing.load = watch.stop()
    return timing


@dataclass
class BenchResult:
    """Speed and size of one model at one batch size, from one side-by-side timing."""

    name: str
    runtime: str  # "pytorch", "onnxruntime", ...
    batch_size: int
    threads: int | None
    latency_ms_median: float
    latency_ms_low: float  # the median's confidence interval (see median_interval)
    latency_ms_high: float
    throughput: float  # images per second, from the median batch latency
    params_m: float | None
    size_mb: float | None
    gmacs_per_image: float | None
    speedup: float | None = None  # throughput ratio to the baseline, median over interleaved rounds
    speedup_low: float | None = None
    speedup_high: float | None = None
    confidence: float | None = None  # of both intervals
    rounds: int = 0
    disturbed: bool = False  # other processes took a share of the CPU during the run: not a figure
    load: MachineLoad | None = None  # the machine during the run

    @property
    def speedup_interval(self) -> Interval:
        return Interval(self.speedup, self.speedup_low, self.speedup_high, self.confidence, self.rounds)

    @property
    def latency_interval(self) -> Interval:
        return Interval(self.latency_ms_median, self.latency_ms_low, self.latency_ms_high, self.confidence,
                        self.rounds)

    def speedup_text(self) -> str:
        """``3.4× (3.0–3.8)``, or ``disturbed`` when other processes took the CPU during the run."""
        return "disturbed" if self.disturbed else self.speedup_interval.text()

    def latency_text(self) -> str:
        return "disturbed" if self.disturbed else self.latency_interval.ms_text()

    def to_dict(self) -> dict:
        return asdict(self)


def compare(
    models: dict[str, nn.Module | OnnxModel | str | Path],
    batch_size: int = 8,
    warmup: int = 10,
    iters: int = 10,
    threads: int | None = None,
    input_size: tuple[int, ...] | None = None,
    flops: bool = True,
    stop: Callable[[Timing], bool] | None = None,
    warm_each: bool = False,
) -> list[BenchResult]:
    """Time several models side by side (``time_interleaved``) at one batch size; the first is
    the baseline of ``speedup``. Returns each model's figures, with the intervals of its median
    latency and of its speedup, and the machine's load during the run.

    ``warmup`` is the most warm-up rounds, ``iters`` the most timed rounds (``stop`` may end
    them earlier; see ``time_interleaved`` for it and ``warm_each``)."""
    if batch_size < 1 or iters < 1 or warmup < 0:
        raise ValueError(f"need batch_size >= 1, iters >= 1, warmup >= 0; got {batch_size}, {iters}, {warmup}")
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    runnables = {name: as_runnable(m, threads) for name, m in models.items()}
    size = input_size or _input_size(next(iter(runnables.values())))
    images = torch.randn(batch_size, *size)
    runners = [runner_for(name, m, images, threads) for name, m in runnables.items()]
    timing = time_interleaved(runners, rounds=iters, max_warmup=warmup, stop=stop, warm_each=warm_each)
    return [_result(r, runnables[r.name], timing, batch_size, size, flops) for r in runners]


def _result(runner: Runner, model: nn.Module | OnnxModel, timing: Timing, batch_size: int,
            size: tuple[int, ...], flops: bool) -> BenchResult:
    latency, speedup = timing.latency_ms(runner.name), timing.ratio(runner.name)
    module = model if isinstance(model, nn.Module) else None
    return BenchResult(
        name=runner.name, runtime=runner.runtime, batch_size=batch_size, threads=runner.threads,
        latency_ms_median=latency.estimate, latency_ms_low=latency.low, latency_ms_high=latency.high,
        throughput=batch_size / (latency.estimate / 1e3),
        params_m=count_params(module) / 1e6 if module is not None else None,
        size_mb=size_on_disk_mb(model),
        gmacs_per_image=count_gmacs(module, size) if module is not None and flops else None,
        speedup=speedup.estimate, speedup_low=speedup.low, speedup_high=speedup.high,
        confidence=speedup.confidence, rounds=timing.rounds, disturbed=timing.disturbed, load=timing.load,
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
