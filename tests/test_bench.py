import math
import random
import subprocess
import sys
import time

import pytest
import torch

from conftest import FakeClock, make_tiny_vit
from vitslim.bench import (
    Interval,
    LoadWatch,
    OnnxModel,
    Runner,
    compare,
    count_gmacs,
    decimals_for,
    median_interval,
    read_cpu_times,
    time_interleaved,
)


class QuietWatch(LoadWatch):
    """Load recorded from a fixed pair of /proc snapshots (no other process)."""

    def __init__(self, clock) -> None:
        snaps = iter([read_cpu_times("cpu 100 0 100 800 0 0 0 0", "1 (x) R " + "0 " * 10 + "100 100"),
                      read_cpu_times("cpu 200 0 100 1700 0 0 0 0", "1 (x) R " + "0 " * 10 + "200 100")])
        super().__init__(clock, lambda: next(snaps))


def fake_timing(clock, runners, rounds, **kwargs):
    return time_interleaved(runners, rounds=rounds, clock=clock, sleep=clock.sleep, watch=QuietWatch(clock),
                            **kwargs)


def test_macs_are_counted_not_estimated():
    model = torch.nn.Sequential(torch.nn.Linear(100, 30), torch.nn.ReLU(), torch.nn.Linear(30, 7))
    assert count_gmacs(model, (100,)) * 1e9 == 100 * 30 + 30 * 7


def test_median_interval_is_the_sign_test_interval():
    # n = 10: [x_2, x_9] covers the median with probability 1 - 2 * 11/1024 (x_3..x_8 would be 0.89 < 0.95)
    iv = median_interval([float(v) for v in range(10, 0, -1)])
    assert (iv.low, iv.high, iv.estimate) == (2.0, 9.0, 5.5)
    assert iv.confidence == pytest.approx(1 - 2 * 11 / 1024)
    few = median_interval([3.0, 1.0, 2.0])  # too few rounds for 95 %: the range, and what it covers
    assert (few.low, few.high) == (1.0, 3.0) and few.confidence == pytest.approx(0.75)


def seeded_noisy_timing(clock: FakeClock, seed: int):
    """Fake models of 30 ms and 10 ms per batch (ratio 3): each round the whole machine is
    slowed by 1.6 (a third of the rounds) or not, shared by both, plus 5 % independent noise."""
    rng, machine = random.Random(seed), [1.0]

    def noisy(ms):
        return lambda: ms / 1e3 * machine[0] * math.exp(rng.gauss(0, 0.05))

    def next_round(timing) -> bool:
        machine[0] = rng.choice([1.0, 1.0, 1.6])
        return False

    return fake_timing(clock, [clock.runner("base", noisy(30.0)), clock.runner("fast", noisy(10.0))], rounds=10,
                       stop=next_round)


def test_intervals_cover_the_true_ratio_at_their_stated_rate():
    """Over 300 seeded runs of 10 rounds the interval covers the true ratio 3 at least at its
    stated rate (minus sampling slack), and it is narrower than the spread the shared
    slowdowns give single timings."""
    clock = FakeClock()
    timings = [seeded_noisy_timing(clock, seed) for seed in range(300)]
    intervals = [t.ratio("fast") for t in timings]
    covered = sum(iv.low <= 3.0 <= iv.high for iv in intervals) / len(intervals)
    assert intervals[0].confidence > 0.97 and covered >= 0.93
    latency = timings[0].latency_ms("base")
    assert latency.high / latency.low > intervals[0].high / intervals[0].low  # interleaving cancels shared slowdowns


def test_warmup_lasts_until_the_times_stop_falling():
    clock = FakeClock()
    first_times = iter([0.5, 0.2, 0.1, 0.05])  # falling for four calls, then steady at 10 ms

    timing = fake_timing(clock, [clock.runner("m", lambda: next(first_times, 0.01))], rounds=3)
    # 500, 200, 100, 50, 10 ms are each below 95 % of the best before them; the second 10 ms is not
    assert timing.warmup_rounds == 6
    assert timing.times_ms["m"] == pytest.approx([10.0] * 3)
    capped = fake_timing(clock, [clock.runner("m", lambda: 0.01)], rounds=1, max_warmup=1)
    assert capped.warmup_rounds == 1


def test_settle_pause_follows_each_run_and_is_not_timed():
    clock = FakeClock()
    ort_like = clock.runner("spins", lambda: 0.02, settle_s=0.1)
    eager = clock.runner("eager", lambda: 0.02)
    start = clock.now
    timing = fake_timing(clock, [ort_like, eager], rounds=4, max_warmup=0)
    assert clock.now - start == pytest.approx(4 * (0.02 + 0.1 + 0.02))
    assert timing.times_ms["spins"] == pytest.approx([20.0] * 4)


def test_stop_ends_the_timing_after_a_round():
    clock = FakeClock()
    timing = fake_timing(clock, [clock.runner("a", lambda: 0.01), clock.runner("b", lambda: 0.02)], rounds=50,
                         stop=lambda t: t.rounds >= 7)
    assert timing.rounds == 7 and timing.ratio("b").estimate == pytest.approx(0.5)


def test_precision_follows_the_interval():
    assert decimals_for(3.0, 3.8) == 1 and decimals_for(3.40, 3.45) == 2 and decimals_for(2.0, 5.0) == 0
    assert Interval(3.4213, 3.02, 3.81, 0.95, 10).text() == "3.4× (3.0–3.8)"
    assert Interval(1.3312, 1.31, 1.36, 0.95, 10).text() == "1.33× (1.31–1.36)"
    assert Interval(31.234, 30.9, 31.61, 0.95, 10).ms_text() == "31.2 ms (30.9–31.6)"
    assert Interval(1237.2, 1200.0, 1290.0, 0.95, 10).ms_text() == "1237 ms (1200–1290)"


def test_cpu_times_parse_proc_files():
    times = read_cpu_times("cpu  10 1 5 100 3 2 4 7 0 0\ncpu0 ...", "42 (a b) c) S " + "0 " * 10 + "11 22 0")
    assert (times.busy, times.steal, times.total, times.own) == (10 + 1 + 5 + 2 + 4, 7, 132, 33)


def test_a_busy_process_beside_the_timing_flags_the_run():
    """A real process spinning on a core during the timing takes about half of this machine's
    two cores (a quarter of four): far above the disturbance threshold."""
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        timing = time_interleaved([Runner("sleeper", lambda: time.sleep(0.05))], rounds=10, max_warmup=0)
    finally:
        busy.kill()
        busy.wait()
    assert timing.disturbed and timing.load.others_share > 0.15
    assert "other processes used" in timing.load.describe()


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
    assert ort.speedup_low <= ort.speedup <= ort.speedup_high and ort.rounds == 3
    assert ort.threads == 1 and eager.gmacs_per_image > 0 and ort.size_mb > 0
    assert eager.load is not None and eager.load.seconds > 0


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
