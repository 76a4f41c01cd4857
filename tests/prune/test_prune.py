import copy
import json

import pytest
import torch

import vitslim
from conftest import make_tiny_vit, rewrite_meta
from vitslim import prune, quant, tokens
from vitslim.artifact import ModelSource
from vitslim.bench import count_gmacs
from vitslim.errors import ConfigError
from vitslim.models import UnsupportedModelError, vit_parts
from vitslim.models.loading import ModelLoadError
from vitslim.prune import compensate
from vitslim.prune.allocate import block_costs, model_macs
from vitslim.prune.compensate import refit_linear_
from vitslim.prune.importance import compensated_scores, importance_scores, removal_order

IMPORTANCES = ["magnitude", "activation", "hessian"]
SIZE = (3, 64, 64)


def _model(**kw):
    return make_tiny_vit(img_size=64, depth=3, init_values=0.5, **kw)  # layer scale, as DINOv2


def _images(n=16, seed=1):
    return torch.randn(n, *SIZE, generator=torch.Generator().manual_seed(seed))


def _one_unit_budget(model, kind):
    """A budget that removes exactly one head (or one channel) of the model."""
    parts = vit_parts(model)
    head, channel = block_costs(parts)[0]
    return 1 - (head if kind == "head" else channel) / model_macs(parts) + 1e-9


@pytest.mark.parametrize("importance", IMPORTANCES)
def test_a_dead_head_is_the_one_removed_and_nothing_changes(importance):
    model, x = _model(), _images()
    head_dim = model.blocks[1].attn.head_dim
    with torch.no_grad():
        dead = slice(2 * head_dim, 3 * head_dim)  # head 2 of block 1: weights zero (magnitude sees it too)
        model.blocks[1].attn.proj.weight[:, dead] = 0
        model.blocks[1].attn.qkv.weight.view(3, -1, 64)[:, dead] = 0
        before = model(x)
    config = prune.PruneConfig(macs=_one_unit_budget(model, "head"), importance=importance, mlp=False, compensate=False)
    prune.prune_(model, config, x)
    assert model.vitslim_prune["heads"] == [4, 3, 4]
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=1e-5)


@pytest.mark.parametrize("importance", IMPORTANCES)
def test_a_dead_mlp_channel_is_the_one_removed_and_nothing_changes(importance):
    model, x = _model(), _images()
    with torch.no_grad():
        model.blocks[2].mlp.fc2.weight[:, 17] = 0
        model.blocks[2].mlp.fc1.weight[17] = 0
        before = model(x)
        kept_rows = torch.cat([model.blocks[2].mlp.fc1.weight[:17], model.blocks[2].mlp.fc1.weight[18:]])
    config = prune.PruneConfig(macs=_one_unit_budget(model, "channel"), importance=importance, heads=False,
                               compensate=False, channel_group=1)
    prune.prune_(model, config, x)
    assert model.vitslim_prune["mlp"] == [256, 256, 255]
    assert torch.equal(model.blocks[2].mlp.fc1.weight, kept_rows)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=1e-5)


@pytest.mark.parametrize("macs,blocks", [(0.8, False), (0.55, False), (0.6, True)])
def test_counted_macs_meet_the_budget_within_one_unit(macs, blocks):
    model = _model()
    before = count_gmacs(model, SIZE)
    head, channel = block_costs(vit_parts(model))[0]
    prune.prune_(model, prune.PruneConfig(macs=macs, importance="activation", blocks=blocks,
                                          channel_group=4, compensate=False), _images())
    kept = count_gmacs(model, SIZE) / before  # torch.utils.flop_counter, not our own formula
    assert macs - max(head, 4 * channel) / (before * 1e9) <= kept <= macs + 1e-9


def test_pruned_model_is_a_consistent_smaller_timm_model():
    model = _model()
    prune.prune_(model, prune.PruneConfig(macs=0.5, importance="hessian", blocks=True), _images())
    for block in model.blocks:
        attn = block.attn
        assert attn.qkv.out_features == 3 * attn.num_heads * attn.head_dim == 3 * attn.attn_dim
        assert attn.proj.in_features == attn.attn_dim and block.mlp.fc2.in_features == block.mlp.fc1.out_features
    assert model.vitslim_prune["heads"] == [b.attn.num_heads for b in model.blocks]
    assert model(torch.randn(2, *SIZE)).shape == (2, 10)


def test_pruned_model_composes_with_tome_quantization_and_onnx(tmp_path):
    from vitslim.export import export_onnx, validate_onnx

    model = prune.prune_(_model(), prune.PruneConfig(macs=0.6, importance="activation"), _images())
    x = torch.randn(3, *SIZE)
    with torch.no_grad():
        plain = model(x)
        tokens.reduce_tokens_(model, tokens.ToMeConfig(r=4))
        assert tokens.token_state(model) is not None and not torch.equal(model(x), plain)
        assert tokens.token_state(model).counts == [61, 57, 53]
    qmodel = quant.quantize_(copy.deepcopy(model), quant.preset("w8a8"), _images(8))
    assert validate_onnx(qmodel, export_onnx(qmodel, tmp_path / "q.onnx"), x)["cosine"] > 0.99
    tokens.remove(model)
    assert validate_onnx(model, export_onnx(model, tmp_path / "p.onnx"), x)["max_abs_diff"] < 1e-4


def test_save_load_round_trip_and_edited_shapes_are_refused(tmp_path):
    kwargs = dict(img_size=64, patch_size=8, depth=3, embed_dim=64, num_heads=4, num_classes=10, init_values=0.5)
    model = prune.prune_(_model(), prune.PruneConfig(macs=0.6, importance="activation", blocks=True), _images())
    vitslim.save(model, tmp_path / "p", ModelSource("vit_tiny_patch16_224", timm_kwargs=kwargs))
    loaded = vitslim.load(tmp_path / "p").model
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    for key in ("blocks", "head_index", "channel_index"):
        assert loaded.vitslim_prune[key] == model.vitslim_prune[key]
    meta = json.loads((tmp_path / "p" / "vitslim.json").read_text())
    record = meta["state"]["prune"]
    with pytest.raises(ModelLoadError, match="changed after it was saved"):  # an edit without the checksum
        rewrite_meta(tmp_path / "p", meta, recompute=False, channel_index=[[i + 1 for i in kept] for kept in
                                                                           record["channel_index"]])
        vitslim.load(tmp_path / "p")
    rewrite_meta(tmp_path / "p", meta, channel_index=[[i + 1 for i in kept] for kept in record["channel_index"]])
    with pytest.raises(ModelLoadError, match="pruned shapes list blocks, heads or MLP channels the model does not"):
        vitslim.load(tmp_path / "p")  # an index past the last channel, checksum recomputed as an adversary would
    rewrite_meta(tmp_path / "p", meta, heads=[record["heads"][0] + (1 if record["heads"][0] < 4 else -1),
                                               *record["heads"][1:]])
    with pytest.raises(ModelLoadError, match="head_index must list, per kept block"):  # heads and index disagree
        vitslim.load(tmp_path / "p")
    rewrite_meta(tmp_path / "p", meta, heads=[record["heads"][0] + (1 if record["heads"][0] < 4 else -1),
                                               *record["heads"][1:]], head_index=None)
    with pytest.raises(ModelLoadError, match="does not fit the model"):  # the weights have other shapes
        vitslim.load(tmp_path / "p")
    with pytest.raises(ModelLoadError, match="not a vitslim artifact"):
        vitslim.load(tmp_path)


def test_kept_unit_indices_name_the_original_rows_also_after_pruning_twice():
    """``head_index``/``channel_index`` (what the recovery refit restarts from) point at the
    original model's qkv and fc1 rows, also when a pruned model is pruned again."""
    teacher = _model()
    model = copy.deepcopy(teacher)
    sizes = []
    for macs in (0.8, 0.7):
        prune.prune_(model, prune.PruneConfig(macs=macs, importance="magnitude", compensate=False), _images(4))
        sizes.append(sum(model.vitslim_prune["heads"]) + sum(model.vitslim_prune["mlp"]))
    assert sizes[1] < sizes[0]
    info = model.vitslim_prune
    original = vit_parts(teacher).blocks
    for bp, b, heads, channels in zip(vit_parts(model).blocks, info["blocks"], info["head_index"],
                                      info["channel_index"]):
        head_dim = bp.proj.in_features // bp.num_heads
        rows = torch.tensor([s * original[b].proj.in_features + h * head_dim + i
                             for s in range(3) for h in heads for i in range(head_dim)])
        assert torch.equal(bp.qkv.weight, original[b].qkv.weight[rows])
        assert torch.equal(bp.fc1.weight, original[b].fc1.weight[channels])


@pytest.mark.parametrize("macs", [0, 1, 1.5, -0.2])
def test_budget_outside_zero_one_is_a_config_error(macs):
    with pytest.raises(ConfigError, match="strictly between 0 and 1"):
        prune.PruneConfig(macs=macs)


def test_unknown_model_and_unreachable_budget_are_refused_before_any_change():
    import timm

    with pytest.raises(UnsupportedModelError):
        prune.prune_(timm.create_model("resnet18", pretrained=False), prune.PruneConfig(macs=0.5), _images(4))
    model = _model()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match="cannot remove"):
        prune.prune_(model, prune.PruneConfig(macs=0.05, importance="magnitude"), _images(4))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_hessian_sees_layer_scale_that_magnitude_ignores():
    """Block 0's attention is switched off by a tiny LayerScale: its heads are free to remove.
    The Hessian (output-based) score finds that; weight magnitude cannot."""
    model, x = _model(), _images()
    with torch.no_grad():
        model.blocks[0].ls1.gamma.fill_(1e-4)
        model.blocks[0].attn.qkv.weight.mul_(3)  # large weights, little effect
        reference = model(x)
    errors = {}
    for importance in ("magnitude", "hessian"):
        pruned = prune.prune_(copy.deepcopy(model), prune.PruneConfig(
            macs=0.8, importance=importance, mlp=False, compensate=False), x)
        with torch.no_grad():
            errors[importance] = float((pruned(x) - reference).pow(2).mean())
        if importance == "hessian":
            assert pruned.vitslim_prune["heads"][0] == 1
    assert errors["hessian"] < 0.5 * errors["magnitude"], errors


def test_min_width_keeps_a_floor_in_the_block_the_scores_would_strip():
    """Block 0 matters least (tiny LayerScale on both branches): without a floor the global
    ranking strips it to one head and one channel group; ``min_width`` keeps half of its heads
    and channels and takes the MACs from the other blocks, still within the budget."""
    model, x = _model(), _images()
    with torch.no_grad():
        model.blocks[0].ls1.gamma.fill_(1e-4)
        model.blocks[0].ls2.gamma.fill_(1e-4)
    before = count_gmacs(model, SIZE)
    shapes = {}
    for floor in (0.0, 0.5):
        pruned = prune.prune_(copy.deepcopy(model), prune.PruneConfig(
            macs=0.6, importance="hessian", compensate=False, min_width=floor), x)
        shapes[floor] = (pruned.vitslim_prune["heads"], pruned.vitslim_prune["mlp"])
        assert count_gmacs(pruned, SIZE) / before <= 0.6 + 1e-6
    assert shapes[0.0][0][0] == 1 and shapes[0.0][1][0] == 8, shapes
    heads, mlp = shapes[0.5]
    assert min(heads) >= 2 and min(mlp) >= 128, shapes  # 4 heads, 256 channels per block


def test_least_squares_refit_recovers_a_damaged_layer_on_held_out_data():
    gen = torch.Generator().manual_seed(0)
    true = torch.nn.Linear(24, 8)
    mix = torch.randn(24, 24, generator=gen)
    x = torch.randn(16, 50, 24, generator=gen) @ mix  # correlated inputs
    with torch.no_grad():
        y = true(x) + 0.01 * torch.randn(16, 50, 8, generator=gen)
        damaged = copy.deepcopy(true)
        damaged.weight.add_(0.5 * torch.randn(8, 24, generator=gen))
        held_x = torch.randn(4, 50, 24, generator=gen) @ mix
        before = (damaged(held_x) - true(held_x)).pow(2).mean()
        assert refit_linear_(damaged, x, y, torch.ones(8)) is not None
        after = (damaged(held_x) - true(held_x)).pow(2).mean()
    assert after < 0.01 * before
    untouched = copy.deepcopy(true)
    with torch.no_grad():
        assert refit_linear_(untouched, x, true(x), torch.ones(8)) is None  # already exact: kept
    assert torch.equal(untouched.weight, true.weight)


def test_compensation_runs_a_few_views_at_a_time_with_the_same_result(monkeypatch):
    """The calibration views go through the blocks CHUNK at a time (the MLP's hidden layer for
    all of them at once took gigabytes); chunks that cut across folds give the same refit."""
    teacher, images = _model(), _images(10, seed=5)
    config = prune.PruneConfig(macs=0.6, importance="activation", refit_aware=False)
    whole = prune.prune_(copy.deepcopy(teacher), config, images)  # CHUNK 32 > 20 views: one pass
    seen = []
    monkeypatch.setattr(compensate, "CHUNK", 3)  # 20 views (mirrors) in folds of 6/6/4/4
    for bp in vit_parts(teacher).blocks:
        bp.fc1.register_forward_pre_hook(lambda m, a: seen.append(len(a[0])))
    chunked = prune.prune_(copy.deepcopy(teacher), config, images)
    assert seen[-21:] == [3, 3, 3, 3, 3, 3, 2] * 3  # the teacher's MLPs during compensation: 20 views by 3
    for a, b in zip(whole.parameters(), chunked.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_an_image_and_its_mirror_share_a_cross_validation_fold():
    """Mirrored views are near-copies of their image: a fold that validates on one while the
    other fits would reward overfitting. Exact copies in groups of 2 must refit exactly as the
    single images do (every fold statistic doubles, so the ridge chosen and the weights are the
    same); split across folds (9 sources: 18 rows in folds of 5) they would not."""
    gen = torch.Generator().manual_seed(2)  # a draw where the split pairs change the ridge chosen (1.0 vs 0.1)
    x = torch.randn(9, 4, 12, generator=gen)
    y = x @ torch.randn(12, 4, generator=gen) + 2 * torch.randn(9, 4, 4, generator=gen)
    single, paired = torch.nn.Linear(12, 4), torch.nn.Linear(12, 4)
    paired.load_state_dict(single.state_dict())
    with torch.no_grad():
        ridge = refit_linear_(single, x, y, torch.ones(4))
        doubled = refit_linear_(paired, x.repeat_interleave(2, 0), y.repeat_interleave(2, 0), torch.ones(4), group=2)
    assert ridge is not None and doubled == ridge
    assert torch.allclose(paired.weight, single.weight, atol=1e-5)


def test_refits_with_mirror_images_generalise_better_from_few_images():
    teacher = _model()
    calib, held_out = _images(12, seed=3), _images(32, seed=4)

    def held_out_error(mirror_refit):
        config = prune.PruneConfig(macs=0.6, importance="activation", mirror_refit=mirror_refit, refit_aware=False)
        student = prune.prune_(copy.deepcopy(teacher), config, calib)
        with torch.no_grad():
            return float((student.forward_features(held_out) - teacher.forward_features(held_out)).pow(2).mean())

    plain, mirrored = held_out_error(False), held_out_error(True)
    assert mirrored < 0.9 * plain, (plain, mirrored)


def test_recipe_prune_step_runs_first_and_checks_its_knobs():
    from vitslim.recipes import apply_recipe, recipe_from_dict

    with pytest.raises(ConfigError, match="strictly between 0 and 1"):
        recipe_from_dict({"name": "r", "steps": [{"prune": {"macs": 1.2}}]})
    for knob, value in (("heads", "no"), ("mirror_refit", "maybe"), ("channel_group", 8.5)):  # 'no' is truthy
        with pytest.raises(ConfigError, match=f"step 'prune': {knob}=.* has the wrong type"):
            recipe_from_dict({"name": "r", "steps": [{"prune": {"macs": 0.7, knob: value}}]})
        with pytest.raises(ConfigError, match=f"{knob}=.* has the wrong type"):
            prune.PruneConfig.from_dict({"macs": 0.7, knob: value})
    with pytest.raises(ConfigError, match="comes after a later stage"):
        recipe_from_dict({"name": "r", "steps": [{"tokens": {"method": "tome", "r": 2}}, {"prune": {"macs": 0.7}}]})
    recipe = recipe_from_dict({"name": "r", "steps": [{"prune": {"macs": 0.6, "importance": "activation"}},
                                                      {"tokens": {"method": "tome", "r": 2}}]})
    model = _model()
    out = apply_recipe(model, recipe, _images(8))
    assert count_gmacs(out, SIZE) < 0.6 * count_gmacs(model, SIZE)  # pruned, then merged
    assert [b.attn.num_heads for b in model.blocks] == [4, 4, 4]  # the original is untouched


@pytest.mark.parametrize("width,step", [(1, 1), (1, 3), (4, 1)])
def test_obs_removal_order_removes_a_duplicate_first_and_its_costs_are_least_squares_errors(width, step):
    """Greedy OBS removal (``removal_order``, ZipLM-style): a group duplicating another is
    removed first at no cost however large its weights (also when several go per full update),
    and the costs added up are the output error that an explicit least-squares refit of the
    remaining columns and the bias leaves."""
    gen = torch.Generator().manual_seed(0)
    n_in, n_out, rows = 12 * width, 5, 400
    x = torch.randn(rows, n_in, generator=gen, dtype=torch.float64) + 0.3
    x[:, width:2 * width] = x[:, :width]  # group 1 duplicates group 0
    weight = torch.randn(n_out, n_in, generator=gen, dtype=torch.float64)
    weight[:, width:2 * width] *= 10  # ... and has the largest weights
    xb = torch.cat([x, torch.ones(rows, 1, dtype=torch.float64)], 1)
    groups = torch.arange(n_in).reshape(-1, width)
    order, added = removal_order(weight, xb.T @ xb / rows, groups, torch.ones(len(groups)), step, damp=1e-9)
    assert sorted(order.tolist()) == list(range(len(groups)))
    assert order[0] in (0, 1) and added[0] < 1e-6
    assert added[1] > 1e-2  # the other one of the pair is not free any more
    y = x @ weight.T
    for k in range(1, len(groups)):
        keep = torch.cat([groups[i] for i in order[k:]])
        xs = torch.cat([x[:, keep], torch.ones(rows, 1, dtype=torch.float64)], 1)
        residual = xs @ torch.linalg.lstsq(xs, y).solution - y
        torch.testing.assert_close(added[:k].sum(), residual.pow(2).sum() / rows, rtol=1e-5, atol=1e-6)


def test_refit_aware_scores_free_one_of_two_identical_heads_and_charge_the_other():
    """Two identical heads with large output weights: the plain Hessian score calls both
    important; once ``proj`` is refit one of them is free to remove (the other takes its
    output), and the survivor then carries both, so the refit-aware (OBS) score is tiny for one
    and large for the other."""
    model = _model()
    calib = _images(32)
    parts = vit_parts(model)
    bp = parts.blocks[2]
    d = bp.attn.head_dim
    with torch.no_grad():
        bp.qkv.weight.view(3, 4, d, -1)[:, 2] = bp.qkv.weight.view(3, 4, d, -1)[:, 1]
        bp.qkv.bias.view(3, 4, d)[:, 2] = bp.qkv.bias.view(3, 4, d)[:, 1]
        bp.proj.weight.view(-1, 4, d)[:, 1:3] *= 3
    plain = importance_scores(model, calib, "hessian")
    aware = compensated_scores(model, parts, calib, plain, batch_size=8)
    ratio = (aware.heads[2] / plain.heads[2])[1:3].sort().values
    assert ratio[0] < 0.05 and ratio[1] > 0.5, (plain.heads[2], aware.heads[2])
    assert plain.heads[2][1:3].min() > plain.heads[2].max() / 3  # the plain score keeps both
