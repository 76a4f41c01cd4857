import copy

import pytest
import timm
import torch

from conftest import make_tiny_vit
from vitslim import load_image_folder, tokens
from vitslim.models import UnsupportedModelError
from vitslim.tokens.tome import bipartite_soft_matching, merge_wavg

NEUTRAL = [("tome", {"r": 0}), ("evit", {"keep_rate": 1.0}), ("ats", {"budget": 1.0})]
ACTIVE = [("tome", {"r": 3}), ("evit", {"keep_rate": 0.5, "blocks": [1]}), ("ats", {"budget": 0.5, "blocks": [1]})]


def _model(depth=3):
    return make_tiny_vit(depth=depth, img_size=64)  # 64 patches + class token


@pytest.mark.parametrize("method,params", NEUTRAL)
def test_neutral_settings_leave_outputs_identical(method, params):
    model, x = _model(), torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        tokens.reduce_tokens_(model, tokens.token_config(method, **params))
        assert torch.equal(model(x), before)
        assert tokens.token_state(model).counts == [65, 65, 65]


@pytest.mark.parametrize("method,params", ACTIVE)
def test_remove_restores_bit_for_bit(method, params):
    model, x = _model(), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        tokens.reduce_tokens_(model, tokens.token_config(method, **params))
        assert not torch.equal(model(x), before)
        tokens.remove(model)
        assert torch.equal(model(x), before)
    assert tokens.token_state(model) is None and "forward" not in model.blocks[0].__dict__


def test_tome_counts_follow_the_schedule():
    model = _model()
    tokens.reduce_tokens_(model, tokens.ToMeConfig(r=[5, 0, 12]))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert tokens.token_state(model).counts == [60, 60, 48]


def test_evit_counts_keep_rate_plus_fused_token():
    model = _model()
    tokens.reduce_tokens_(model, tokens.EViTConfig(keep_rate=0.5, blocks=[0, 2]))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    # block 0: 1 cls + 32 kept + 1 fused = 34; block 2: 1 + ceil(0.5 * 33) + 1 = 19
    assert tokens.token_state(model).counts == [34, 34, 19]


def test_merging_preserves_the_size_weighted_mean():
    torch.manual_seed(0)
    x, size = torch.randn(2, 41, 16), torch.randint(1, 5, (2, 41, 1)).float()
    merge = bipartite_soft_matching(torch.randn(2, 41, 8), r=10, num_prefix=1)
    merged, new_size = merge_wavg(merge, x, size)
    assert merged.shape == (2, 31, 16)
    torch.testing.assert_close((merged * new_size).sum(1), (x * size).sum(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new_size.sum(1), size.sum(1))
    assert torch.equal(merged[:, 0], x[:, 0])  # the class token is never merged


def test_distillation_token_is_kept_in_place():
    x = torch.randn(2, 30, 8)
    merge = bipartite_soft_matching(torch.randn(2, 30, 8), r=9, num_prefix=2)
    out = merge(x)
    assert out.shape == (2, 21, 8) and torch.equal(out[:, :2], x[:, :2])
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=64, depth=2).eval()
    tokens.reduce_tokens_(model, tokens.ToMeConfig(r=[8, 4]))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert tokens.token_state(model).counts == [10, 6]


def test_ats_adapts_token_count_per_image(reference_model, example_images):
    dataset = load_image_folder(example_images, reference_model, limit=6)
    x = torch.stack([dataset[i][0] for i in range(6)])
    model = tokens.reduce_tokens_(copy.deepcopy(reference_model), tokens.ATSConfig(budget=0.5))
    with torch.no_grad():
        batched = model(x)
        counts = tokens.token_state(model).image_counts.tolist()
        single = torch.cat([model(x[i : i + 1]) for i in range(6)])
    assert len(set(counts)) > 1, counts  # different images keep different numbers of tokens
    assert max(counts) <= 1 + 128 + 1
    # Padding + masking gives each image the result it gets alone.
    torch.testing.assert_close(batched, single, atol=2e-4, rtol=1e-4)


def test_bad_input_is_named():
    model = _model()
    with pytest.raises(ValueError, match="keep_rate must be in \\(0, 1\\], got 1.5"):
        tokens.EViTConfig(keep_rate=1.5)
    with pytest.raises(ValueError, match="r=40 at block 0 exceeds the 32 tokens"):
        tokens.reduce_tokens_(model, tokens.ToMeConfig(r=40))
    with pytest.raises(ValueError, match="unknown token reduction method 'magic'"):
        tokens.token_config("magic")
    with pytest.raises(ValueError, match="unknown knob.*keep_rate.*knobs are \\['r', 'prop_attn'\\]"):
        tokens.token_config("tome", keep_rate=0.5)
    with pytest.raises(ValueError, match="blocks \\[7\\] out of range"):
        tokens.reduce_tokens_(model, tokens.ATSConfig(blocks=[7]))
    tokens.reduce_tokens_(model, tokens.ToMeConfig(r=2))
    with pytest.raises(RuntimeError, match="already has token reduction 'tome'"):
        tokens.reduce_tokens_(model, tokens.EViTConfig())
    other = _model()
    other.blocks[1] = torch.nn.Identity()
    with pytest.raises(UnsupportedModelError, match="Identity"):
        tokens.reduce_tokens_(other, tokens.ToMeConfig(r=1))


@pytest.mark.parametrize("method,params", ACTIVE[:2])
def test_fixed_schedules_export_to_onnx(tmp_path, method, params):
    import onnxruntime as ort

    model = tokens.reduce_tokens_(_model(), tokens.token_config(method, **params))
    path = tmp_path / "m.onnx"
    x = torch.randn(2, 3, 64, 64)
    torch.onnx.export(model, (x,), str(path), input_names=["images"], dynamo=True, verbose=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(torch.from_numpy(session.run(None, {"images": x.numpy()})[0]), expected,
                               atol=1e-4, rtol=1e-4)


def test_token_selection_is_plain_indexing_done_with_row_gathers():
    """ToMe picks tokens with one Gather of whole rows (OpenVINO runs ``gather`` with a broadcast
    index and strided slices element by element): the same tokens as plain indexing."""
    from vitslim.tokens.tome import alternate, take_tokens

    x = torch.randn(3, 9, 5)
    idx = torch.stack([torch.randperm(9)[:4] for _ in range(3)])
    assert torch.equal(take_tokens(x, idx), x.gather(1, idx[..., None].expand(-1, -1, 5)))
    assert torch.equal(alternate(x, 0), x[:, ::2]) and torch.equal(alternate(x, 1), x[:, 1::2])


def test_exported_tome_selects_rows_not_elements(tmp_path):
    import onnx

    from vitslim.export import export_onnx

    path = export_onnx(tokens.reduce_tokens_(_model(), tokens.ToMeConfig(r=3)), tmp_path / "m.onnx")
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "Gather" in ops and "GatherElements" not in ops
