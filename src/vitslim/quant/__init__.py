"""Post-training quantization built for vision transformers.

    from vitslim import quant
    quant.quantize_(model, quant.preset("w4a4"), calib_images)   # in place; or any QuantConfig

Quantizers for each ViT activation site (uniform; log2, SULQ and AdaLog for post-Softmax and
post-GELU), LayerNorm reparameterization (RepQ-ViT) or SmoothQuant with bias (MPTQ-ViT), GPTQ
weights, Hadamard rotations folded into the weights (QuaRot), block reconstruction (I&S-ViT)
and per-block mixed precision (MPTQ-ViT). Simulated (fake-quant) in PyTorch; scales and zero
points are kept for export. I-ViT's integer-only Softmax/GELU/LayerNorm are in
``vitslim.quant.integer``.
"""

from vitslim.quant.config import PRESETS, QuantConfig, SiteConfig, preset
from vitslim.quant.hybrid import HybridQuantConfig, quantize_hybrid_
from vitslim.quant.mixed import mixed_precision_config
from vitslim.quant.ptq import quantize_
from vitslim.quant.rotate import rotate

__all__ = ["PRESETS", "HybridQuantConfig", "QuantConfig", "SiteConfig", "mixed_precision_config", "preset", "quantize_",
           "quantize_hybrid_", "rotate"]
