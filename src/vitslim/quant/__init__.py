"""Post-training quantization built for vision transformers.

    from vitslim import quant
    qmodel = quant.quantize(model, calib_images, "w4a4")       # or a QuantConfig

Quantizers for each ViT activation site (uniform; log2, SULQ and AdaLog for post-Softmax and
post-GELU), LayerNorm reparameterization (RepQ-ViT) or SmoothQuant with bias (MPTQ-ViT), GPTQ
weights, Hadamard rotations folded into the weights (QuaRot), block reconstruction (I&S-ViT) and per-block mixed precision (MPTQ-ViT). Simulated
(fake-quant) in PyTorch; scales and zero points are kept for export. I-ViT's integer-only
Softmax/GELU/LayerNorm are in ``vitslim.quant.integer``.
"""

from vitslim.quant.api import quantize
from vitslim.quant.config import PRESETS, QuantConfig, SiteConfig, preset
from vitslim.quant.mixed import mixed_precision_config
from vitslim.quant.rotate import rotate

__all__ = ["quantize", "mixed_precision_config", "rotate", "QuantConfig", "SiteConfig", "PRESETS", "preset"]
