"""timm's BEiT through vitslim's block layout: same outputs, quantized export, named refusals."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

from conftest import assert_int8_export_runs_like
from vitslim import quant, tokens
from vitslim.errors import UnsupportedModelError
from vitslim.models import load_model, vit_parts
from vitslim.models.beit import rewire_beit_

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=3)
VARIANTS = {  # beit_base_patch16_224 has per-block relative position bias, layer scale, mean pooling
    "per-block bias, mean pooling": {},
    "shared bias, absolute positions, CLS": dict(use_rel_pos_bias=False, use_shared_rel_pos_bias=True,
                                                 use_abs_pos_emb=True, global_pool="token"),
    "both biases, no layer scale": dict(use_shared_rel_pos_bias=True, init_values=None),
}


def _timm_beit(**variant) -> torch.nn.Module:
    model = timm.create_model("beit_base_patch16_224", pretrained=False, **TINY, **variant).eval()
    for p in model.parameters():  # bias tables and layer scales are constant at init: a slip would not show
        p.data.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rewired_timm_beit_computes_what_timm_beit_computes(variant):
    torch.manual_seed(0)
    model = _timm_beit(**VARIANTS[variant])
    with pytest.raises(UnsupportedModelError, match="rewire_beit_"):
        vit_parts(model)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        rewired = rewire_beit_(copy.deepcopy(model))
        assert (rewired(x) - model(x)).abs().max() <= 1e-5
        assert torch.equal(vit_parts(rewired).blocks[1].qkv.bias[64:128], torch.zeros(64))
        for block in rewired.blocks:
            block.attn.position_bias = None
        assert (rewired(x) - model(x)).abs().max() > 1e-3  # the bias tables matter in this test


def test_timm_beit_loads_rewired_quantizes_exports_and_refuses_token_reduction(tmp_path):
    torch.manual_seed(0)
    model = load_model("beit_base_patch16_224", pretrained=False, **TINY, use_shared_rel_pos_bias=True)
    with pytest.raises(UnsupportedModelError, match="relative position bias"):
        tokens.reduce_tokens_(copy.deepcopy(model), tokens.ToMeConfig(r=2))
    q = quant.quantize_(model, quant.preset("w8a8-ort"), torch.randn(8, 3, 32, 32))
    assert_int8_export_runs_like(q, tmp_path / "q.onnx", 32)
