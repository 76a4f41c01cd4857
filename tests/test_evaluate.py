import math

import pytest
import torch

from conftest import make_tiny_vit
from vitslim import evaluate, load_image_folder, make_loader, predict
from vitslim.metrics import topk_accuracy


def test_classifier_accuracy_and_fidelity(example_images):
    model = make_tiny_vit(num_classes=1000)
    loader = make_loader(load_image_folder(example_images, model), batch_size=5)
    out = predict(model, loader)
    assert out.logits.shape == (16, 1000) and out.features.shape == (16, 64)
    assert out.labels.tolist()[0] == 0  # n01440764_tench

    same = evaluate(model, loader, reference=model)
    assert same.top1_agreement == 1.0 and same.mean_kl == 0.0 and same.sqnr_db == math.inf
    assert same.top1 == topk_accuracy(out.logits, out.labels, 1) and same.labelled_images == 16

    noisy = make_tiny_vit(num_classes=1000)
    with torch.no_grad():
        noisy.head.weight.add_(0.05 * torch.randn_like(noisy.head.weight))
    diff = evaluate(noisy, loader, reference=out)
    assert diff.cosine == 1.0  # the head is after the features
    assert diff.mean_kl > 0 and diff.top1_agreement <= 1.0


def test_backbone_has_no_logits(example_images):
    model = make_tiny_vit(num_classes=0)
    loader = make_loader(load_image_folder(example_images, model, limit=3), batch_size=2)
    result = evaluate(model, loader, reference=model)
    assert result.top1 is None and result.top1_agreement is None and result.cosine == 1.0


def test_figures_reduced_from_shard_sums_equal_the_whole_sets():
    import functools

    from vitslim.evaluation import Outputs, add_sums, compare_outputs, metric_sums, result_from_sums

    g = torch.Generator().manual_seed(0)
    ref = Outputs(torch.randn(10, 6, generator=g), torch.randn(10, 7, generator=g),
                  torch.tensor([0, 3, -1, 2, 6, -1, 1, 1, 5, 4]))
    test = Outputs(ref.features + 0.3 * torch.randn(10, 6, generator=g),
                   ref.logits + 0.8 * torch.randn(10, 7, generator=g), ref.labels)
    whole = compare_outputs(test, ref)
    shards = [slice(0, 3), slice(3, 4), slice(4, 10)]
    part = lambda o, s: Outputs(o.features[s], o.logits[s], o.labels[s])  # noqa: E731
    reduced = result_from_sums(functools.reduce(add_sums, (metric_sums(part(test, s), part(ref, s)) for s in shards)))
    for name, value in whole.to_dict().items():
        assert value is None or value == pytest.approx(getattr(reduced, name), abs=1e-12), name
    assert 0 < whole.top1 < 1 and 0 < whole.top1_agreement < 1 and whole.cosine_se > 0  # nothing degenerate
