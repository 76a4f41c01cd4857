import copy
from dataclasses import replace

import pytest
import torch

from conftest import make_tiny_vit
from vitslim import quant
from vitslim.errors import ConfigError
from vitslim.quant.asymmetric import asymmetric_target
from vitslim.quant.config import SiteConfig, rotated_config
from vitslim.quant.gptq import gptq_quantize_weight
from vitslim.quant.quantizers import WeightQuantizer, mse


def test_gptq_of_the_asymmetric_target_beats_gptq_of_the_weight_on_noisy_inputs():
    # The layer sees x̃ = x + an error correlated with x (as a quantized model's inputs are):
    # fitting W* to x̃ first, then GPTQ with x̃'s Hessian, lands closer to the FP32 outputs Wx.
    torch.manual_seed(0)
    x = torch.randn(2048, 64) * torch.linspace(0.2, 3, 64)
    x_q = x @ (torch.eye(64) + 0.15 * torch.randn(64, 64)) + 0.05 * torch.randn(2048, 64)
    w = torch.randn(32, 64)
    target_out = x @ w.T
    h_q, cross = x_q.T @ x_q, x.T @ x_q
    wq = WeightQuantizer(4)
    wq.calibrate_weight(w)
    plain = gptq_quantize_weight(w, h_q, wq.scale, 4, group_size=16)
    fitted = asymmetric_target(w, h_q, cross)
    wq.calibrate_weight(fitted)
    asym = gptq_quantize_weight(fitted, h_q, wq.scale, 4, group_size=16)
    err = lambda wh: mse(x_q @ wh.T, target_out)  # noqa: E731
    assert err(asym) < 0.5 * err(plain), (err(plain), err(asym))


def test_asymmetric_gptq_lowers_a_low_bit_models_error_on_held_out_inputs():
    torch.manual_seed(0)
    model = make_tiny_vit(img_size=32)
    calib, held_out = torch.randn(32, 3, 32, 32), torch.randn(32, 3, 32, 32)
    config = replace(rotated_config(3, 3, gptq_group_size=16, act_order=True), rotation=None)
    with torch.no_grad():
        ref = model.forward_features(held_out)
        errors = {asym: mse(quant.quantize_(copy.deepcopy(model), replace(config, gptq_asymmetric=asym),
                                            calib).forward_features(held_out), ref) for asym in (False, True)}
    assert errors[True] < 0.9 * errors[False], errors


def test_asymmetric_gptq_config_errors():
    with pytest.raises(ConfigError, match="needs weight_method='gptq'"):
        replace(rotated_config(4, 4, weight_method="rtn"), gptq_asymmetric=True)
    with pytest.raises(ConfigError, match="float_channels"):
        replace(rotated_config(8, 8), rotation=None, gptq_asymmetric=True, post_gelu=SiteConfig(8, float_channels=4))
