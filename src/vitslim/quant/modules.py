"""Fake-quant modules and how they are wired into a timm ViT.

``QuantLinear`` wraps an ``nn.Linear`` (kept as ``.linear``) with an ``input_quantizer`` and a
``weight_quantizer``; its ``qweight`` buffer holds the fake-quantized weight once calibrated
(on the integer grid ``weight_quantizer.scale`` × int, or, for GPTQ with groups, on the grid of
``qweight_group_scales``: one step per output row and group of input columns). The attention's q, k, softmax and v
quantizers live in ``attn.quant_sites`` and are applied by ``vitslim.models.attention``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitslim.models import BlockParts
from vitslim.models.attention import route_attention
from vitslim.quant.config import QuantConfig, SiteConfig
from vitslim.quant.quantizers import LogQuantizer, Quantizer, TokenQuantizer, UniformQuantizer, WeightQuantizer


class QuantLinear(nn.Module):
    """A linear layer with fake-quantized input and weight."""

    def __init__(self, linear: nn.Linear, input_quantizer: Quantizer, weight_quantizer: WeightQuantizer) -> None:
        super().__init__()
        self.linear, self.input_quantizer, self.weight_quantizer = linear, input_quantizer, weight_quantizer
        self.register_buffer("qweight", None)
        # (out, groups) steps of a grouped GPTQ weight: saved with the model, since an integer
        # export (``vitslim.export.nbits``) stores the codes on exactly these steps.
        self.register_buffer("qweight_group_scales", None)

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias

    def quantize_weight(self) -> None:
        """Round the weight to its grid (round to nearest)."""
        self.weight_quantizer.calibrate_weight(self.linear.weight)
        self.qweight = self.weight_quantizer.fake_quant(self.linear.weight.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.linear.weight
        if self.qweight is not None and self.weight_quantizer.mode == "quant":
            weight = self.qweight
            if self.weight_quantizer.lowered is not None:
                weight = self.weight_quantizer.lowered(self.qweight)  # int8 weights in the ONNX file
        inq = self.input_quantizer
        float_index = getattr(inq, "float_index", None)
        if float_index is None or not float_index.numel() or inq.mode != "quant":
            return F.linear(inq(x), weight, self.linear.bias)
        # Outlier channels (LLM.int8(), Dettmers et al. 2022): the integer matmul takes them
        # saturated at the grid's ends; what lies beyond is added back in float. Only k of the
        # channels are gathered, so the integer kernel keeps the whole input.
        lo, hi = inq.saturation()
        outliers = x.index_select(-1, float_index)
        excess = outliers - torch.minimum(torch.maximum(outliers, lo), hi)
        outliers = F.linear(excess, self.linear.weight.index_select(1, float_index))
        return F.linear(inq(x), weight, self.linear.bias) + outliers


def make_quantizer(site: SiteConfig, name: str, positive_shift: bool = False) -> nn.Module:
    """The activation quantizer a site config asks for (``nn.Identity`` for a float site)."""
    if site.quantizer == "float":
        return nn.Identity()
    if site.per_token:
        return TokenQuantizer(site.bits, site.calibration, name=name)
    if site.quantizer == "uniform":
        return UniformQuantizer(site.bits, site.symmetric, site.per_channel, site.calibration, name=name,
                                float_channels=site.float_channels)
    return LogQuantizer(site.bits, site.quantizer, shift=positive_shift, name=name)


def install_block(bp: BlockParts, config: QuantConfig, prefix: str) -> None:
    """Replace the block's linears by ``QuantLinear`` and give its attention quantizers."""
    def wq(name: str) -> WeightQuantizer:
        return WeightQuantizer(config.weight_bits, config.weight_calibration, name=f"{prefix}.{name}.weight")

    post_ln = SiteConfig(**{**config.post_ln.__dict__, "per_channel": False}) \
        if config.ln_reparam or config.smooth_quant else config.post_ln
    attn, mlp = bp.attn, bp.mlp
    attn.qkv = QuantLinear(bp.qkv, make_quantizer(post_ln, f"{prefix}.attn.qkv.input"), wq("attn.qkv"))
    attn.proj = QuantLinear(bp.proj, make_quantizer(config.linear, f"{prefix}.attn.proj.input"), wq("attn.proj"))
    mlp.fc1 = QuantLinear(bp.fc1, make_quantizer(post_ln, f"{prefix}.mlp.fc1.input"), wq("mlp.fc1"))
    # Post-GELU values are ≥ −0.17: log quantizers shift them positive (AdaLog's bias trick).
    post_gelu = make_quantizer(config.post_gelu, f"{prefix}.mlp.fc2.input", positive_shift=True)
    mlp.fc2 = QuantLinear(bp.fc2, post_gelu, wq("mlp.fc2"))
    attn.quant_sites = nn.ModuleDict({
        "q": make_quantizer(config.qk, f"{prefix}.attn.q"),
        "k": make_quantizer(config.qk, f"{prefix}.attn.k"),
        "softmax": make_quantizer(config.softmax, f"{prefix}.attn.softmax"),
        "v": make_quantizer(config.v, f"{prefix}.attn.v"),
    })
    route_attention(attn)


def quantizers(model: nn.Module) -> list[Quantizer]:
    return [m for m in model.modules() if isinstance(m, Quantizer)]


def quant_linears(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def set_mode(model: nn.Module, mode: str) -> None:
    """``observe``, ``quant`` or ``off`` for every quantizer of the model."""
    for q in quantizers(model):
        q.mode = mode
