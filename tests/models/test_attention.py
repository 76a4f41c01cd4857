"""vitslim's attention path: a routed attention stays bound to its own module under deepcopy."""

from __future__ import annotations

import copy

import timm
import torch

from vitslim.models.attention import route_attention


def test_a_deep_copy_of_a_routed_attention_runs_its_own_modules():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1).eval()
    route_attention(model.blocks[0].attn)
    x = torch.randn(1, 3, 32, 32)
    copied = copy.deepcopy(model)
    with torch.no_grad():
        copied.blocks[0].attn.qkv.weight.mul_(2)  # only the copy changes
        assert (copied(x) - model(x)).abs().max() > 1e-3
