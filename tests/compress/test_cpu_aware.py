"""CPU-aware search: candidates a CPU cannot run fast are left out (with the reason), and a
clearly losing candidate's timing stops early. CPU flags and timings are injected."""

import math
import random
from types import SimpleNamespace

import pytest

from conftest import make_tiny_vit, tiny_vit_source
from vitslim.bench import CpuFeatures, cpu_features
from vitslim.compress import Recipe, compress, load_recipe, write_report
from vitslim.compress import search as search_mod
from vitslim.compress.search import CandidateResult, Target, clearly_losing, clearly_meets, speedup_to_be_chosen
from vitslim.dtype import DtypeConfig
from vitslim.tokens import ToMeConfig

AVX2_ONLY = CpuFeatures.from_flags("fpu sse2 avx fma avx2")  # e.g. the AMD EPYC of the deploy table
ZEN4 = CpuFeatures.from_flags("avx2 avx512f avx512bw avx512_vnni avx512_bf16")
SAPPHIRE_RAPIDS = CpuFeatures.from_flags("avx2 avx512f avx512_vnni amx_tile amx_int8 amx_bf16")
F32 = (DtypeConfig("float32"),)  # a cheap real step: cosine 1 to FP32


def test_cpu_features_from_flags(tmp_path):
    assert (AVX2_ONLY.avx2, AVX2_ONLY.avx512, AVX2_ONLY.vnni, AVX2_ONLY.bf16) == (True, False, False, False)
    assert AVX2_ONLY.int8_isa == "AVX2, no VNNI"
    assert (ZEN4.vnni, ZEN4.bf16, ZEN4.amx, ZEN4.int8_isa) == (True, True, False, "AVX-512 VNNI")
    assert SAPPHIRE_RAPIDS.bf16 and SAPPHIRE_RAPIDS.amx  # AMX's bf16 tiles count as native bf16
    assert CpuFeatures.from_flags("avx2 avx_vnni").int8_isa == "AVX-VNNI"
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert cpu_features(info) == CpuFeatures(avx2=True, avx512=True, bf16=True, model_name="Test CPU 9000")
    assert cpu_features(tmp_path / "missing") .summary == "none of AVX2, AVX-512, VNNI, bf16, AMX"


def test_recipes_declare_what_they_need():
    for name in ("bf16", "bf16-tome", "bf16-tome-13"):
        [reason] = load_recipe(name).unmet_needs(AVX2_ONLY)
        assert reason.startswith("bf16: this CPU has no native bfloat16 (no AVX512_BF16/AMX)")
        assert load_recipe(name).unmet_needs(ZEN4) == load_recipe(name).unmet_needs(SAPPHIRE_RAPIDS) == []
    for name in ("fp32", "tome-8", "int8-fast", "ort-fp32"):
        assert load_recipe(name).unmet_needs(AVX2_ONLY) == []
    assert Recipe("f32", F32).unmet_needs(AVX2_ONLY) == []


def _search(images, tmp_path, cpu, recipes=None, **kw):
    return compress(make_tiny_vit(), images, kw.pop("target", "fidelity=0.9"), recipes=recipes, n_calib=4,
                    n_eval=8, batch_size=2, iters=kw.pop("iters", 2), cache_dir=tmp_path / "cache",
                    source=tiny_vit_source(), sensitivity_preset=None, cpu=cpu, **kw)


def test_default_grid_leaves_out_bf16_without_native_bf16(tmp_path, example_images, monkeypatch):
    monkeypatch.setattr(search_mod, "DEFAULT_GRID", ("fp32", "bf16", "bf16-tome"))
    result = _search(example_images, tmp_path, AVX2_ONLY)
    assert [c.name for c in result.candidates] == ["fp32"]
    assert [o["name"] for o in result.left_out] == ["bf16", "bf16-tome"]
    assert "PyTorch emulates it, several times slower than FP32" in result.left_out[0]["reason"]
    html, _ = write_report(result, tmp_path / "report", "tiny")  # report.md escapes its prose
    assert "Left out on this CPU: bf16 (bf16: this CPU has no native bfloat16" in html.read_text()
    assert result.to_dict()["left_out"] == result.left_out

    kept = _search(example_images, tmp_path, ZEN4)  # same cache: only the bf16 ones are new
    assert [c.name for c in kept.candidates] == ["fp32", "bf16", "bf16-tome"] and kept.left_out == []


def test_requested_candidate_runs_with_a_note(tmp_path, example_images):
    result = _search(example_images, tmp_path, AVX2_ONLY, recipes=["fp32", "bf16"])
    bf16 = result.candidates[1]
    assert bf16.name == "bf16" and bf16.error is None and bf16.cosine is not None and result.left_out == []
    assert bf16.note.startswith("run as requested, but bf16: this CPU has no native bfloat16")
    assert result.candidates[0].note is None
    _, md = write_report(result, tmp_path / "report", "tiny")
    assert "run as requested, but bf16" in md.read_text()
    assert _search(example_images, tmp_path, ZEN4, recipes=["bf16"]).candidates[0].note is None  # cached, no note


def test_clearly_losing_rule():
    fp32 = [100.0, 100.0, 100.0]
    assert not clearly_losing(fp32[:2], [200.0, 200.0], needed=2.0)  # too few rounds to tell
    assert clearly_losing(fp32, [200.0, 200.0, 200.0], needed=2.0)  # 0.5× at best: 0.625 < 2
    assert not clearly_losing(fp32, [200.0, 200.0, 200.0], needed=None)  # nothing to beat yet
    assert not clearly_losing(fp32, [200.0, 200.0, 60.0], needed=2.0)  # one round at 1.67×: 2.08 ≥ 2
    assert not clearly_losing(fp32, [55.0, 55.0, 55.0], needed=2.0)  # 1.82×: within the margin


def test_speed_needed_to_be_chosen():
    def cand(speedup=None, cosine=0.99):
        return CandidateResult({"name": "c"}, "k", cosine=cosine, speedup=speedup)

    speed2 = Target.parse("speedup=2")
    assert speedup_to_be_chosen(speed2, [], cand()) == 2  # the target, nothing done yet
    assert speedup_to_be_chosen(speed2, [cand(1.5, 0.999)], cand()) == 1.5  # to be the closest
    feasible = cand(3.0, 0.998)
    assert speedup_to_be_chosen(speed2, [feasible], cand(cosine=0.999)) == 2  # more faithful: may win
    assert speedup_to_be_chosen(speed2, [feasible], cand(cosine=0.998)) == math.inf  # the first is kept
    assert speedup_to_be_chosen(speed2, [feasible], cand(cosine=0.95)) == math.inf
    assert speedup_to_be_chosen(Target.parse("fidelity=0.99"), [feasible, cand(4.0, 0.98)], cand()) == 3.0


def _fake_compare(true_speedups: dict[str, float], noise: float, seed: int, log: dict):
    """compare() with simulated batch times: FP32 100 ms, the candidate 100 / speedup ms, each
    time scaled by a random factor within ±noise (another job sharing the CPU)."""
    rng = random.Random(seed)

    def compare(models, batch_size, warmup, iters, flops, stop):
        if len(models) == 1:  # the original, timed alone
            log["FP32 alone"] = iters
            return [SimpleNamespace(speedup=1.0, throughput=batch_size / 100 * 1e3, latency_ms_median=100,
                                    size_mb=1.0, runtime="pytorch")]
        name = list(models)[1]
        times = {"FP32": [], name: []}
        for _ in range(iters):
            times["FP32"].append(100 * rng.uniform(1 - noise, 1 + noise))
            times[name].append(100 / true_speedups[name] * rng.uniform(1 - noise, 1 + noise))
            if stop(SimpleNamespace(times_ms=times)):
                break
        log[name] = len(times[name])
        ms = sorted(times[name])[len(times[name]) // 2]
        base = sorted(times["FP32"])[len(times["FP32"]) // 2]
        cand = SimpleNamespace(speedup=base / ms, throughput=batch_size / ms * 1e3, latency_ms_median=ms,
                               size_mb=1.0, runtime="pytorch")
        return [SimpleNamespace(speedup=1.0), cand]

    return compare


def test_margin_covers_ten_percent_noise():
    # each batch time within ±10% (a ratio within 0.9/1.1..1.1/0.9, inside the 1.25 margin): a
    # candidate that truly reaches what it needs is never stopped, one at half of it always is
    rng = random.Random(0)
    for _ in range(500):
        needed, rounds = rng.uniform(1, 5), rng.randint(3, 8)
        fp32 = [100 * rng.uniform(0.9, 1.1) for _ in range(rounds)]

        def noisy(speedup: float, rounds: int = rounds) -> list[float]:
            return [100 / speedup * rng.uniform(0.9, 1.1) for _ in range(rounds)]

        assert not clearly_losing(fp32, noisy(needed * rng.uniform(1, 2)), needed)
        assert clearly_losing(fp32, noisy(needed / 2), needed)
        # and the other way: one below a speed target never passes for clearly meeting it,
        # one at twice the target always does
        assert not clearly_meets(fp32, noisy(needed * rng.uniform(0.5, 1)), needed)
        assert clearly_meets(fp32, noisy(needed * 2), needed)


@pytest.mark.parametrize("seed", range(2))
def test_early_stop_stops_losers_never_the_winner(tmp_path, example_images, monkeypatch, seed):
    # speedup=2: "slow" cannot be chosen ("fp32", the original, is timed alone: 1× by definition);
    # "winner" meets 2× first (then "fast" also meets it at the same cosine, and the first
    # feasible of equal fidelity is kept).
    true = {"fp32": 1.0, "slow": 0.5, "winner": 2.4, "almost": 1.8, "near": 2.2, "fast": 4.0}
    log: dict[str, int] = {}
    monkeypatch.setattr(search_mod, "compare", _fake_compare(true, noise=0.1, seed=seed, log=log))
    def tome(r, prop=True):
        return (ToMeConfig(r=r, prop_attn=prop),)

    # distinct steps (the cache key), and the winner the most faithful of the feasible ones
    grid = [Recipe("fp32"), Recipe("slow", tome(1)), Recipe("winner", F32), Recipe("almost", tome(2)),
            Recipe("near", tome(3)), Recipe("fast", tome(1, False))]
    result = _search(example_images, tmp_path, ZEN4, recipes=grid, target="speedup=2", iters=8)
    stopped = {c.name: c.stopped_early for c in result.candidates}
    # 'winner' (2.4×) is not stopped: its worst batch ÷ 1.25 may be below 2; 'almost' (1.8× within
    # the margin of 2×) is, because 'winner' meets 2× more faithfully (cosine 1): it cannot be chosen
    # however fast it is; 'fast' (4×) clearly meets 2×
    assert stopped == {"fp32": None, "slow": 3, "winner": None, "almost": 3, "near": 3, "fast": 3}
    assert log == {"FP32 alone": 8, "slow": 3, "winner": 8, "almost": 3, "near": 3, "fast": 3}
    assert result.candidates[0].speedup == 1.0
    assert "clearly meets the speed target" in result.candidates[-1].note
    # 'near' (2.2×) was stopped because it cannot be chosen, not because it clearly meets 2×,
    # though its median is above 2×: the note must not say it clearly meets the target
    near = next(c for c in result.candidates if c.name == "near")
    assert near.speedup >= 2 and "clearly meets" not in (near.note or "")
    assert result.chosen.name == "winner" and result.met
    unstopped = _search(example_images, tmp_path / "no-stop", ZEN4, recipes=grid, target="speedup=2", iters=8,
                        early_stop=False)
    assert unstopped.chosen.name == "winner" and all(c.stopped_early is None for c in unstopped.candidates)
    _, md = write_report(result, tmp_path / "report", "tiny")
    assert "stopped early: " in md.read_text() and "× after 3 batches" in md.read_text()


def test_a_model_without_vit_blocks_gets_the_candidates_that_apply(tmp_path, example_images):
    """EfficientViT has no ViT blocks: the default grid tries only what applies to any timm model
    (int8 via the hybrid quantizer) and the report says which ViT candidates were not tried."""
    import timm
    import torch

    from vitslim.deploy import ModelSource

    kwargs = {"num_classes": 10, "pretrained_cfg_overlay": {"input_size": [3, 96, 96]}}  # small and quick
    torch.manual_seed(0)
    model = timm.create_model("efficientvit_b0", pretrained=False, **kwargs).eval()
    result = compress(model, example_images, "fidelity=0.5", n_calib=4, n_eval=4, batch_size=2, iters=1,
                      cache_dir=tmp_path / "cache", source=ModelSource("efficientvit_b0", timm_kwargs=kwargs),
                      sensitivity_preset=None, cpu=AVX2_ONLY)
    assert [c.name for c in result.candidates] == ["fp32", "ort-fp32", "int8-hybrid"]
    assert all(c.error is None for c in result.candidates), [c.error for c in result.candidates]
    assert "int8-fast" in result.not_applicable and "tome-8" in result.not_applicable
    html, _ = write_report(result, tmp_path / "report", "effvit")
    not_tried = html.read_text().split("Not tried: ", 1)[1].split("<", 1)[0]
    assert "tome-8" in not_tried and "int8-fast" in not_tried and "ort-fp32" not in not_tried
