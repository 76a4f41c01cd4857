"""Integer-only I-ViT ops (Li & Gu, "I-ViT", ICCV 2023): bit-exact against naive Python-int
references, accurate on real DINOv2 activations, and usable inside a PyTorch ViT."""

import copy
import math
import random

import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_vit
from vitslim.quant.integer import (
    DIV_BITS,
    EXP_RANGE,
    FRAC_BITS,
    NORM_BITS,
    IntegerGELU,
    IntegerLayerNorm,
    IntegerSoftmax,
    calibrating,
    dyadic,
    i_layernorm,
    isqrt_newton,
    shift_gelu,
    shiftmax,
    use_integer_ops,
)

# ---- deliberately naive references: Python ints, one value at a time, the same formulas ----


def _round_shift(x: int, k: int) -> int:
    return (x + (1 << (k - 1))) >> k


def _fixed(x: int, scale: float) -> int:
    m, k = dyadic(scale * 2**FRAC_BITS)
    return _round_shift(x * m, k)


def _exp(t: int) -> int:
    t = max(t + (t >> 1) - (t >> 4), -(EXP_RANGE << FRAC_BITS))
    z = (-t) >> FRAC_BITS
    p = -t - (z << FRAC_BITS)
    return ((2 << FRAC_BITS) - p) << (EXP_RANGE - z)


def _divide(e: int, total: int, bits: int) -> int:
    return _round_shift(e * ((1 << DIV_BITS) // total), DIV_BITS - bits)


def naive_shiftmax(row: list[int], scale: float, out_bits: int) -> list[int]:
    top = max(row)
    exps = [_exp(_fixed(v - top, scale)) for v in row]
    total = sum(exps)
    return [min(_divide(e, total, out_bits), 2**out_bits - 1) for e in exps]


def naive_gelu(v: int, scale: float, out_bits: int) -> int:
    t = _fixed(-abs(v), scale)
    e = _exp(t + (t >> 1) + (t >> 3) + (t >> 4))
    half = _divide(e, e + (1 << (FRAC_BITS + 1 + EXP_RANGE)), out_bits - 1)
    return v * ((1 << (out_bits - 1)) - half if v >= 0 else half)


def naive_layernorm(row, scale, weight, bias, out_bits, eps, out_scale) -> list[int]:
    c, lim = len(row), 2 ** (out_bits - 1) - 1
    ys = [c * v - sum(row) for v in row]
    std = max(math.isqrt(sum(y * y for y in ys) + round(eps * c**3 / scale**2)), 1)
    out = []
    for y, g, b in zip(ys, weight, bias):
        m, k = dyadic(g * math.sqrt(c) / (2**NORM_BITS * out_scale))
        out.append(max(-lim, min(lim, _round_shift(y * ((1 << NORM_BITS) // std) * m, k) + round(b / out_scale))))
    return out


def _ints(n: int, lo: int = -127, hi: int = 127, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(lo, hi) for _ in range(n)]


# ---- bit-exactness ----


def test_dyadic_is_accurate_to_its_bits():
    for scale in [1e-9, 3e-4, 0.1, 0.7, 1.0, 1.702, 37.5, -0.013, -2.5]:
        m, k = dyadic(scale, bits=16)
        assert 2**15 <= abs(m) < 2**16 and k >= 1
        assert abs(m / 2**k - scale) <= abs(scale) * 2**-16
    assert dyadic(0.0) == (0, 1) and dyadic(1e-30) == (0, 1)


def test_isqrt_newton_is_exact_on_int64():
    rng = random.Random(0)
    vals = [rng.randrange(1, 2 ** rng.randrange(1, 63)) for _ in range(20000)]
    vals += [j * j + d for j in range(1, 300) for d in (-1, 0, 1)] + [2**62 - 1, 2**63 - 1]
    expected = torch.tensor([max(math.isqrt(v), 1) for v in vals])  # documented: sqrt(max(v, 1))
    assert torch.equal(isqrt_newton(torch.tensor(vals)), expected)


@pytest.mark.parametrize("scale,out_bits", [(0.02, 8), (0.15, 8), (0.6, 8), (3.0, 8), (0.15, 12)])
def test_shiftmax_matches_naive_python(scale, out_bits):
    rows = [_ints(97, seed=s) for s in range(3)] + [[5] * 97, [-127] * 96 + [127]]
    q = torch.tensor(rows, dtype=torch.int32)
    p, p_scale = shiftmax(q, scale, out_bits)
    assert p_scale == 2.0**-out_bits and p.dtype == torch.int32
    assert torch.equal(p, torch.tensor([naive_shiftmax(r, scale, out_bits) for r in rows], dtype=torch.int32))
    assert torch.equal(shiftmax(q.T, scale, out_bits, dim=0)[0], p.T)


@pytest.mark.parametrize("scale,out_bits", [(0.01, 8), (0.06, 8), (0.3, 8), (2.0, 8), (0.06, 12)])
def test_shift_gelu_matches_naive_python(scale, out_bits):
    values = list(range(-127, 128))  # every int8
    out, out_scale = shift_gelu(torch.tensor(values), scale, out_bits)
    assert out_scale == pytest.approx(scale * 2.0 ** (1 - out_bits))
    assert torch.equal(out, torch.tensor([naive_gelu(v, scale, out_bits) for v in values], dtype=torch.int32))


@pytest.mark.parametrize("out_scale", [None, 0.03])
def test_i_layernorm_matches_naive_python(out_scale):
    torch.manual_seed(0)
    c, scale, eps = 48, 0.05, 1e-5
    weight, bias = torch.randn(c) * 2, torch.randn(c) * 0.5  # negative gammas included
    rows = [_ints(c, seed=s) for s in range(5)] + [[3] * c, [0] * (c - 1) + [127]]  # constant: eps only
    out, used_scale = i_layernorm(torch.tensor(rows), scale, weight, bias, 8, eps, out_scale)
    expected = [naive_layernorm(r, scale, weight.tolist(), bias.tolist(), 8, eps, used_scale) for r in rows]
    assert torch.equal(out, torch.tensor(expected, dtype=torch.int32))
    if out_scale is None:  # default scale: the largest possible output is not clipped
        assert out.abs().max() < 127


# ---- error against float on real activations of the reference model ----


@pytest.fixture(scope="module")
def activations(reference_model, example_images):
    """Pre-softmax logits, fc1 outputs and norm1 inputs of all 12 blocks on 2 real images."""
    from vitslim import load_image_folder

    dataset = load_image_folder(example_images, reference_model, limit=2)
    images = torch.stack([dataset[i][0] for i in range(2)])
    seen = {"logits": [], "fc1": [], "norm1": []}

    def logits(attn, args):
        x = args[0]
        qkv = attn.qkv(x).reshape(*x.shape[:2], 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        seen["logits"].append((qkv[0] * attn.scale) @ qkv[1].transpose(-2, -1))

    hooks = []
    for block in reference_model.blocks:
        hooks += [block.attn.register_forward_pre_hook(logits),
                  block.mlp.fc1.register_forward_hook(lambda m, a, out: seen["fc1"].append(out)),
                  block.norm1.register_forward_pre_hook(lambda m, a: seen["norm1"].append((m, a[0])))]
    with torch.no_grad():
        reference_model(images)
    for h in hooks:
        h.remove()
    return seen


def _int8(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    scale = float(x.abs().max()) / 127
    return torch.round(x / scale).long(), scale


def _mae(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().mean().item()


@torch.no_grad()
def test_shiftmax_error_on_real_attention_logits(activations):
    # Measured (2 example images, 12 blocks, 2x6x257x257 logits each, int8 in, uint8 out):
    # MAE mean 0.00085, worst block 0.00195 (block 3, logit scale 2.45); mean prob is 1/257 = 0.0039.
    # Float softmax on the same int8 inputs alone: 0.00011-0.0018 (the 2^-p ≈ 1 - p/2 form adds the rest).
    errors = [_mae(shiftmax(*_int8(x))[0] / 256, x.softmax(-1)) for x in activations["logits"]]
    assert sum(errors) / len(errors) < 0.0017 and max(errors) < 0.004, errors


@torch.no_grad()
def test_shift_gelu_error_on_real_fc1_outputs(activations):
    # Measured (2 example images, 12 blocks, 2x257x1536 each): MAE mean 0.0103, worst 0.0142
    # (mean |GELU| 0.10-0.25). Split: int8 input alone 0.0046; float x·σ(1.702x) on int8 inputs 0.0091
    # (the sigmoid form of GELU is most of it); float x·σ(1.6875x) 0.0093.
    errors = []
    for x in activations["fc1"]:
        out, scale = shift_gelu(*_int8(x))
        errors.append(_mae(out * scale, F.gelu(x)))
    assert sum(errors) / len(errors) < 0.021 and max(errors) < 0.029, errors


@torch.no_grad()
def test_i_layernorm_error_on_real_block_inputs(activations):
    # Measured (2 example images, 12 blocks' norm1 inputs, 2x257x384 each; output int8 with
    # scale = float absmax/127): MAE mean 0.116, worst 0.177 (mean |LN out| 0.66-1.53). Nearly all of
    # it is the per-tensor int8 input (DINOv2's residual stream has outlier channels): float LN on
    # the same int8 input, output rounded to the same grid, is within 16% of the integer LN.
    errors = []
    for norm, x in activations["norm1"]:
        ref = F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps)
        q, scale = _int8(x)
        out_scale = float(ref.abs().max()) / 127
        out, _ = i_layernorm(q, scale, norm.weight, norm.bias, 8, norm.eps, out_scale)
        float_on_int8 = norm(q * scale).div(out_scale).round().clamp(-127, 127) * out_scale
        errors.append(_mae(out * out_scale, ref))
        assert errors[-1] < 1.25 * _mae(float_on_int8, ref)
    assert sum(errors) / len(errors) < 0.23 and max(errors) < 0.36, errors


# ---- inside a model ----


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.flatten(1), b.flatten(1))


def test_modules_need_calibration_then_match_the_functions():
    norm = torch.nn.LayerNorm(16)
    op, x = IntegerLayerNorm(norm), torch.randn(4, 16)
    with pytest.raises(RuntimeError, match="not calibrated"):
        op(x)
    with calibrating(op), torch.no_grad():
        assert torch.equal(op(x), norm(x))
        out = op(x)  # calibrating: float
    q, scale = op.quantize(x)
    expected, out_scale = i_layernorm(q, scale, norm.weight, norm.bias, 8, norm.eps, float(op.out_absmax) / 127)
    assert torch.allclose(op(x), expected * out_scale) and not torch.equal(op(x), out)


@torch.no_grad()
def test_integer_ops_inside_tiny_vit():
    # Measured (8 held-out random inputs): patch-token features cosine > 0.99995, CLS token
    # 0.964-0.987, so logits 0.90-0.99. The random model's CLS token is ~1e-6 while patch tokens reach
    # 2.5, so per-tensor int8 inputs to norm1 flatten its row; float LN on the same int8 inputs loses
    # just as much: it is the 8-bit input quantization, not the integer ops.
    model = make_tiny_vit()
    x = torch.randn(16, 3, 32, 32)
    integer = use_integer_ops(copy.deepcopy(model))
    with calibrating(integer):
        integer(x[:8])
    tokens = F.cosine_similarity(integer.forward_features(x[8:]), model.forward_features(x[8:]), dim=-1)
    assert tokens[:, 1:].min() > 0.999 and tokens[:, 0].min() > 0.93, tokens


@torch.no_grad()
def test_integer_ops_inside_the_reference_model(reference_model, example_images):
    # Measured: calibrated on 2 example images, evaluated on 4 others, all 12 blocks' LayerNorms,
    # GELUs and softmaxes integer: output (CLS embedding) cosine 0.956-0.988 (mean 0.976). With
    # LN+GELU only: 0.969-0.991; GELU alone 0.968-0.994 (the x·σ(1.702x) form); LN alone > 0.993.
    from vitslim import load_image_folder

    dataset = load_image_folder(example_images, reference_model, limit=6)
    images = torch.stack([dataset[i][0] for i in range(6)])
    integer = use_integer_ops(copy.deepcopy(reference_model))
    with calibrating(integer):
        integer(images[:2])
    cos = _cosines(integer(images[2:]), reference_model(images[2:]))
    assert cos.mean() > 0.95 and cos.min() > 0.92, cos


@torch.no_grad()
def test_integer_ops_inside_a_quantized_model():
    from vitslim import quant

    model = make_tiny_vit()
    x = torch.randn(16, 3, 32, 32)
    qmodel = quant.quantize_(copy.deepcopy(model), quant.preset("w8a8-int"), x[:8])
    integer = use_integer_ops(copy.deepcopy(qmodel))
    assert all(isinstance(b.attn.softmax_op, IntegerSoftmax) for b in integer.blocks)
    with calibrating(integer):
        assert torch.equal(integer(x[:8]), qmodel(x[:8]))  # calibrating: the float ops
    out, ref = integer.forward_features(x[8:]), qmodel.forward_features(x[8:])
    assert not torch.equal(out, ref)
    assert F.cosine_similarity(out, ref, dim=-1)[:, 1:].min() > 0.999


@torch.no_grad()
@pytest.mark.parametrize("op", [IntegerSoftmax(), IntegerGELU(), IntegerLayerNorm(torch.nn.LayerNorm(17))],
                         ids=["shiftmax", "shift_gelu", "i_layernorm"])
def test_integer_ops_export_to_onnx_runtime_bit_exact(op, tmp_path):
    import onnxruntime as ort

    x = torch.randn(2, 3, 17, 17) * 4
    with calibrating(op):
        op(x)
    path = tmp_path / "op.onnx"
    torch.onnx.export(op, (x,), str(path), opset_version=17, dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert torch.equal(torch.from_numpy(out), op(x))
