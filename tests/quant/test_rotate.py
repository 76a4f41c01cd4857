"""Rotations folded into the weights (QuaRot/SpinQuant on SliceGPT's RMSNorm form)."""

import copy
from dataclasses import replace

import pytest
import timm
import torch

import vitslim
from vitslim import quant
from vitslim.artifact import ModelSource
from vitslim.errors import ConfigError
from vitslim.quant.config import describe, vit_config
from vitslim.quant.rotate import HadamardRotation, rotate, rotation_matrix, sylvester_hadamard

# DINOv2-like: LayerScale, LayerNorm with bias, class token + position embedding; width
# 96 = 3·32 (not a power of two, like 384 = 3·128), head dim 32.
DINO_KWARGS = dict(img_size=28, depth=2, embed_dim=96, num_heads=3, init_values=0.5)


def tiny_dino(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, **DINO_KWARGS).eval()
    with torch.no_grad():  # non-trivial LayerNorm scales/biases, layer scales and biases
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def features(model, x):
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True)


@pytest.mark.parametrize("kind", ["hadamard", "hadamard-online", "random"])
def test_rotation_leaves_fp32_outputs_unchanged(kind):
    model, x = tiny_dino(), torch.randn(3, 3, 28, 28)
    rotated = rotate(copy.deepcopy(model), kind)
    ref = features(model, x)
    assert (features(rotated, x) - ref).abs().max() < 1e-4 * ref.abs().max()
    # ...while the weights really changed: the stream is rotated (no LayerNorm is left).
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in rotated.modules())
    assert not torch.allclose(rotated.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight, atol=1e-3)


def test_kronecker_hadamard_is_orthogonal_and_online_equals_dense():
    for dim in (96, 128, 384):
        q = rotation_matrix(dim, "hadamard", seed=3)
        assert torch.allclose(q @ q.T, torch.eye(dim, dtype=q.dtype), atol=1e-6)
    rot, x = HadamardRotation(96, seed=1), torch.randn(5, 96)
    assert torch.allclose(rot(x).double(), x.double() @ rot.matrix(), atol=1e-5)


def test_hadamard_rotation_is_its_documented_matrix():
    # Rotated models are saved as signs and mixes, so Q must stay diag(signs)·(M ⊗ H_p)/√p with
    # H_p Sylvester's: entry (i, j) = (-1)^popcount(i & j).
    for n in (1, 2, 8, 32, 512):
        i = torch.arange(n)
        expected = 1 - 2 * (torch.tensor([bin(v).count("1") for v in (i[:, None] & i).flatten()]) % 2)
        assert torch.equal(sylvester_hadamard(n), expected.reshape(n, n).float())
    for dim in (384, 1536, 64):
        rot = HadamardRotation(dim, seed=2).double()
        p = dim & -dim
        q = torch.diag(rot.signs) @ torch.kron(rot.mix.contiguous(), sylvester_hadamard(p, torch.float64)) / p ** 0.5
        x = torch.randn(2, 5, dim, dtype=torch.float64)
        assert torch.allclose(rot(x), x @ q)


def test_rotation_makes_w4a4_survive_planted_outlier_channels():
    """QuaRot's claim on a case where it matters: a few residual channels 30x larger than the
    rest dominate the per-tensor 4-bit range of every linear input; rotated, they do not."""
    model = tiny_dino(1)
    with torch.no_grad():
        model.patch_embed.proj.weight[[5, 40]] *= 30
        model.patch_embed.proj.bias[[5, 40]] *= 30
        for t in (model.cls_token, model.pos_embed, *(b.mlp.fc2.bias for b in model.blocks)):
            t[..., [5, 40]] *= 30
    x = torch.randn(24, 3, 28, 28)
    calib, test = x[:16], x[16:]
    base = vit_config(4, 4, softmax="sulq", gelu="sulq", ln_reparam=False)
    ref = features(model, test)

    def cosine(config):
        qmodel = quant.quantize_(copy.deepcopy(model), config, calib)
        return torch.nn.functional.cosine_similarity(features(qmodel, test), ref).mean()

    plain, rotated = cosine(base), cosine(replace(base, rotation="hadamard"))
    assert rotated > plain + 0.05, (float(plain), float(rotated))


def test_rotated_quantized_model_reloads_identically(tmp_path):

    model, x = tiny_dino(), torch.randn(8, 3, 28, 28)
    config = replace(vit_config(4, 4, gelu="uniform", ln_reparam=False), rotation="hadamard-online", rotation_seed=7)
    qmodel = quant.quantize_(copy.deepcopy(model), config, x)
    vitslim.save(qmodel, tmp_path / "q", ModelSource("vit_small_patch14_dinov2", timm_kwargs=DINO_KWARGS))
    loaded = vitslim.load(tmp_path / "q").model
    assert torch.equal(features(loaded, x), features(qmodel, x))
    assert "hadamard-online rotation (seed 7)" in describe(config)


def test_rotation_config_errors_name_the_conflict():
    with pytest.raises(ConfigError, match="ln_reparam"):
        replace(vit_config(4, 4), rotation="hadamard")
    with pytest.raises(ConfigError, match="post_gelu needs the uniform"):
        replace(vit_config(4, 4, ln_reparam=False), rotation="hadamard-online")
    with pytest.raises(ConfigError, match="not one of"):
        replace(vit_config(4, 4, ln_reparam=False), rotation="givens")


def test_online_rotation_exports_to_onnx_as_graph_ops(tmp_path):
    """The online Hadamard before fc2 is part of the exported graph (matmuls, no custom op)."""
    onnxruntime = pytest.importorskip("onnxruntime")
    from vitslim.export import export_onnx

    model, x = rotate(tiny_dino(), "hadamard-online"), torch.randn(2, 3, 28, 28)
    session = onnxruntime.InferenceSession(str(export_onnx(model, tmp_path / "rotated.onnx")))
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert abs(out - model(x).detach().numpy()).max() < 1e-4
    # The quantized model too (the fake-quant export path traces the rotation again).
    calib, held_out = torch.randn(8, 3, 28, 28), torch.randn(4, 3, 28, 28)
    qmodel = quant.quantize_(tiny_dino(), replace(quant.preset("w4a4"), reconstruction_iters=0), calib)
    from vitslim.export import validate_onnx

    check = validate_onnx(qmodel, export_onnx(qmodel, tmp_path / "w4a4.onnx"), held_out)
    assert check["cosine"] > 0.95, check  # not ~1: at 4 bits ORT's float rounding moves a few codes


def test_integer_ops_refuse_a_rotated_model():
    from vitslim.models import UnsupportedModelError
    from vitslim.quant.integer import use_integer_ops

    with pytest.raises(UnsupportedModelError, match="rotated"):
        use_integer_ops(rotate(tiny_dino()))
