"""Block reconstruction: tune each block's quantization parameters against its FP32 output.

The second stage of I&S-ViT (Zhong et al., 2023), in the style of BRECQ (Li et al., "BRECQ:
Pushing the Limit of Post-Training Quantization by Block Reconstruction", ICLR 2021) and QDrop
(Wei et al., 2022). Block by block, the quantized block takes the output of the already
reconstructed quantized blocks, and its weight and activation step sizes (the weights keep the
integer codes already chosen, e.g. by GPTQ; activation steps are learned through a
straight-through rounding estimator, LSQ-style) are tuned with Adam so its
output matches the FP32 block's output on the FP32 input. As in QDrop, each activation is
quantized with probability 1/2 during tuning, which keeps the learned steps robust.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from vitslim.models import vit_parts
from vitslim.progress import progress_bar
from vitslim.quant.modules import QuantLinear
from vitslim.quant.quantizers import UniformQuantizer


def _ste_round(x: torch.Tensor) -> torch.Tensor:
    return (x.round() - x).detach() + x


class _LearnableSteps:
    """Turns a block's uniform quantizers into ones with learnable step sizes, and back."""

    def __init__(self, block: nn.Module) -> None:
        self.acts = [m for m in block.modules() if isinstance(m, UniformQuantizer) and m.mode == "quant"
                     and not hasattr(m, "calibrate_weight")]
        self.linears = [m for m in block.modules() if isinstance(m, QuantLinear)]
        self.params = []
        for q in self.acts:
            q.log_scale = nn.Parameter(q.scale.detach().clamp_min(1e-8).log())
            q.fake_quant = self._act_fake_quant(q)
            self.params.append(q.log_scale)
        for lin in self.linears:
            wq = lin.weight_quantizer
            # Keep the integer codes already chosen (GPTQ's error-compensated rounding); tune steps.
            wq.codes = torch.round(lin.qweight / wq.scale).detach()
            wq.log_scale = nn.Parameter(wq.scale.detach().clamp_min(1e-8).log())
            self.params.append(wq.log_scale)

    @staticmethod
    def _act_fake_quant(q: UniformQuantizer):
        def fake_quant(x: torch.Tensor) -> torch.Tensor:
            scale = q.log_scale.exp()
            xq = (torch.clamp(_ste_round(x / scale) + q.zero_point, q.qmin, q.qmax) - q.zero_point) * scale
            if torch.is_grad_enabled():  # QDrop: keep half of the activations in full precision
                keep = torch.rand_like(x) < 0.5
                return torch.where(keep, x, xq)
            return xq

        return fake_quant

    def weights(self) -> None:
        """Set each linear's quantized weight from its codes and (learnable) step."""
        for lin in self.linears:
            lin.qweight = lin.weight_quantizer.codes * lin.weight_quantizer.log_scale.exp()

    def freeze(self) -> None:
        with torch.no_grad():
            for q in self.acts:
                q.scale = q.log_scale.exp().detach()
                del q.log_scale, q.fake_quant  # back to the class's fake_quant
            for lin in self.linears:
                wq = lin.weight_quantizer
                wq.scale = wq.log_scale.exp().detach()
                lin.qweight = wq.codes * wq.scale
                del wq.log_scale, wq.codes


@torch.no_grad()
def _block_inputs(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """The input of every block (and the last block's output) for ``images``."""
    captured = []
    hooks = [b.register_forward_pre_hook(lambda m, a: captured.append(a[0])) for b in model.blocks]
    model.forward_features(images)
    for h in hooks:
        h.remove()
    return captured


def reconstruct_blocks(fp_model: nn.Module, qmodel: nn.Module, images: torch.Tensor, iters: int,
                       lr: float = 1e-3, batch_size: int = 8) -> float:
    """Tune every block of ``qmodel`` for ``iters`` Adam steps; returns the seconds it took."""
    start = time.perf_counter()
    fp_blocks, q_blocks = vit_parts(fp_model).blocks, vit_parts(qmodel).blocks
    fp_in = torch.cat([torch.stack(_block_inputs(fp_model, b)) for b in images.split(batch_size)], 1)
    q_in = fp_in[0]
    for i, (fp_bp, q_bp) in enumerate(progress_bar(list(zip(fp_blocks, q_blocks)), "block reconstruction")):
        with torch.no_grad():
            target = fp_bp.block(fp_in[i])
        steps = _LearnableSteps(q_bp.block)
        opt = torch.optim.Adam(steps.params, lr=lr)
        gen = torch.Generator().manual_seed(i)
        for _ in range(iters):
            idx = torch.randperm(len(q_in), generator=gen)[:batch_size]
            steps.weights()
            loss = (q_bp.block(q_in[idx]) - target[idx]).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        steps.freeze()
        with torch.no_grad():
            q_in = q_bp.block(q_in)
    return time.perf_counter() - start
