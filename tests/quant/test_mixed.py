"""Mixed precision (MPTQ-ViT-style): per-block bits from measured sensitivity under a budget."""

import copy
import itertools

import pytest
import torch

from conftest import make_tiny_vit
from vitslim import quant
from vitslim.errors import ConfigError
from vitslim.quant.config import QuantConfig, uniform_config
from vitslim.quant.mixed import allocate_bits, mixed_precision_config


def test_allocation_is_the_exact_optimum_under_the_budget():
    torch.manual_seed(0)
    candidates = (4, 6, 8)
    sensitivity = torch.rand(6, 3) * torch.tensor([4.0, 2.0, 1.0])  # fewer bits hurt more
    chosen = allocate_bits(sensitivity, candidates, average_bits=5.5)
    cost = {b: j for j, b in enumerate(candidates)}

    def total(bits):
        return sum(float(sensitivity[i, cost[b]]) for i, b in enumerate(bits))

    feasible = [bits for bits in itertools.product(candidates, repeat=6) if sum(bits) <= 5.5 * 6]
    assert sum(chosen) <= 5.5 * 6
    assert total(chosen) == pytest.approx(min(total(bits) for bits in feasible))
    with pytest.raises(ValueError, match="below the smallest candidate"):
        allocate_bits(sensitivity, candidates, average_bits=3)


def _model_with_one_sensitive_block(sensitive: int):
    """A 4-block random ViT whose block ``sensitive`` has a few huge post-GELU channels, the
    outliers that wreck a low-bit min-max quantizer there (and only there)."""
    model = make_tiny_vit(depth=4)
    with torch.no_grad():
        fc1 = model.blocks[sensitive].mlp.fc1
        fc1.weight[:4] *= 40
        fc1.bias[:4] = 20
    return model


def _error(qmodel, model, images):
    with torch.no_grad():
        ref = model.forward_features(images)
        return float(((qmodel.forward_features(images) - ref) ** 2).sum() / (ref**2).sum())


def test_mixed_precision_spends_bits_on_the_sensitive_block_and_beats_uniform():
    model = _model_with_one_sensitive_block(sensitive=2)
    gen = torch.Generator().manual_seed(1)
    calib, held_out = torch.randn(32, 3, 32, 32, generator=gen), torch.randn(32, 3, 32, 32, generator=gen)
    base = uniform_config(6, 6)
    config = mixed_precision_config(model, calib, base, average_bits=6, candidates=(4, 6, 8))
    assert config.block_bits[2] == 8
    assert sum(config.block_bits) <= 6 * 4
    mixed_error = _error(quant.quantize_(copy.deepcopy(model), config, calib), model, held_out)
    uniform_error = _error(quant.quantize_(copy.deepcopy(model), base, calib), model, held_out)
    assert mixed_error < 0.7 * uniform_error


def test_block_bits_round_trip_and_validation(tmp_path):
    config = QuantConfig(block_bits=[8, 4])
    assert config.block_bits == (8, 4)
    path = tmp_path / "mixed.json"
    config.save(path)
    assert QuantConfig.load(path) == config
    assert config.for_block(1).weight_bits == 4 and config.for_block(1).softmax.bits == 4
    with pytest.raises(ConfigError, match="block_bits"):
        QuantConfig(block_bits=(8, 7))
    model = make_tiny_vit(depth=2)
    with pytest.raises(ConfigError, match="one bit width per block"):
        quant.quantize_(copy.deepcopy(model), QuantConfig(block_bits=(8,)), torch.randn(8, 3, 32, 32))
