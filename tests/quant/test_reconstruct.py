import copy
from dataclasses import replace

import torch

from conftest import make_tiny_vit
from vitslim import quant
from vitslim.quant.config import minmax_ranges, rotated_config
from vitslim.quant.modules import quant_linears
from vitslim.quant.quantizers import mse
from vitslim.quant.reconstruct import _per_column, reconstruct_blocks, weight_steps


def _codes(qmodel) -> dict[str, torch.Tensor]:
    """Each quantized linear's weight divided by its (group) steps."""
    return {name: lin.qweight / _per_column(weight_steps(lin), lin.linear.in_features)
            for name, lin in quant_linears(qmodel).items()}


def _setup(img_size: int = 32):
    """A one-block W4A4 model with GPTQ weights (groups of 16) and min-max activation ranges:
    at 4 bits the full ranges waste most of the grid, which learned steps should fix."""
    model = make_tiny_vit(depth=1, img_size=img_size)
    calib, held_out = torch.randn(32, 3, img_size, img_size), torch.randn(32, 3, img_size, img_size)
    config = minmax_ranges(replace(rotated_config(4, 4, gptq_group_size=16, act_order=True), rotation=None),
                           ("post_ln", "linear", "qk", "v"))
    plain = quant.quantize_(copy.deepcopy(model), config, calib)
    with torch.no_grad():
        ref = model.forward_features(held_out)
    error = lambda m: mse(m.forward_features(held_out), ref)  # noqa: E731
    return model, calib, plain, torch.no_grad()(error)


def test_reconstruction_keeps_gptq_codes_and_learns_steps_on_held_out_images():
    torch.manual_seed(0)
    model, calib, plain, error = _setup()
    tuned = copy.deepcopy(plain)
    reconstruct_blocks(model, tuned, calib, iters=100)
    before, after = _codes(plain), _codes(tuned)
    for name, codes in after.items():
        # Still on GPTQ's integer grid, group by group, with GPTQ's codes: only the steps moved.
        assert torch.allclose(codes, codes.round(), atol=1e-3), name
        assert torch.equal(codes.round(), before[name].round()), name
    assert any(not torch.equal(quant_linears(tuned)[n].qweight, quant_linears(plain)[n].qweight) for n in after)
    assert error(tuned) < 0.7 * error(plain), (error(plain), error(tuned))


def test_learned_biases_remove_a_mean_shift_that_steps_cannot():
    # Bias correction's case: a quantized linear whose output is off by a constant (planted in
    # fc2's bias, as rounding can leave one). Learned steps only rescale; learned biases remove it.
    torch.manual_seed(0)
    model, calib, plain, error = _setup()
    with torch.no_grad():
        plain.blocks[0].mlp.fc2.linear.bias.add_(0.2)
    steps_only, with_bias = copy.deepcopy(plain), copy.deepcopy(plain)
    reconstruct_blocks(model, steps_only, calib, iters=60)
    reconstruct_blocks(model, with_bias, calib, iters=60, learn_bias=True, bias_lr=1e-2)
    assert error(with_bias) < 0.5 * error(steps_only), (error(steps_only), error(with_bias))
    for p in plain.parameters():
        p.requires_grad_(False)  # e.g. a frozen model: reconstruction leaves it frozen
    reconstruct_blocks(model, plain, calib, iters=2, learn_bias=True)
    assert not any(p.requires_grad for p in plain.parameters())


def test_softmax_log_quantizer_passes_gradient_to_q_and_k():
    # q and k reach the output only through the (log-quantized) attention probabilities:
    # their steps can learn only if that quantizer lets the gradient through (QDrop off, so
    # no probability passes unquantized).
    torch.manual_seed(0)
    model, calib, plain, _ = _setup()
    tuned = copy.deepcopy(plain)
    reconstruct_blocks(model, tuned, calib, iters=20, drop_prob=0.0)
    for site in ("q", "k"):
        old, new = plain.blocks[0].attn.quant_sites[site].scale, tuned.blocks[0].attn.quant_sites[site].scale
        assert not torch.allclose(old, new, rtol=1e-3), site


def test_learned_rounding_ends_on_the_grid_and_lowers_the_error():
    torch.manual_seed(0)
    model, calib, plain, error = _setup()
    tuned = copy.deepcopy(plain)
    reconstruct_blocks(model, tuned, calib, iters=100, batch_size=8, learn_rounding=True)
    before, after = _codes(plain), _codes(tuned)
    for name, codes in after.items():
        assert torch.allclose(codes, codes.round(), atol=1e-3), name
    assert any(not torch.equal(after[n].round(), before[n].round()) for n in after)  # new rounding
    assert error(tuned) < 0.9 * error(plain), (error(plain), error(tuned))


def test_w4a8_preset_reconstruction_lowers_held_out_error():
    # The w4a8 preset (no rotation, SULQ softmax/GELU, 8-bit activations, 4-bit GPTQ groups)
    # ends with a few reconstruction steps: they must help on images not calibrated on, with
    # its log-domain sites passing gradients straight through.
    config = quant.preset("w4a8")
    assert config.reconstruction_iters > 0
    model = make_tiny_vit(depth=2)
    torch.manual_seed(0)
    calib, held_out = torch.randn(32, 3, 32, 32), torch.randn(32, 3, 32, 32)
    plain = quant.quantize_(copy.deepcopy(model), replace(config, reconstruction_iters=0), calib)
    tuned = copy.deepcopy(plain)
    reconstruct_blocks(model, tuned, calib, iters=config.reconstruction_iters)
    with torch.no_grad():
        ref = model.forward_features(held_out)
        before, after = (mse(m.forward_features(held_out), ref) for m in (plain, tuned))
    assert after < 0.9 * before, (before, after)
