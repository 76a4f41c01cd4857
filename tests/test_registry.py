"""One way to apply each method: its config, through its family's verb or ``registry.apply_``."""

import subprocess
import sys

import pytest
import torch

from conftest import make_tiny_vit
from vitslim import prune, quant, registry, tokens
from vitslim.errors import ConfigError

X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _quantized(model: torch.nn.Module) -> bool:
    return any(hasattr(m, "quant_sites") for m in model.modules())


def test_every_family_dispatches_through_the_registry():
    model = registry.apply_(make_tiny_vit(), tokens.ATSConfig(budget=0.5, blocks=[1]))
    assert tokens.token_state(model).method == "ats"
    assert _quantized(registry.apply_(make_tiny_vit(), quant.preset("minmax-w8a8"), X))
    with pytest.raises(Exception, match="not a vitslim method config"):
        registry.apply_(make_tiny_vit(), {"method": "tome"})


@pytest.mark.parametrize("call", [
    lambda m: prune.prune_(m, 0.7, X),  # a bare MAC fraction
    lambda m: prune.prune_(m, X, prune.PruneConfig(macs=0.7)),  # images before the config
    lambda m: quant.quantize_(m, "w8a8", X),  # a preset name
    lambda m: tokens.reduce_tokens_(m, {"method": "tome", "r": 8}),  # a recipe file's dict
])
def test_verbs_take_only_their_config_and_leave_the_model_untouched(call):
    model = make_tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="takes"):
        call(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_lazy_packages_load_their_api_and_registrations_on_first_use():
    """In a fresh interpreter: a config module imports without PyTorch; the first use of a
    package's API imports all of it, so its configs are registered; submodules never shadow
    the API's names."""
    code = (
        "import sys\n"
        "import vitslim.quant.config, vitslim.prune.config\n"
        "assert 'torch' not in sys.modules\n"
        "import vitslim.evaluation\n"
        "import vitslim\n"
        "from vitslim import quant, prune, registry\n"
        "assert registry.method_of(quant.preset('w8a8')).step == 'quantize'\n"
        "assert registry.method_of(prune.PruneConfig(macs=0.7)).step == 'prune'\n"
        "assert callable(vitslim.evaluate) and vitslim.evaluate is vitslim.evaluation.evaluate\n"
        "assert set(vitslim.__all__) <= set(dir(vitslim))\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout == "ok\n", proc.stderr
