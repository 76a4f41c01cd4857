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

from vitslim.lazy import lazy_api

API = {
    "vitslim.quant.config": ("PRESETS", "QuantConfig", "SiteConfig", "preset"),
    "vitslim.quant.hybrid": ("HybridQuantConfig", "quantize_hybrid_"),
    "vitslim.quant.mixed": ("mixed_precision_config",),
    "vitslim.quant.ptq": ("quantize_",),
}
__all__ = sorted(name for names in API.values() for name in names)
__getattr__, __dir__ = lazy_api(__name__, API)
