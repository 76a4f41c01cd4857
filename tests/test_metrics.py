import math

import pytest
import torch

from vitslim import metrics


def test_sqnr_of_known_noise_level():
    ref = torch.ones(1000, 4)
    noise = 0.1 * torch.tensor([1.0, -1.0]).repeat(2000).reshape(1000, 4)  # power 0.01
    assert metrics.sqnr_db(ref, ref + noise) == pytest.approx(20.0, abs=1e-5)
    assert metrics.sqnr_db(ref, ref + 10 * noise) == pytest.approx(0.0, abs=1e-5)
    assert metrics.sqnr_db(ref, ref.clone()) == math.inf


def test_cosine_similarity():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert metrics.cosine_similarity(a, 3 * a) == pytest.approx(1.0)
    assert metrics.cosine_similarity(a, torch.tensor([[0.0, 1.0], [0.0, -1.0]])) == pytest.approx(-0.5)


def test_top1_agreement_and_kl():
    ref = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
    test = torch.tensor([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0]])
    assert metrics.top1_agreement(ref, test) == 0.5
    assert metrics.mean_kl(ref, ref) == pytest.approx(0.0, abs=1e-12)
    p = torch.softmax(ref[1].double(), 0)
    q = torch.softmax(test[1].double(), 0)
    expected = (p * (p / q).log()).sum().item() / 2  # first row contributes 0
    assert metrics.mean_kl(ref, test) == pytest.approx(expected)


def test_topk_accuracy_ignores_unlabelled():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.05, 0.15], [0.3, 0.3, 0.4]])
    labels = torch.tensor([1, 2, -1])
    assert metrics.topk_accuracy(logits, labels, 1) == 0.5
    assert metrics.topk_accuracy(logits, labels, 2) == 1.0
    assert math.isnan(metrics.topk_accuracy(logits, torch.tensor([-1, -1, -1]), 1))


def test_cosine_standard_error_is_the_spread_of_the_row_cosines_over_root_n():
    reference = torch.tensor([[1.0, 0.0]] * 4)
    angles = torch.tensor([0.0, 0.2, 0.4, 0.6])
    test = torch.stack([angles.cos(), angles.sin()], dim=1)  # row cosines are cos(angle)
    expected = angles.double().cos().std().item() / 2
    assert metrics.cosine_standard_error(reference, test) == pytest.approx(expected, rel=1e-6)  # float32 rows
    assert metrics.cosine_standard_error(reference, reference) == 0.0
