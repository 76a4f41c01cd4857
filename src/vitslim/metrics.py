"""Fidelity and accuracy metrics. Inputs are (N, D) tensors: one row per image."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10·log10(Σ ref² / Σ (ref − test)²).

    Summed over all elements; ``math.inf`` when the two are identical.
    """
    return sqnr_db_of(*signal_and_noise(reference, test))


def signal_and_noise(reference: torch.Tensor, test: torch.Tensor) -> tuple[float, float]:
    """(Σ ref², Σ (ref − test)²) in float64: the sums SQNR is made of (they add over shards)."""
    reference, test = reference.double(), test.double()
    return reference.pow(2).sum().item(), (reference - test).pow(2).sum().item()


def sqnr_db_of(signal: float, noise: float) -> float:
    """SQNR in dB from its two sums (see ``signal_and_noise``)."""
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10 * math.log10(signal / noise)


def row_cosines(reference: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """The cosine similarity of each row of ``test`` with the same row of ``reference``, in
    double precision and within [-1, 1] (rounding can put identical rows at 1 + 4e-16)."""
    ref, tst = reference.double().flatten(1), test.double().flatten(1)
    return F.cosine_similarity(ref, tst, dim=1).clamp(-1.0, 1.0)


def cosine_similarity(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Mean over rows of the cosine similarity between reference and test rows."""
    return row_cosines(reference, test).mean().item()


def min_cosine_similarity(reference: torch.Tensor, test: torch.Tensor) -> float:
    """The lowest cosine similarity of any row: the worst image, which a mean can hide."""
    return row_cosines(reference, test).min().item()


def cosine_standard_error(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Standard error of ``cosine_similarity``'s mean: the rows' sample standard deviation
    over the square root of their number (0 for a single row)."""
    per_row = row_cosines(reference, test)
    return per_row.std().item() / math.sqrt(len(per_row)) if len(per_row) > 1 else 0.0


def top1_agreement(reference_logits: torch.Tensor, test_logits: torch.Tensor) -> float:
    """Fraction of rows whose arg-max class is the same in both."""
    return (reference_logits.argmax(1) == test_logits.argmax(1)).double().mean().item()


def mean_kl(reference_logits: torch.Tensor, test_logits: torch.Tensor) -> float:
    """Mean over rows of KL(softmax(reference) ‖ softmax(test)), in nats."""
    log_p = F.log_softmax(reference_logits.double(), dim=1)
    log_q = F.log_softmax(test_logits.double(), dim=1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean").item()


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Fraction of labelled rows (label ≥ 0) whose label is among the top-k classes."""
    keep = labels >= 0
    if not keep.any():
        return math.nan
    topk = logits[keep].topk(k, dim=1).indices
    return (topk == labels[keep, None]).any(1).double().mean().item()
