import math

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
