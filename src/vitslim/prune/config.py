"""``PruneConfig``: what to remove and how to choose it, as plain data."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from vitslim.datafile import check_fields
from vitslim.errors import ConfigError

IMPORTANCES = ("magnitude", "activation", "hessian")


@dataclass(frozen=True)
class PruneConfig:
    """Structured pruning of a ViT under a MAC budget.

    ``macs`` is the fraction of the model's multiply-accumulates to keep (0.7 = 30 % fewer).
    ``importance`` scores every prunable unit: ``magnitude`` (weight L2², the Torch-Pruning
    default), ``activation`` (weight² × input-activation², the unit's output energy) or
    ``hessian`` (NViT's second-order saliency on a feature-distillation loss, Gauss-Newton /
    Fisher estimated with ``probes`` random output probes per image). Units: attention heads,
    MLP hidden channels (in groups of ``channel_group``, so widths stay kernel-friendly) and,
    with ``blocks``, whole blocks. ``compensate`` refits the layers consuming pruned units
    (proj, fc2) by least squares on the calibration images, and, for removed blocks, the next
    block's; ``min_heads`` heads and ``channel_group`` channels stay in every kept block, and
    with ``min_width`` at least that fraction of every kept block's heads and channels (the
    Hessian ranking otherwise strips DINOv2's first blocks to one head). ``refit_aware`` (with
    ``compensate``) ranks heads and channels by what removing them costs after the consuming
    layer is refit (greedy Optimal Brain Surgeon per layer, as in ZipLM, Kurtic et al. 2023,
    scaled by ``importance``), so a unit others can stand in for goes first. ``mirror_refit``
    (with ``compensate``) also fits every calibration image's horizontal mirror image in the
    refits, which overfit few images, for twice the refits' time and memory (the scoring's are
    unchanged).
    """

    macs: float
    importance: str = "hessian"
    heads: bool = True
    mlp: bool = True
    blocks: bool = False
    compensate: bool = True
    channel_group: int = 8
    min_heads: int = 1
    probes: int = 2
    batch_size: int = 8
    min_width: float = 0.25
    refit_aware: bool = True
    mirror_refit: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.macs, (int, float)) or not 0 < self.macs < 1:
            raise ConfigError(f"macs={self.macs!r}: give the fraction of MACs to keep, strictly between 0 and 1 "
                              "(0.7 removes 30 %)")
        if self.importance not in IMPORTANCES:
            raise ConfigError(f"importance {self.importance!r} is not one of {list(IMPORTANCES)}")
        if not (self.heads or self.mlp or self.blocks):
            raise ConfigError("nothing to prune: enable at least one of heads, mlp, blocks")
        if not 0 <= self.min_width < 1:
            raise ConfigError(f"min_width={self.min_width!r}: give the fraction of every block's heads and "
                              "channels to keep, in [0, 1)")
        for name in ("channel_group", "min_heads", "probes", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PruneConfig:
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"unknown PruneConfig field(s) {unknown}; fields are {sorted(cls.__dataclass_fields__)}")
        return cls(**check_fields(cls, data, ""))  # as a recipe's prune step: heads: 'no' is not True
