import math

import pytest
import timm
import torch

from conftest import make_tiny_vit
from vitslim import tokens
from vitslim.tokens import mctf
from vitslim.tokens.mctf import attention_received, fuse, mctf_merge, mctf_scores
from vitslim.tokens.tome import bipartite_soft_matching


def _model(depth=3):
    return make_tiny_vit(depth=depth, img_size=64)  # 64 patches + class token


def _groups(merge, n):
    """Which original tokens each output token holds (merge one-hot rows by sum)."""
    out = merge(torch.eye(n)[None])[0]
    return [sorted(row.nonzero().flatten().tolist()) for row in out]


@pytest.mark.parametrize("one_step_ahead", [True, False])
def test_r0_leaves_outputs_identical(one_step_ahead):
    model, x = _model(), torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        tokens.reduce_tokens_(model, tokens.MCTFConfig(r=0, one_step_ahead=one_step_ahead))
        assert torch.equal(model(x), before)
    assert tokens.token_state(model).counts == [65, 65, 65]


@pytest.mark.parametrize("one_step_ahead,bidirectional", [(True, True), (False, True), (True, False)])
def test_counts_drop_by_r_per_block(one_step_ahead, bidirectional):
    model = _model()
    tokens.reduce_tokens_(model, tokens.MCTFConfig(r=5, one_step_ahead=one_step_ahead, bidirectional=bidirectional))
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert tokens.token_state(model).counts == [60, 55, 50]
    assert torch.isfinite(out).all()
    tokens.remove(model)
    tokens.reduce_tokens_(model, tokens.MCTFConfig(r=[7, 0, 12]))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert tokens.token_state(model).counts == [58, 58, 46]


@pytest.mark.parametrize("one_step_ahead", [True, False])
def test_similarity_is_scored_on_the_right_tokens(monkeypatch, one_step_ahead):
    """One step ahead: the tokens entering the block (scored with this block's attention over
    them); otherwise the tokens leaving it, before fusion."""
    model, x = _model(depth=1), torch.randn(2, 3, 64, 64)
    seen, real = [], mctf.mctf_scores
    monkeypatch.setattr(mctf, "mctf_scores", lambda metric, *args: seen.append(metric) or real(metric, *args))
    entering, leaving = [], []

    def record(module, args, out):
        entering.append(args[0])
        leaving.append(out)

    model.blocks[0].register_forward_hook(record)
    with torch.no_grad():
        model(x)  # unpatched: the block's input and full output
        tokens.reduce_tokens_(model, tokens.MCTFConfig(r=4, one_step_ahead=one_step_ahead))
        model(x)
    assert len(seen) == 1 and seen[0].shape == (2, 65, 64) and leaving[1].shape == (2, 61, 64)
    assert torch.equal(entering[1], entering[0])
    assert torch.equal(seen[0], entering[0] if one_step_ahead else leaving[0])


def test_remove_restores_bit_for_bit():
    model, x = _model(), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        tokens.reduce_tokens_(model, tokens.MCTFConfig(r=6))
        assert not torch.equal(model(x), before)
        tokens.remove(model)
        assert torch.equal(model(x), before)
    assert tokens.token_state(model) is None and "forward" not in model.blocks[0].__dict__


@pytest.mark.parametrize("bidirectional", [True, False])
def test_fusion_preserves_the_size_weighted_mean(bidirectional):
    torch.manual_seed(0)
    x, size = torch.randn(2, 41, 16), torch.randint(1, 5, (2, 41, 1)).float()
    scores = mctf_scores(torch.randn(2, 41, 8), torch.rand(2, 41), size, 1.0, 20.0, 40.0)
    merge = mctf_merge(scores, 11, num_prefix=1, bidirectional=bidirectional)
    # Constant attention weight: the fused tokens keep the size-weighted mean (ToMe's average).
    fused, new_size = fuse(merge, x, size, torch.full_like(size, 0.3))
    assert fused.shape == (2, 30, 16) and new_size.shape == (2, 30, 1)
    torch.testing.assert_close((fused * new_size).sum(1), (x * size).sum(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new_size.sum(1), size.sum(1))
    torch.testing.assert_close(fused[:, 0], x[:, 0])  # the class token is never fused
    # Attention weights: each fused token is its members' (attention × size)-weighted mean.
    weight = torch.rand(2, 41, 1) + 0.1
    fused, new_size = fuse(merge, x, size, weight)
    total = merge(size * weight)
    torch.testing.assert_close((fused * total).sum(1), (x * size * weight).sum(1), rtol=1e-5, atol=1e-5)
    groups = _groups(lambda t: merge(t.expand(2, -1, -1))[:1], 41)
    assert groups[0] == [0] and len(groups) == 30
    g = next(i for i, members in enumerate(groups) if len(members) > 1)
    members = groups[g]
    w = (size * weight)[0, members]
    torch.testing.assert_close(fused[0, g], (x[0, members] * w).sum(0) / w.sum(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new_size[0, g, 0], size[0, members, 0].sum())


def test_without_info_and_size_it_is_tomes_similarity_matching():
    torch.manual_seed(1)
    metric, x = torch.randn(2, 33, 8), torch.randn(2, 33, 16)
    received, size = torch.rand(2, 33), torch.randint(1, 9, (2, 33, 1)).float()
    tome = bipartite_soft_matching(metric, r=10, num_prefix=1)(x)
    for tau_sim in (1.0, 3.0):
        scores = mctf_scores(metric, received, size, tau_sim, 0.0, 0.0)
        assert torch.equal(mctf_merge(scores, 10, 1, bidirectional=False)(x), tome)
    # With the informativeness and size criteria on, other pairs are chosen.
    scores = mctf_scores(metric, received, size, 1.0, 1.0, 1.0)
    assert not torch.equal(mctf_merge(scores, 10, 1, bidirectional=False)(x), tome)


def _crafted(n=9, dim=16):
    """Tokens 2 and 3 identical, 5 and 6 close (cos 0.9), every other pair orthogonal."""
    metric = torch.eye(n, dim)
    metric[3] = metric[2]
    metric[5] = 0.9 * metric[6] + math.sqrt(1 - 0.81) * torch.eye(dim)[n]
    return metric[None]


def test_informativeness_spares_attended_tokens():
    metric, size = _crafted(), torch.ones(1, 9, 1)
    uniform = torch.full((1, 9), 1 / 9)
    merge = mctf_merge(mctf_scores(metric, uniform, size, 1.0, 1.0, 0.0), 1, 1, bidirectional=False)
    assert [2, 3] in _groups(merge, 9)  # the most similar pair
    attended = uniform.clone()
    attended[0, 3] = 0.9  # token 3 receives most of the attention
    merge = mctf_merge(mctf_scores(metric, attended, size, 1.0, 1.0, 0.0), 1, 1, bidirectional=False)
    assert [5, 6] in _groups(merge, 9) and [3] in _groups(merge, 9)


def test_bidirectional_matching_fuses_b_into_a():
    scores = mctf_scores(_crafted(), None, None, 1.0, 0.0, 0.0)
    # Step A->B fuses token 2 into 3; step B->A fuses token 5 into the A token 6.
    groups = _groups(mctf_merge(scores.clone(), 2, 1, bidirectional=True), 9)
    assert groups == [[0], [4], [5, 6], [8], [1], [2, 3], [7]]
    one_way = _groups(mctf_merge(scores.clone(), 2, 1, bidirectional=False), 9)
    assert one_way == [[0], [4], [8], [1], [2, 3], [5, 6], [7]]
    # Distillation token (index 1, in B): kept in place, never fused, takes no fusion.
    x = torch.randn(2, 30, 8)
    scores = mctf_scores(torch.randn(2, 30, 8), None, None, 1.0, 0.0, 0.0)
    out = mctf_merge(scores, 9, num_prefix=2, bidirectional=True)(x)
    assert out.shape == (2, 21, 8) and torch.equal(out[:, :2], x[:, :2])


def test_distilled_model_keeps_prefix_tokens():
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=64, depth=2).eval()
    tokens.reduce_tokens_(model, tokens.MCTFConfig(r=[8, 4]))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert tokens.token_state(model).counts == [10, 6]


def test_attention_received_sums_to_one_and_follows_size():
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 10, 8), torch.randn(2, 4, 10, 8)
    received = attention_received(q, k, 8**-0.5, None)
    torch.testing.assert_close(received.sum(1), torch.ones(2))
    size = torch.ones(2, 10, 1)
    size[:, 3] = 50.0  # a big token gets more attention (proportional attention)
    assert (attention_received(q, k, 8**-0.5, size)[:, 3] > received[:, 3]).all()


def test_bad_knobs_are_named():
    model = _model()
    with pytest.raises(ValueError, match="mctf: r=40 at block 0 exceeds the 32 tokens"):
        tokens.reduce_tokens_(model, tokens.MCTFConfig(r=40))
    with pytest.raises(ValueError, match="mctf: r must be >= 0, got -1 at block 0"):
        tokens.reduce_tokens_(model, tokens.MCTFConfig(r=-1))
    with pytest.raises(ValueError, match="mctf: schedule has 2 entries but the model has 3 blocks"):
        tokens.reduce_tokens_(model, tokens.MCTFConfig(r=[1, 2]))
    with pytest.raises(ValueError, match="mctf: tau_info must be a finite number >= 0.*got -1"):
        tokens.MCTFConfig(tau_info=-1)
    with pytest.raises(ValueError, match="mctf: tau_size must be .*got nan"):
        tokens.MCTFConfig(tau_size=float("nan"))
    with pytest.raises(ValueError, match="unknown knob.*keep_rate.*'tau_sim', 'tau_info'"):
        tokens.token_config("mctf", keep_rate=0.5)
    assert tokens.token_state(model) is None  # nothing was patched
