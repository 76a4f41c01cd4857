"""Hugging Face models through vitslim's adapter: same outputs, same methods, same fidelity."""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch

import vitslim

transformers = pytest.importorskip("transformers", reason="Hugging Face support needs `transformers` (extra `hf`)")

from hub_configs import HUB_FOLDERS, write_hub_folder  # noqa: E402

from conftest import assert_int8_export_runs_like  # noqa: E402
from vitslim import quant, tokens  # noqa: E402
from vitslim.errors import ModelLoadError, UnsupportedModelError  # noqa: E402
from vitslim.models import load_model, vit_parts  # noqa: E402
from vitslim.models.hf import processor_config, reference_state_dict_hf  # noqa: E402

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


def _dinov2_config(**extra):
    return transformers.Dinov2Config(**SMALL, image_size=56, patch_size=14, layerscale_value=0.5,
                                     layer_norm_eps=1e-6, **extra)


CASES = {
    "Dinov2Model": lambda: transformers.Dinov2Model(_dinov2_config()),
    "Dinov2ForImageClassification": lambda: transformers.Dinov2ForImageClassification(
        _dinov2_config(num_labels=5, architectures=["Dinov2ForImageClassification"])),
    "ViTModel": lambda: transformers.ViTModel(transformers.ViTConfig(**SMALL, image_size=32, patch_size=8)),
    "ViTForImageClassification": lambda: transformers.ViTForImageClassification(transformers.ViTConfig(
        **SMALL, image_size=32, patch_size=8, num_labels=3, architectures=["ViTForImageClassification"])),
    "DeiTForImageClassification": lambda: transformers.DeiTForImageClassification(transformers.DeiTConfig(
        **SMALL, image_size=32, patch_size=8, num_labels=3, architectures=["DeiTForImageClassification"])),
    "DeiTForImageClassificationWithTeacher": lambda: transformers.DeiTForImageClassificationWithTeacher(
        transformers.DeiTConfig(**SMALL, image_size=32, patch_size=8, num_labels=3,
                                architectures=["DeiTForImageClassificationWithTeacher"])),
}


def _save(hf_model, tmp_path) -> str:
    folder = tmp_path / "hf-model"
    hf_model.save_pretrained(folder)
    return f"hf:{folder}"


def _main_output(hf_model, x):
    out = hf_model(x)
    return out.logits if hasattr(out, "logits") else out.pooler_output


@pytest.mark.parametrize("name", sorted(CASES))
def test_wrapped_model_computes_what_the_hugging_face_model_computes(name, tmp_path):
    torch.manual_seed(0)
    hf_model = CASES[name]().eval()
    model = load_model(_save(hf_model, tmp_path))
    size = hf_model.config.image_size
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        assert (model(x) - _main_output(hf_model, x)).abs().max() < 1e-5
    parts = vit_parts(model)
    assert len(parts.blocks) == 2 and parts.blocks[0].qkv.out_features == 3 * 64
    assert parts.num_prefix_tokens == (2 if "DeiT" in name else 1)
    assert parts.num_tokens == parts.embed(x).shape[1]


def _tiny_dinov2_pair(tmp_path):
    """The same random weights as a timm DINOv2 and as a Hugging Face folder."""
    torch.manual_seed(0)
    timm_model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=56, num_classes=0,
                                   embed_dim=64, depth=2, num_heads=4, init_values=0.5).eval()
    for p in timm_model.parameters():  # random LayerNorm/LayerScale too, so a mapping slip shows
        p.data.add_(0.05 * torch.randn_like(p))
    hf_model = transformers.Dinov2Model(_dinov2_config(architectures=["Dinov2Model"])).eval()
    hf_model.load_state_dict(reference_state_dict_hf(timm_model), strict=True)
    return timm_model, load_model(_save(hf_model, tmp_path))


@pytest.mark.parametrize("preset", ["minmax-w8a8", "w8a8-ort"])  # w8a8-ort: SmoothQuant folds into v
def test_quantization_and_token_merging_give_the_timm_path_results(tmp_path, preset):
    timm_model, hf_model = _tiny_dinov2_pair(tmp_path)
    calib, x = torch.randn(8, 3, 56, 56), torch.randn(4, 3, 56, 56)
    with torch.no_grad():
        assert (timm_model(x) - hf_model(x)).abs().max() < 1e-5
        outs = []
        for model in (timm_model, hf_model):
            q = quant.quantize_(copy.deepcopy(model), quant.preset(preset), calib)
            tokens.reduce_tokens_(q, tokens.ToMeConfig(r=3))
            outs.append(q(x))
            assert tokens.token_state(q).counts[-1] < 17  # merging happened
    assert (outs[0] - outs[1]).abs().max() < 1e-4
    assert (outs[0] - timm_model(x)).abs().max() > 1e-3  # the methods did change the model


def test_quantized_hugging_face_model_saves_and_reloads(tmp_path):

    _, hf_model = _tiny_dinov2_pair(tmp_path)
    spec = f"hf:{tmp_path / 'hf-model'}"
    q = quant.quantize_(hf_model, quant.preset("minmax-w8a8"), torch.randn(8, 3, 56, 56))
    vitslim.save(q, tmp_path / "q", spec)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(vitslim.load(tmp_path / "q").model(x), q(x))


def test_rotated_low_bit_presets_on_a_hugging_face_model_match_the_timm_path(tmp_path):
    from vitslim.quant.rotate import rotate

    timm_model, hf_model = _tiny_dinov2_pair(tmp_path)
    calib, x = torch.randn(8, 3, 56, 56), torch.randn(4, 3, 56, 56)
    with torch.no_grad():
        ref = hf_model(x)
        rotated = rotate(copy.deepcopy(hf_model), "hadamard-online")
        assert (rotated(x) - ref).abs().max() < 1e-4 * ref.abs().max()  # exact in real arithmetic
        assert not torch.equal(rotated.embeddings.cls_token, hf_model.embeddings.cls_token)
        outs = [quant.quantize_(copy.deepcopy(m), quant.preset("w4a4"), calib)(x) for m in (timm_model, hf_model)]
    assert (outs[0] - outs[1]).abs().max() < 1e-3 * outs[0].abs().max()
    assert (outs[1] - ref).abs().max() > 1e-3  # 4-bit did change the model
    q = quant.quantize_(copy.deepcopy(hf_model), quant.preset("w4a4"), calib)
    vitslim.save(q, tmp_path / "q", f"hf:{tmp_path / 'hf-model'}")
    with torch.no_grad():
        assert torch.equal(vitslim.load(tmp_path / "q").model(x), q(x))


def test_pruning_a_hugging_face_model_matches_the_timm_path(tmp_path):
    from vitslim import prune

    timm_model, hf_model = _tiny_dinov2_pair(tmp_path)
    calib, x = torch.randn(16, 3, 56, 56), torch.randn(4, 3, 56, 56)
    config = prune.PruneConfig(macs=0.7, importance="activation")
    outs = []
    for model in (timm_model, hf_model):
        prune.prune_(model, config, calib)
        outs.append(model(x).detach())
    assert [bp.fc1.out_features for bp in vit_parts(hf_model).blocks] == \
        [bp.fc1.out_features for bp in vit_parts(timm_model).blocks] != [256, 256]
    assert (outs[0] - outs[1]).abs().max() < 1e-3


def test_processor_settings_become_the_same_preprocessing():
    config = transformers.ViTConfig(image_size=224)
    squash = processor_config({"size": {"height": 224, "width": 224}, "resample": 2,
                               "image_mean": [0.5] * 3, "image_std": [0.5] * 3}, config)
    assert squash["input_size"] == (3, 224, 224) and squash["crop_mode"] == "squash"
    crop = processor_config({"size": {"shortest_edge": 256}, "do_center_crop": True, "resample": 3,
                             "crop_size": {"height": 224, "width": 224}}, config)
    assert crop["crop_pct"] == pytest.approx(0.875) and crop["interpolation"] == "bicubic"
    with pytest.raises(UnsupportedModelError, match="rescale_factor"):
        processor_config({"do_rescale": True, "rescale_factor": 1.0}, config)


def test_unsupported_or_missing_hugging_face_models_are_named(tmp_path):
    config = transformers.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1])
    convnext = transformers.ConvNextModel(config)
    with pytest.raises(UnsupportedModelError, match="ConvNextModel"):
        load_model(_save(convnext, tmp_path))
    with pytest.raises(ModelLoadError, match="could not load Hugging Face folder"):
        load_model(f"hf:{tmp_path}")  # a folder without a config.json


@pytest.mark.slow
def test_reference_dinov2_in_hugging_face_layout_gives_the_timm_features(tmp_path, reference_model, example_images):
    """The same real weights as timm and as a Hugging Face folder compute the same features; each
    path preprocesses as its own library does (PIL for timm, the image processor's torchvision
    backend for the folder), which differ in resampling filter and crop rounding."""
    from vitslim.data import load_image_folder
    from vitslim.models.hf import save_reference_hf

    hf_model = load_model(f"hf:{save_reference_hf(tmp_path / 'dinov2-hf')}")
    batches = []
    for model in (reference_model, hf_model):
        data = load_image_folder(example_images, model, limit=8)
        batches.append(torch.stack([data[i][0] for i in range(len(data))]))
    assert not torch.equal(batches[0], batches[1])  # bicubic: PIL's a=-0.5 vs torch's a=-0.75, crop rounding
    with torch.no_grad():
        assert (hf_model(batches[0]) - reference_model(batches[0])).abs().max() <= 1e-4


def test_quantized_hugging_face_model_exports_to_int8_kernels(tmp_path):
    _, hf_model = _tiny_dinov2_pair(tmp_path)
    q = quant.quantize_(hf_model, quant.preset("w8a8-ort"), torch.randn(8, 3, 56, 56))
    assert_int8_export_runs_like(q, tmp_path / "q.onnx", 56)


def test_empty_hugging_face_spec_and_file_as_output_folder_are_named(tmp_path):
    from vitslim.errors import OutputPathError
    from vitslim.models.hf import save_reference_hf

    with pytest.raises(ModelLoadError, match="needs a Hugging Face model id"):
        load_model("hf:")
    not_a_folder = tmp_path / "file.txt"
    not_a_folder.write_text("x")
    with pytest.raises(OutputPathError, match="is a file"):
        save_reference_hf(not_a_folder)
    assert not_a_folder.read_text() == "x"


# BEiT: relative position bias (per layer, shared, both), absolute position embeddings, layer scale
# on or off, mean pooling with the pooler's LayerNorm or the CLS token.
BEIT_VARIANTS = {
    "per-layer bias, mean pooling": dict(use_relative_position_bias=True),
    "shared bias, absolute positions": dict(use_shared_relative_position_bias=True,
                                            use_absolute_position_embeddings=True),
    "both biases, CLS, no layer scale": dict(use_relative_position_bias=True, use_shared_relative_position_bias=True,
                                             use_mean_pooling=False, layer_scale_init_value=0.0),
}


def _beit(cls_name: str = "BeitForImageClassification", **variant):
    """A tiny BEiT with every parameter randomised (HF zero-initialises the bias tables, class
    token and position embeddings and sets LayerNorms to identity: a mapping slip would not show)."""
    config = transformers.BeitConfig(**SMALL, image_size=32, patch_size=8, num_labels=3,
                                     architectures=[cls_name], **variant)
    hf_model = getattr(transformers, cls_name)(config).eval()
    for p in hf_model.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    return hf_model


@pytest.mark.parametrize("variant", sorted(BEIT_VARIANTS))
def test_wrapped_beit_computes_what_the_hugging_face_beit_computes(variant, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(3, 3, 32, 32)
    for cls_name in ("BeitModel", "BeitForImageClassification"):
        hf_model = _beit(cls_name, **BEIT_VARIANTS[variant])
        model = load_model(_save(hf_model, tmp_path / cls_name))
        with torch.no_grad():
            out = hf_model(x)
            if cls_name == "BeitModel":
                assert (model.forward_features(x) - out.last_hidden_state).abs().max() <= 1e-5
                assert (model(x) - out.pooler_output).abs().max() <= 1e-5
            else:
                assert model.num_classes == 3 and (model(x) - out.logits).abs().max() <= 1e-5
            parts = vit_parts(model)
            assert torch.equal(parts.blocks[0].qkv.bias[64:128], torch.zeros(64))  # BEiT's key has no bias
            without_bias = copy.deepcopy(model)
            for bp in vit_parts(without_bias).blocks:
                bp.attn.position_bias = None
            assert (without_bias(x) - model(x)).abs().max() > 1e-3  # the bias tables matter in this test


def test_beit_quantized_to_w8a8_exports_and_agrees_with_onnx_runtime(tmp_path):
    torch.manual_seed(0)
    model = load_model(_save(_beit(**BEIT_VARIANTS["both biases, CLS, no layer scale"]), tmp_path))
    q = quant.quantize_(copy.deepcopy(model), quant.preset("w8a8-ort"), torch.randn(8, 3, 32, 32))
    assert_int8_export_runs_like(q, tmp_path / "q.onnx", 32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (q(x) - model(x)).abs().max() > 1e-4  # it is the quantized model that was exported


def test_pruning_a_beit_head_removes_its_relative_position_bias_column(tmp_path):
    from vitslim import prune
    from vitslim.prune.surgery import prune_heads

    torch.manual_seed(0)
    model = load_model(_save(_beit(**BEIT_VARIANTS["per-layer bias, mean pooling"]), tmp_path))
    x = torch.randn(2, 3, 32, 32)
    silenced = copy.deepcopy(model)  # head 1 of block 0 contributes nothing: its proj columns are zero
    with torch.no_grad():
        silenced.blocks[0].attn.proj.weight[:, 16:32] = 0
        pruned = copy.deepcopy(silenced)
        prune_heads(vit_parts(pruned).blocks[0], [0, 2, 3])
        assert pruned.blocks[0].attn.position_bias.table.shape[1] == 3
        assert (pruned(x) - silenced(x)).abs().max() <= 1e-5
    prune.prune_(model, prune.PruneConfig(macs=0.7, importance="activation"), torch.randn(16, 3, 32, 32))
    heads = [bp.num_heads for bp in vit_parts(model).blocks]
    assert heads != [4, 4] and [bp.attn.position_bias.table.shape[1] for bp in vit_parts(model).blocks] == heads
    vitslim.save(model, tmp_path / "pruned", f"hf:{tmp_path / 'hf-model'}")  # reload replays the table slicing
    with torch.no_grad():
        assert torch.equal(vitslim.load(tmp_path / "pruned").model(x), model(x))


def test_beit_refusals_are_named(tmp_path):
    torch.manual_seed(0)
    model = load_model(_save(_beit(**BEIT_VARIANTS["per-layer bias, mean pooling"]), tmp_path / "beit"))
    with pytest.raises(UnsupportedModelError, match="BeitForImageClassification: .*relative position bias"):
        tokens.reduce_tokens_(model, tokens.ToMeConfig(r=2))
    with pytest.raises(UnsupportedModelError, match="rotation needs a LayerNorm final norm"):
        quant.quantize_(model, quant.preset("w4a4"), torch.randn(8, 3, 32, 32))  # it normalizes after pooling
    wide = transformers.BeitModel(transformers.BeitConfig(**SMALL, image_size=[32, 48], patch_size=8,
                                                          use_relative_position_bias=True))
    with pytest.raises(UnsupportedModelError, match="non-square"):
        load_model(_save(wide, tmp_path / "wide"))
    other_size = _beit("BeitModel", use_relative_position_bias=True)
    folder = _save(other_size, tmp_path / "other-size")
    transformers.BeitImageProcessor(size={"height": 48, "width": 48}).save_pretrained(folder.removeprefix("hf:"))
    with pytest.raises(UnsupportedModelError, match="differs from the model's image_size"):
        load_model(folder)


def test_beit_processor_resize_then_crop_is_the_same_preprocessing(example_images):
    from PIL import Image

    from vitslim.data import preprocessing_transform

    processor = transformers.BeitImageProcessor(size={"height": 64, "width": 64}, do_center_crop=True,
                                                crop_size={"height": 56, "width": 56}, resample=3)
    config = processor_config(processor.to_dict(), transformers.BeitConfig(image_size=56))
    assert config["input_size"] == (3, 56, 56) and config["crop_pct"] == pytest.approx(56 / 64)
    transform = preprocessing_transform(config)
    for path in sorted(example_images.iterdir())[:2]:
        image = Image.open(path).convert("RGB")
        ours, theirs = transform(image), processor(image, return_tensors="pt").pixel_values[0]
        assert (ours - theirs).abs().max() <= 1e-6


# Folders as the hub holds them (tests/models/hub_configs.py): the exact config.json and
# preprocessor_config.json fields, random weights. Where a test only needs the architecture,
# fewer layers keep the suite fast (depth takes no other code path).
HUB_DEPTH = {"google/vit-base-patch16-224": {"num_hidden_layers": 2}}


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory):
    made = {}

    def folder(repo: str):
        if repo not in made:
            made[repo] = write_hub_folder(repo, tmp_path_factory.mktemp("hub") / repo.split("/")[1],
                                          **HUB_DEPTH.get(repo, {}))
        return made[repo]
    return folder


def _transformers_model(folder):
    architecture = getattr(transformers, transformers.AutoConfig.from_pretrained(folder).architectures[0])
    return architecture.from_pretrained(folder).eval()


def _images(model, folder, limit=None):
    from vitslim.data import load_image_folder

    data = load_image_folder(folder, model, limit=limit)
    return torch.stack([data[i][0] for i in range(len(data))]), data


@pytest.mark.parametrize("repo", sorted(HUB_FOLDERS))
def test_hub_folder_is_preprocessed_and_computed_as_transformers_does(repo, hub_folder, example_images):
    from PIL import Image

    folder = hub_folder(repo)
    model = load_model(f"hf:{folder}")
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    ours, data = _images(model, example_images)
    theirs = processor([Image.open(path).convert("RGB") for path, _ in data.samples], return_tensors="pt").pixel_values
    assert len(data) == 16 and ours.shape == theirs.shape == (16, 3, 224, 224)
    assert (ours - theirs).abs().max() <= 1e-6  # every bundled photo, every pixel
    hf_model = _transformers_model(folder)
    with torch.no_grad():
        out = hf_model(theirs[:4])
        expected = out.logits if hasattr(out, "logits") else out.pooler_output
        assert (model(ours[:4]) - expected).abs().max() <= 1e-4
        assert expected.std() > 0.1  # random weights that do move the output


def test_hub_dinov2_exports_to_onnx_as_transformers_computes_it(example_images, tmp_path):
    """DINOv2's 518-px position embeddings are interpolated to the 224-px crop inside the graph."""
    from vitslim.bench import OnnxModel
    from vitslim.export import export_onnx

    folder = write_hub_folder("facebook/dinov2-small", tmp_path / "dinov2", num_hidden_layers=2)
    model = load_model(f"hf:{folder}")
    assert model.hf_config.image_size == 518 and vit_parts(model).num_tokens == 1 + 16 * 16
    x, _ = _images(model, example_images, limit=3)
    with torch.no_grad():
        expected = _transformers_model(folder)(x).pooler_output
    got = OnnxModel(export_onnx(model, tmp_path / "m.onnx"))(x)
    assert (got - expected).abs().max() <= 1e-4


def test_hub_swin_goes_through_the_hybrid_int8_path(example_images, tmp_path):
    from vitslim.bench import OnnxModel
    from vitslim.compress.search import HYBRID_GRID, default_grid
    from vitslim.export import export_onnx, integer_ops
    from vitslim.quant.hybrid import HybridQuantConfig, quantize_hybrid_

    folder = write_hub_folder("microsoft/swin-tiny-patch4-window7-224", tmp_path / "swin", depths=[1, 1, 2, 1])
    model = load_model(f"hf:{folder}")
    assert default_grid(model) == HYBRID_GRID and model.num_classes == 1000
    images, _ = _images(model, example_images)
    layers = sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in model.modules())
    assert layers == 5 * 6 + 3 + 2  # q, k, v, out, fc1, fc2 per block; 3 patch merges; patch embed; head
    with torch.no_grad():
        fp32 = model(images[:4])
    q = quantize_hybrid_(model, HybridQuantConfig(ranges=("minmax",), weight_calibration="minmax", error_images=2),
                         images[8:])
    path = export_onnx(q, tmp_path / "q.onnx")
    assert sum(integer_ops(path).values()) == layers  # every linear and conv on an int8 kernel
    got = OnnxModel(path)(images[:4])
    with torch.no_grad():
        assert (got - q(images[:4])).abs().max() <= 0.05 * fp32.abs().max()
    assert torch.nn.functional.cosine_similarity(got, fp32).min() > 0.99


def test_transformers_progress_bars_and_warnings_do_not_leak(tmp_path, capfd):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    hf_model = CASES["ViTForImageClassification"]()
    folder = _save(hf_model, tmp_path)
    # A tensor the model does not have: transformers logs that it was not used (missing tensors are refused).
    state = {**hf_model.state_dict(), "stray.weight": torch.zeros(3)}
    save_file(state, tmp_path / "hf-model" / "model.safetensors")
    capfd.readouterr()
    with pytest.warns(UserWarning, match="transformers: .*stray"):
        load_model(folder)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_hub_classifier_applies_exports_and_predicts_with_its_own_class_names(example_images, tmp_path):
    """apply -> ONNX -> predict from a folder as google/vit-base-patch16-224 holds it: the names
    come from its id2label, accuracy is scored (ImageNet photos, ImageNet head) and the contract
    says where the weights came from."""
    from typer.testing import CliRunner

    from vitslim.cli import app
    from vitslim.deploy import read_contract

    folder = write_hub_folder("google/vit-base-patch16-224", tmp_path / "vit", num_hidden_layers=1)
    out = tmp_path / "vit.onnx"
    res = CliRunner().invoke(app, ["apply", "ort-fp32", f"hf:{folder}", "--data", str(example_images),
                                   "--calib-images", "4", "--out", str(out)])
    assert res.exit_code == 0, res.output
    contract = read_contract(out)
    assert contract.source["weights"].startswith("Hugging Face weights from") and contract.model == f"hf:{folder.name}"
    assert contract.output["class_names"][:2] == ["tench", "goldfish"]
    assert contract.preprocessing["resampler"] == "tensor"
    assert contract.fidelity["top1"] is not None and "top1_not_scored" not in contract.fidelity
    res = CliRunner().invoke(app, ["predict", str(out), "--data", str(example_images), "--top-k", "1", "--json"])
    assert res.exit_code == 0, res.output
    names = {row["top_k"][0]["name"] for row in json.loads(res.output)["predictions"]}
    assert names and names <= set(contract.output["class_names"]) and not any(n.isdigit() for n in names)


def test_accuracy_is_not_scored_against_another_vocabulary(example_images, tmp_path):
    """ImageNet-labelled photos and a 3-class head: no top-1, and the reason; a base DINOv2
    records its feature dimension."""
    from vitslim.deploy import apply, predict_folder

    torch.manual_seed(0)
    config = transformers.ViTConfig(**SMALL, image_size=32, patch_size=8, id2label={0: "cat", 1: "dog", 2: "bird"},
                                    architectures=["ViTForImageClassification"])
    model = load_model(_save(transformers.ViTForImageClassification(config), tmp_path))
    assert model.class_names == ["cat", "dog", "bird"]
    artifact, figures = apply(model, "ort-fp32", example_images, tmp_path / "m.onnx", n_calib=4, n_eval=8)
    assert figures["top1"] is None and "not ImageNet-1k" in figures["top1_not_scored"]
    result = predict_folder(artifact, example_images, top_k=1)
    assert result.top1_accuracy is None and "not ImageNet-1k" in result.label_note
    assert {row[0][1] for row in result.top_k} <= {"cat", "dog", "bird"}
    features = apply(load_model(_save(CASES["Dinov2Model"](), tmp_path / "dino")), "ort-fp32", example_images,
                     tmp_path / "f.onnx", n_calib=4, n_eval=4)[0]
    assert features.contract.output == {"kind": "features", "dim": 64}


def test_float_token_reduction_recipe_exports_to_onnx_from_the_cli(example_images, tmp_path):
    """`apply tome-8 MODEL --out x.onnx`: FP32 + ToMe gets an export step and runs in ONNX
    Runtime as the token-reduced PyTorch model does."""
    from typer.testing import CliRunner

    from vitslim.bench import OnnxModel
    from vitslim.cli import app
    from vitslim.deploy import read_contract

    folder = write_hub_folder("facebook/dinov2-small", tmp_path / "dinov2", num_hidden_layers=2)
    out = tmp_path / "tome.onnx"
    res = CliRunner().invoke(app, ["apply", "tome-8", f"hf:{folder}", "--data", str(example_images),
                                   "--calib-images", "0", "--eval-images", "4", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert [next(iter(step)) for step in read_contract(out).recipe["steps"]] == ["tokens", "export"]
    merged = tokens.reduce_tokens_(load_model(f"hf:{folder}"), tokens.ToMeConfig(r=8))
    x, _ = _images(merged, example_images, limit=2)
    with torch.no_grad():
        expected = merged(x)
        assert tokens.token_state(merged).counts[-1] == 257 - 2 * 8
    assert (OnnxModel(out)(x) - expected).abs().max() <= 1e-4
