"""GPTQ with asymmetric calibration: each weight fitted to what the quantized model feeds it.

Plain GPTQ rounds ``W`` to keep ``Ŵx`` close to ``Wx`` on FP32 inputs ``x``. In a quantized
model the layer sees ``x̃`` instead: its own input quantized, after every earlier layer's
error. Asymmetric calibration (Li et al., "GPTAQ: Efficient Finetuning-Free Quantization for
Asymmetric Calibration", ICML 2025; the same target as BRECQ/QDrop's reconstruction, without
training) minimises ``‖Ŵx̃ − Wx‖²`` instead. Its least-squares optimum is ``W* = W·C·H̃⁻¹``
with ``H̃ = Σ x̃x̃ᵀ`` and ``C = Σ x x̃ᵀ``, and since the residual ``Wx − W*x̃`` is orthogonal to
every ``x̃``, ``‖Ŵx̃ − Wx‖² = ‖(Ŵ − W*)x̃‖² + const``: GPTQ of ``W*`` with the Hessian ``H̃``
minimises the asymmetric objective exactly.

The layers are taken in order, block by block (qkv, proj, fc1, fc2), each calibrated on the
quantized model's inputs with every earlier layer already rounded; the FP32 inputs of every
block are computed once.
"""

from __future__ import annotations

import torch
from torch import nn

from vitslim.models import vit_parts
from vitslim.progress import progress_bar
from vitslim.quant.gptq import gptq_quantize_layer, one_thread
from vitslim.quant.modules import QuantLinear
from vitslim.quant.reconstruct import block_inputs

LINEARS = ("qkv", "proj", "fc1", "fc2")  # in the order a block computes them


def asymmetric_target(weight: torch.Tensor, h_quant: torch.Tensor, cross: torch.Tensor,
                      damp: float = 0.01) -> torch.Tensor:
    """``W* = W·C·(H̃ + λI)⁻¹``: the weight that maps quantized inputs (second moments ``h_quant``
    = Σ x̃x̃ᵀ) best onto the FP32 outputs (``cross`` = Σ x x̃ᵀ); λ is GPTQ's damping."""
    h = h_quant.double() + damp * torch.diag(h_quant).mean().double() * torch.eye(len(h_quant), dtype=torch.float64)
    return torch.linalg.solve(h, (weight.double() @ cross.double()).T).T.to(weight.dtype)


@torch.no_grad()
def _inputs(block: nn.Module, linears: list[nn.Module], x: torch.Tensor, batch_size: int,
            quantized: bool) -> list[list[torch.Tensor]]:
    """Each linear's input per batch when ``block`` runs on ``x`` (its quantized input if asked)."""
    seen: list[list[torch.Tensor]] = [[] for _ in linears]

    def hook(i: int):
        def capture(module, args):
            inp = module.input_quantizer(args[0]) if quantized else args[0]
            seen[i].append(inp.reshape(-1, inp.shape[-1]).float())
        return capture

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(linears)]
    try:
        for batch in x.split(batch_size):
            block(batch)
    finally:
        for h in handles:
            h.remove()
    return seen


@torch.no_grad()
def asymmetric_gptq_blocks(fp_model: nn.Module, qmodel: nn.Module, images: torch.Tensor,
                           group_size: int | None = None, act_order: bool = False, batch_size: int = 16) -> None:
    """GPTQ every linear of ``qmodel``'s blocks (activation quantizers calibrated, weights not
    yet rounded) on the asymmetric objective against ``fp_model`` (the same FP32 model)."""
    fp_blocks, q_blocks = vit_parts(fp_model).blocks, vit_parts(qmodel).blocks
    fp_in = block_inputs(fp_model, images, batch_size)
    q_in = fp_in[0]
    for i, (fp_bp, q_bp) in enumerate(progress_bar(list(zip(fp_blocks, q_blocks)), "asymmetric GPTQ")):
        fp_x = _inputs(fp_bp.block, [getattr(fp_bp, n) for n in LINEARS], fp_in[i], batch_size, quantized=False)
        for j, name in enumerate(LINEARS):
            layer = getattr(q_bp, name)
            if not isinstance(layer, QuantLinear):
                raise TypeError(f"block {i}.{name} is not quantized")
            (q_x,) = _inputs(q_bp.block, [layer], q_in, batch_size, quantized=True)
            h = sum(x.T @ x for x in q_x)
            cross = sum(x.T @ xq for x, xq in zip(fp_x[j], q_x))
            with one_thread():  # (see gptq.one_thread)
                target = asymmetric_target(layer.linear.weight.detach(), h, cross)
            gptq_quantize_layer(layer, h, group_size, act_order, weight=target)
        q_in = torch.cat([q_bp.block(x) for x in q_in.split(batch_size)])
