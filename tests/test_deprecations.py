"""The old Python API keeps working for one release: same results, a DeprecationWarning that
names the new call, never an AttributeError."""

import copy

import pytest
import torch

from conftest import make_tiny_vit
from vitslim import prune, quant, registry, tokens

X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _quantized(model: torch.nn.Module) -> bool:
    return any(hasattr(m, "quant_sites") for m in model.modules())


@pytest.mark.parametrize("old_call,config", [
    (lambda m: tokens.apply(m, "tome", r=3), tokens.ToMeConfig(r=3)),
    (lambda m: tokens.apply_mctf(m, 3, tau_info=0), tokens.MCTFConfig(r=3, tau_info=0)),
    (lambda m: tokens.METHODS["evit"](m, keep_rate=0.5, blocks=[1]), tokens.EViTConfig(keep_rate=0.5, blocks=[1])),
])
def test_old_token_calls_warn_and_patch_as_the_config_does(old_call, config):
    with pytest.warns(DeprecationWarning, match="TOKEN_CONFIGS|reduce_tokens_"):
        old = old_call(make_tiny_vit())
    new = tokens.reduce_tokens_(make_tiny_vit(), config)
    assert tokens.token_state(old).params == tokens.token_state(new).params
    assert torch.equal(old(X), new(X))


def test_old_quantize_warns_and_still_copies():
    model = make_tiny_vit()
    with pytest.warns(DeprecationWarning, match=r"quantize_\(model, config, calib\)"):
        old = quant.quantize(model, X, "minmax-w8a8")
    assert not _quantized(model) and _quantized(old)
    new = quant.quantize_(copy.deepcopy(model), quant.preset("minmax-w8a8"), X)
    assert new is not model and torch.equal(old(X), new(X))


def test_old_prune_argument_order_warns_and_prunes_the_same():
    config = prune.PruneConfig(macs=0.6, importance="magnitude", compensate=False)
    with pytest.warns(DeprecationWarning, match=r"prune_\(model, config, calib_images\)"):
        old = prune.prune_(make_tiny_vit(), X, config)
    new = prune.prune_(make_tiny_vit(), config, X)
    assert old.vitslim_prune["heads"] == new.vitslim_prune["heads"] and torch.equal(old(X), new(X))


def test_old_modules_and_recipe_steps_warn_and_resolve_to_the_new_names():
    from vitslim import workflows
    from vitslim.compress import Step

    with pytest.warns(DeprecationWarning, match="vitslim.workflows.evaluate_on_folder"):
        from vitslim.api import evaluate_cli
    assert evaluate_cli is workflows.evaluate_on_folder
    with pytest.warns(DeprecationWarning, match="ToMeConfig"):
        assert Step("tokens", {"method": "tome", "r": 8}) == tokens.ToMeConfig(r=8)
    with pytest.raises(AttributeError):
        tokens.apply_magic  # noqa: B018 (an attribute that never existed stays an error)


def test_every_family_dispatches_through_the_registry():
    model = registry.apply_(make_tiny_vit(), tokens.ATSConfig(budget=0.5, blocks=[1]))
    assert tokens.token_state(model).method == "ats"
    assert _quantized(registry.apply_(make_tiny_vit(), quant.preset("minmax-w8a8"), X))
    with pytest.raises(Exception, match="not a vitslim method config"):
        registry.apply_(make_tiny_vit(), {"method": "tome"})
