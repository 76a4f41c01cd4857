"""The ``config.json`` and ``preprocessor_config.json`` fields of four public Hugging Face model
folders, as the hub serves them (``id2label`` of the ImageNet classifiers rebuilt from vitslim's
own ImageNet class list: 1000 names in the same order). Tests build these folders offline with
``transformers`` itself (random weights, ``save_pretrained``), so they see what a user's folder holds.
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path
from typing import Any

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _imagenet_labels() -> dict[str, Any]:
    rows = files("vitslim.assets").joinpath("imagenet_classes.tsv").read_text().splitlines()
    names = [row.split("\t")[2].replace("_", " ") for row in rows if row.strip()]
    return {"id2label": {str(i): n for i, n in enumerate(names)}, "label2id": {n: i for i, n in enumerate(names)}}


DINOV2_SMALL = {
    "config": {
        "architectures": ["Dinov2Model"], "attention_probs_dropout_prob": 0.0, "drop_path_rate": 0.0,
        "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "hidden_size": 384, "image_size": 518,
        "initializer_range": 0.02, "layer_norm_eps": 1e-06, "layerscale_value": 1.0, "mlp_ratio": 4,
        "model_type": "dinov2", "num_attention_heads": 6, "num_channels": 3, "num_hidden_layers": 12,
        "patch_size": 14, "qkv_bias": True, "torch_dtype": "float32", "transformers_version": "4.31.0.dev0",
        "use_swiglu_ffn": False,
    },
    "preprocessor": {
        "crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": IMAGENET_MEAN,
        "image_processor_type": "BitImageProcessor", "image_std": IMAGENET_STD, "resample": 3,
        "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 256},
    },
}

VIT_BASE = {
    "config": {
        "architectures": ["ViTForImageClassification"], "attention_probs_dropout_prob": 0.0, "encoder_stride": 16,
        "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "hidden_size": 768, "image_size": 224,
        "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-12, "model_type": "vit",
        "num_attention_heads": 12, "num_channels": 3, "num_hidden_layers": 12, "patch_size": 16, "qkv_bias": True,
        "transformers_version": "4.13.0.dev0",
    },
    "preprocessor": {
        "do_normalize": True, "do_resize": True, "feature_extractor_type": "ViTFeatureExtractor",
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 2, "size": 224,
    },
    "labels": True,
}

DEIT_SMALL = {
    "config": {
        "architectures": ["ViTForImageClassification"], "attention_probs_dropout_prob": 0.0, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0, "hidden_size": 384, "image_size": 224, "initializer_range": 0.02,
        "intermediate_size": 1536, "layer_norm_eps": 1e-12, "model_type": "vit", "num_attention_heads": 6,
        "num_channels": 3, "num_hidden_layers": 12, "patch_size": 16, "qkv_bias": True,
        "torch_dtype": "float32", "transformers_version": "4.15.0.dev0",
    },
    "preprocessor": {
        "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "DeiTFeatureExtractor", "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD,
        "resample": 3, "size": 256,
    },
    "labels": True,
}

SWIN_TINY = {
    "config": {
        "architectures": ["SwinForImageClassification"], "attention_probs_dropout_prob": 0.0,
        "depths": [2, 2, 6, 2], "drop_path_rate": 0.1, "embed_dim": 96, "encoder_stride": 32, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0, "hidden_size": 768, "image_size": 224, "initializer_range": 0.02,
        "layer_norm_eps": 1e-05, "mlp_ratio": 4.0, "model_type": "swin", "num_channels": 3,
        "num_heads": [3, 6, 12, 24], "num_layers": 4, "patch_norm": True, "patch_size": 4, "path_norm": True,
        "qkv_bias": True, "torch_dtype": "float32", "transformers_version": "4.18.0.dev0",
        "use_absolute_embeddings": False, "window_size": 7,
    },
    "preprocessor": {
        "do_normalize": True, "do_resize": True, "feature_extractor_type": "ViTFeatureExtractor",
        "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD, "resample": 3, "size": 224,
    },
    "labels": True,
}

HUB_FOLDERS = {
    "facebook/dinov2-small": DINOV2_SMALL,
    "google/vit-base-patch16-224": VIT_BASE,
    "facebook/deit-small-patch16-224": DEIT_SMALL,
    "microsoft/swin-tiny-patch4-window7-224": SWIN_TINY,
}


def write_hub_folder(repo: str, folder: Path, **overrides: Any) -> Path:
    """``folder`` as ``repo`` is on the hub, with random weights: the config written, the model
    built from it by ``transformers`` and saved next to the image processor's JSON.
    ``overrides`` change config fields (a shallower model for speed: depth changes no code path)."""
    import torch
    import transformers

    spec = HUB_FOLDERS[repo]
    config = {**spec["config"], **(_imagenet_labels() if spec.get("labels") else {}), **overrides}
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    hf_config = transformers.AutoConfig.from_pretrained(folder)
    architecture = getattr(transformers, config["architectures"][0])
    torch.manual_seed(0)
    model = architecture(hf_config).eval()
    with torch.no_grad():  # transformers zero-initialises tokens, biases and bias tables: randomise all
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(spec["preprocessor"]))
    return folder
