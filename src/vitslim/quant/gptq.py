"""GPTQ weight quantization.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", ICLR 2023. Columns of a weight matrix are rounded one at a time; each rounding
error is spread over the not-yet-rounded columns through the inverse Hessian H⁻¹ of the
layer's calibration inputs (H = 2XᵀX), which minimises ‖XWᵀ − XŴᵀ‖². Lazy batch updates
(blocks of 128 columns) and a Cholesky factor of H⁻¹ keep it fast and stable.

vitslim collects every layer's H in one calibration pass with FP inputs (the paper feeds each
layer the outputs of already-quantized layers; one pass is what fits a 2-core CPU budget).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from vitslim.progress import progress_bar
from vitslim.quant.primitives import absmax_symmetric_scale, int_range, mse_symmetric_scale, uniform_fake_quant


def gptq_quantize_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scale: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    damp: float = 0.01,
    block_size: int = 128,
    group_scales: list[torch.Tensor] | None = None,
    act_order: bool = False,
    search_group_scales: bool = False,
) -> torch.Tensor:
    """Quantize ``weight`` (out, in) column by column with GPTQ error feedback.

    ``scale`` (out, 1) is the symmetric per-output-channel step; with ``group_size`` a new
    scale is taken for every group of input columns (absmax, or with ``search_group_scales``
    the clipped range of least rounding error, ``mse_symmetric_scale``). Returns the dequantized
    weight, on the integer grid; ``group_scales``, if given, receives each group's (out, 1) scale (what
    a block-wise integer export such as ``vitslim.export.nbits`` stores).

    ``act_order`` rounds the columns with the largest Hessian diagonal (the most active inputs)
    first, while most columns are left to absorb their error (the GPTQ authors' "act-order");
    groups then keep their natural columns, with scales taken from the weight before any
    update ("static groups"), so the stored layout is the same as without it.
    """
    with one_thread():
        group_scale = mse_symmetric_scale if search_group_scales else absmax_symmetric_scale
        return _gptq(weight, hessian, scale, bits, group_size, damp, block_size, group_scales, act_order,
                     group_scale)


def _gptq(weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int | None,
          damp: float, block_size: int, group_scales: list[torch.Tensor] | None, act_order: bool,
          group_scale: Callable[[torch.Tensor, int, int], torch.Tensor]) -> torch.Tensor:
    """GPTQ proper (the paper's Algorithm 1 with lazy batch updates); see gptq_quantize_weight."""
    qmin, qmax = int_range(bits, signed=True)
    w = weight.detach().clone().float()
    h = hessian.detach().clone().float()
    cols = w.shape[1]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    static = [group_scale(g, qmin, qmax) for g in w.split(group_size, 1)] if group_size and act_order else None
    if static is not None and group_scales is not None:
        group_scales.extend(static)
    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(cols)
    w, h = w[:, order], h[order][:, order]
    h += damp * torch.diag(h).mean() * torch.eye(cols)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    scale = scale.float().reshape(-1, 1)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1, h1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            col = i1 + i
            if static is not None:
                scale = static[int(order[col]) // group_size]
            elif group_size and col % group_size == 0:
                group = torch.cat([w1[:, i:], w[:, i2:]], 1)[:, :group_size]
                scale = group_scale(group, qmin, qmax)
                if group_scales is not None:
                    group_scales.append(scale)
            qc = uniform_fake_quant(w1[:, i : i + 1], scale, 0, qmin, qmax)
            q[:, col : col + 1] = qc
            err = (w1[:, i : i + 1] - qc) / h1[i, i]
            w1[:, i:] -= err @ h1[i : i + 1, i:]
            err1[:, i : i + 1] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q[:, torch.argsort(order)].to(weight.dtype)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run small tensor ops on one thread: each would otherwise wait at a thread barrier, which
    on a busy CPU costs more than the op (GPTQ's column loop and Cholesky are such ops; they
    are too small to gain from a second thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class HessianCollector:
    """Accumulates H = 2/n · Σ xxᵀ of each layer's inputs during a calibration pass."""

    def __init__(self, linears: dict[str, nn.Module]) -> None:
        self.layers = list(linears.values())
        self.h = {id(m): torch.zeros(m.linear.in_features, m.linear.in_features) for m in self.layers}
        self.n = {id(m): 0 for m in self.layers}
        self.handles = [m.register_forward_pre_hook(self._hook) for m in self.layers]

    def _hook(self, module: nn.Module, inputs: tuple) -> None:
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
        self.h[id(module)] += 2 * x.T @ x
        self.n[id(module)] += x.shape[0]

    def finish(self) -> list[tuple[nn.Module, torch.Tensor]]:
        for handle in self.handles:
            handle.remove()
        return [(m, self.h[id(m)] / max(self.n[id(m)], 1)) for m in self.layers]


def gptq_quantize_linears(items: list[tuple[nn.Module, torch.Tensor]], group_size: int | None = None,
                          act_order: bool = False) -> None:
    """GPTQ for each ``QuantLinear`` with its Hessian; sets its ``qweight``."""
    for layer, hessian in progress_bar(items, "GPTQ weights"):
        quantizer = layer.weight_quantizer
        with one_thread():  # (see one_thread)
            quantizer.calibrate_weight(layer.linear.weight)
        scales: list[torch.Tensor] = []
        layer.qweight = gptq_quantize_weight(layer.linear.weight, hessian, quantizer.scale,
                                             quantizer.bits, group_size=group_size, group_scales=scales,
                                             act_order=act_order, search_group_scales=quantizer.method == "mse")
        layer.qweight_group_scales = torch.cat(scales, 1) if scales else None
