"""Orthogonal rotations folded into a ViT's weights, so that low-bit activations lose their outliers.

QuaRot (Ashkboos et al., "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs", 2024) and
SpinQuant (Liu et al., "SpinQuant: LLM Quantization with Learned Rotations", 2024): multiplying
the residual stream by an orthogonal Q (a randomized Hadamard) spreads a few huge channels over
all of them, which leaves the FP32 function unchanged (Q is folded into every weight that
reads or writes the stream) but makes per-tensor ranges fit every channel. Applied to a timm
ViT block (``vitslim.models.vit_parts``):

* **residual stream** (``x → xQ``). LayerNorm does not commute with Q, so it is first put into
  RMSNorm form as SliceGPT does (Ashkboos et al., "SliceGPT: Compress Large Language Models by
  Deleting Rows and Columns", 2024): LayerScale is folded into ``proj``/``fc2``, the LayerNorm
  scale and bias into the next linear (``qkv``, ``fc1``), and the mean subtraction is absorbed
  by centring everything that writes into the stream (patch embedding, class token, position
  embedding, ``proj``, ``fc2``): the stream then has zero mean per token and LayerNorm equals
  RMSNorm, which commutes with Q. The final norm's scale and bias, and the un-rotation
  ``Qᵀ``, become an explicit float ``Linear`` after it (:class:`UnrotatedNorm`): the model's
  output is the original feature.
* **per head q, k and v** (offline, head dim a power of two): a Hadamard H on each head's q
  and k cancels in q·kᵀ; on v it is undone by ``proj`` (its input columns).
* **online, before fc2** (optional): a randomized Hadamard transform of the post-GELU input in
  the graph (two small matmuls, the non-power-of-two factor's mix included), undone in
  ``fc2``'s weight. It costs 80 multiply-adds per element at DINOv2-S's width 1536 (fc2: 384)
  and makes the post-GELU input signed, so that site needs a uniform quantizer.

Widths that are not a power of two (384 = 3·128) use a Kronecker product of a randomized
Hadamard of the largest power-of-two factor and a seeded random orthogonal matrix of the rest.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from vitslim.errors import ConfigError, UnsupportedModelError
from vitslim.models import vit_parts
from vitslim.quant.config import ROTATIONS


def sylvester_hadamard(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The unnormalized Sylvester Hadamard matrix H_n = H_2 ⊗ … ⊗ H_2 (n a power of two)."""
    h = torch.ones(1, 1, dtype=dtype)
    while len(h) < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)))
    return h


def _random_orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))  # Haar-distributed (Mezzadri's sign fix)


class HadamardRotation(nn.Module):
    """x ↦ x·Q with Q = diag(signs)·(M ⊗ H_p/√p): random signs, a normalized Sylvester Hadamard
    of the largest power-of-two factor p of ``dim`` and a seeded random orthogonal M of the
    rest. Orthogonal; runs online as two small matmuls."""

    def __init__(self, dim: int, seed: int = 0) -> None:
        super().__init__()
        self.dim, self.pow2 = dim, dim & -dim
        gen = torch.Generator().manual_seed(seed)
        signs = torch.randint(0, 2, (dim,), generator=gen, dtype=torch.float64) * 2 - 1
        self.register_buffer("signs", signs.float())
        self.register_buffer("mix", _random_orthogonal(dim // self.pow2, gen).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # H_p = H_a ⊗ H_b (a, b ≈ √p), so x·Q is L·X·H_b with X the (m·a, b) reshape of x·signs and
        # L = (Mᵀ ⊗ H_a)/√p: two small matmuls (~n·(m·a + b) multiply-adds a token) on BLAS kernels,
        # forward and backward, where a log₂ p-stage butterfly of adds was 4-6× slower in PyTorch.
        lead, m = x.shape[:-1], self.dim // self.pow2
        a = 1 << (self.pow2.bit_length() - 1) // 2
        h_a = sylvester_hadamard(a, x.dtype)
        # Mᵀ ⊗ H_a by broadcasting: ONNX has no Kronecker product (the exporter rejects aten::kron).
        left = (self.mix.T[:, None, :, None] * h_a[None, :, None, :]).reshape(m * a, m * a) / math.sqrt(self.pow2)
        y = left @ (x * self.signs).reshape(*lead, m * a, self.pow2 // a) @ sylvester_hadamard(self.pow2 // a, x.dtype)
        return y.reshape(*lead, self.dim)

    @torch.no_grad()
    def matrix(self) -> torch.Tensor:
        """The dense Q in float64 (the rotation applied to the identity), for folding into weights."""
        return copy.deepcopy(self).double()(torch.eye(self.dim, dtype=torch.float64))


def rotation_matrix(dim: int, kind: str, seed: int = 0) -> torch.Tensor:
    """A (dim, dim) float64 orthogonal matrix: randomized (Kronecker) Hadamard or Haar-random."""
    if kind == "random":
        return _random_orthogonal(dim, torch.Generator().manual_seed(seed))
    return HadamardRotation(dim, seed).matrix()


class RMSNorm(nn.Module):
    """x / √(mean(x²) + eps), no affine: LayerNorm on a zero-mean stream (SliceGPT's form)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


class UnrotatedNorm(nn.Module):
    """The final norm of a rotated model: RMSNorm, then a float linear that applies the
    original LayerNorm's scale and bias and undoes the rotation (outputs are unchanged)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.norm, self.unrotate = RMSNorm(dim, eps), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unrotate(self.norm(x))


class OnlineRotation(nn.Module):
    """``act`` followed by an online Hadamard rotation (what fc2 then reads)."""

    def __init__(self, act: nn.Module, dim: int, seed: int) -> None:
        super().__init__()
        self.act, self.rotation = act, HadamardRotation(dim, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rotation(self.act(x))


def _check_supported(model: nn.Module) -> None:
    parts = vit_parts(model)  # names the model when no adapter knows it
    if getattr(model, "norm", None) is not parts.norm:
        raise UnsupportedModelError(f"rotation replaces the final norm as {type(model).__name__}.norm, which "
                                    "is not the norm its adapter names")
    for name in ("norm_pre", "fc_norm"):
        if not isinstance(getattr(model, name, nn.Identity()), nn.Identity):
            raise UnsupportedModelError(f"rotation needs {name} to be Identity (a class-token ViT with a final "
                                        f"norm, like DINOv2/DeiT); {type(model).__name__}.{name} is not")
    patch_norm = getattr(getattr(model, "patch_embed", None), "norm", nn.Identity())
    if not isinstance(parts.norm, nn.LayerNorm) or not isinstance(patch_norm, nn.Identity):
        raise UnsupportedModelError(f"rotation needs a LayerNorm final norm and a patch embedding without norm; "
                                    f"{type(model).__name__} has a {type(parts.norm).__name__} final norm (BEiT "
                                    "with mean pooling normalizes after pooling): use a preset without rotation")
    if not isinstance(parts.patch_proj, nn.Conv2d):
        raise UnsupportedModelError(f"rotation needs a convolutional patch embedding; {type(model).__name__} has "
                                    f"{type(parts.patch_proj).__name__}")
    for bp in parts.blocks:
        if not (isinstance(bp.norm1, nn.LayerNorm) and isinstance(bp.norm2, nn.LayerNorm)):
            raise UnsupportedModelError(f"block {bp.index}: rotation needs LayerNorm norms (already rotated?)")


def _fold_layer_scale(linear: nn.Linear, ls: nn.Module) -> None:
    gamma = getattr(ls, "gamma", None)
    if gamma is not None:
        linear.weight.mul_(gamma[:, None])
        linear.bias.mul_(gamma)


def _center_rows(linear: nn.Linear) -> None:
    """Outputs with zero mean over channels (for every input)."""
    linear.weight.sub_(linear.weight.mean(0, keepdim=True))
    linear.bias.sub_(linear.bias.mean())


def _fold_norm_into(norm: nn.LayerNorm, linear: nn.Linear, q: torch.Tensor) -> None:
    """linear(LN(x)) == linear'(RMSNorm(x·Q)) for zero-mean x."""
    w = linear.weight.double()
    linear.bias.copy_(linear.bias.double() + w @ norm.bias.double())
    linear.weight.copy_((w * norm.weight.double()) @ q)


def _rotate_output(linear: nn.Module, q: torch.Tensor) -> None:
    """Rows (output channels) of a linear or conv written into the stream: y ↦ y·Q."""
    w = linear.weight.double()
    linear.weight.copy_((q.T @ w.reshape(len(w), -1)).reshape(w.shape))
    linear.bias.copy_(linear.bias.double() @ q)


def _rotate_heads(bp, h: torch.Tensor) -> None:
    """q, k and v of each head by H (offline): q·kᵀ unchanged, v's H undone in proj's columns."""
    heads = bp.num_heads
    w, b = bp.qkv.weight.double(), bp.qkv.bias.double()
    w = (h.T @ w.reshape(3 * heads, h.shape[0], -1)).reshape(w.shape)  # each head's rows: H^T·W
    b = (b.reshape(3 * heads, -1) @ h).reshape(b.shape)
    bp.qkv.weight.copy_(w)
    bp.qkv.bias.copy_(b)
    bp.proj.weight.copy_(bp.proj.weight.double() @ torch.block_diag(*[h] * heads))


@torch.no_grad()
def rotate(model: nn.Module, kind: str = "hadamard", seed: int = 0) -> nn.Module:
    """Fold orthogonal rotations into a ViT (timm or Hugging Face, through the model adapter),
    in place (QuaRot 2024 / SpinQuant 2024 on
    SliceGPT's 2024 LayerNorm→RMSNorm form); FP32 outputs are unchanged. ``kind``: ``hadamard``
    (residual stream + per-head q/k/v), ``hadamard-online`` (also an online Hadamard before
    fc2), ``random`` (a Haar-random residual rotation + per-head Hadamard)."""
    if kind not in ROTATIONS:
        raise ConfigError(f"rotation={kind!r} is not one of {ROTATIONS}")
    _check_supported(model)
    parts = vit_parts(model)
    dim = parts.patch_proj.out_channels
    device = parts.patch_proj.weight.device  # "meta" when io.py only checks shapes
    q = rotation_matrix(dim, kind, seed).to(device)
    # Everything that writes into the stream: centred (LayerNorm → RMSNorm), then rotated.
    _center_rows(parts.patch_proj)  # conv: mean over output channels of weight and bias
    _rotate_output(parts.patch_proj, q)
    for t in parts.stream_tensors:  # tokens and position embeddings (interpolation acts per channel)
        t.copy_((t.double() - t.double().mean(-1, keepdim=True)) @ q)
    for bp in parts.blocks:
        for linear, ls in ((bp.proj, bp.ls1), (bp.fc2, bp.ls2)):
            _fold_layer_scale(linear, ls)
            _center_rows(linear)
            _rotate_output(linear, q)
        bp.block.ls1, bp.block.ls2 = nn.Identity(), nn.Identity()
        _fold_norm_into(bp.norm1, bp.qkv, q)
        _fold_norm_into(bp.norm2, bp.fc1, q)
        bp.block.norm1 = RMSNorm(dim, bp.norm1.eps)
        bp.block.norm2 = RMSNorm(dim, bp.norm2.eps)
        head_dim = dim // bp.num_heads
        if head_dim & (head_dim - 1) == 0 and all(isinstance(getattr(bp.attn, n, nn.Identity()), nn.Identity)
                                                    for n in ("q_norm", "k_norm", "norm")):
            _rotate_heads(bp, rotation_matrix(head_dim, "hadamard", seed + 1 + bp.index).to(device))
        if kind == "hadamard-online":
            online = OnlineRotation(bp.act, bp.fc2.in_features, seed + 1000 + bp.index)
            bp.fc2.weight.copy_(bp.fc2.weight.double() @ online.rotation.matrix().to(device))
            bp.mlp.act = online.to(device)
    final = UnrotatedNorm(dim, parts.norm.eps).to(device)
    final.unrotate.weight.copy_(parts.norm.weight.double()[:, None] * q)  # diag(g)·Q
    final.unrotate.bias.copy_(parts.norm.bias)
    model.norm = final  # timm and Hugging Face wrappers alike read their final norm as ``model.norm``
    return model
