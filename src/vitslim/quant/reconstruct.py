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
from vitslim.quant.primitives import uniform_fake_quant_ste
from vitslim.quant.quantizers import UniformQuantizer

GAMMA, ZETA = -0.1, 1.1  # AdaRound's rectified-sigmoid stretch


class _LearnableBlock:
    """Makes a block's weight rounding (AdaRound) and activation steps (LSQ) learnable, and
    hardens them back into plain quantizer parameters with ``freeze``."""

    def __init__(self, block: nn.Module) -> None:
        self.acts = [m for m in block.modules() if isinstance(m, UniformQuantizer) and m.mode == "quant"
                     and not hasattr(m, "calibrate_weight")]
        self.linears = [m for m in block.modules() if isinstance(m, QuantLinear)]
        self.step_params, self.round_params = [], []
        for q in self.acts:
            q.log_scale = nn.Parameter(q.scale.detach().clamp_min(1e-8).log())
            q.fake_quant = self._act_fake_quant(q)
            self.step_params.append(q.log_scale)
        for lin in self.linears:
            wq = lin.weight_quantizer
            scaled = lin.linear.weight.detach() / wq.scale
            wq.floor = scaled.floor()
            rest = (scaled - wq.floor).clamp(0.01, 0.99)
            # Start where the soft rounding equals the FP weight (AdaRound's initialisation).
            wq.round_logit = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
            self.round_params.append(wq.round_logit)

    @staticmethod
    def _act_fake_quant(q: UniformQuantizer):
        def fake_quant(x: torch.Tensor) -> torch.Tensor:
            scale = q.log_scale.exp()
            xq = uniform_fake_quant_ste(x, scale, q.zero_point, q.qmin, q.qmax)
            if torch.is_grad_enabled():  # QDrop: keep half of the activations in full precision
                return torch.where(torch.rand_like(x) < 0.5, x, xq)
            return xq

        return fake_quant

    @staticmethod
    def _soft(wq) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(wq.round_logit) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def weights(self) -> None:
        """Each linear's weight with soft (learnable) rounding."""
        for lin in self.linears:
            wq = lin.weight_quantizer
            lin.qweight = torch.clamp(wq.floor + self._soft(wq), wq.qmin, wq.qmax) * wq.scale

    def rounding_penalty(self, beta: float) -> torch.Tensor:
        """AdaRound's regulariser: pushes every soft rounding to 0 or 1 as ``beta`` falls."""
        return sum((1 - (2 * self._soft(lin.weight_quantizer) - 1).abs().pow(beta)).sum() for lin in self.linears)

    def freeze(self) -> None:
        with torch.no_grad():
            for q in self.acts:
                q.scale = q.log_scale.exp().detach()
                del q.log_scale, q.fake_quant  # back to the class's fake_quant
            for lin in self.linears:
                wq = lin.weight_quantizer
                hard = (wq.round_logit >= 0).float()
                lin.qweight = torch.clamp(wq.floor + hard, wq.qmin, wq.qmax) * wq.scale
                del wq.round_logit, wq.floor


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
                       lr: float = 1e-2, batch_size: int = 8, penalty: float = 0.01) -> float:
    """Tune every block of ``qmodel`` for ``iters`` Adam steps; returns the seconds it took.
    Weight rounding is learned afresh from the FP32 weights (replacing round-to-nearest or
    GPTQ's choice) and hardened at the end."""
    start = time.perf_counter()
    fp_blocks, q_blocks = vit_parts(fp_model).blocks, vit_parts(qmodel).blocks
    fp_in = torch.cat([torch.stack(_block_inputs(fp_model, b)) for b in images.split(batch_size)], 1)
    q_in = fp_in[0]
    for i, (fp_bp, q_bp) in enumerate(progress_bar(list(zip(fp_blocks, q_blocks)), "block reconstruction")):
        with torch.no_grad():
            target = fp_bp.block(fp_in[i])
        learn = _LearnableBlock(q_bp.block)
        opt = torch.optim.Adam([{"params": learn.round_params, "lr": lr},
                                {"params": learn.step_params, "lr": lr / 10}])
        gen = torch.Generator().manual_seed(i)
        for step in range(iters):
            idx = torch.randperm(len(q_in), generator=gen)[:batch_size]
            learn.weights()
            loss = (q_bp.block(q_in[idx]) - target[idx]).pow(2).mean()
            if step >= iters // 5:  # AdaRound: a warm-up without the penalty, then β from 20 to 2
                beta = 20 - 18 * (step - iters // 5) / max(1, iters - iters // 5)
                loss = loss + penalty * learn.rounding_penalty(beta) / sum(p.numel() for p in learn.round_params)
            opt.zero_grad()
            loss.backward()
            opt.step()
        learn.freeze()
        with torch.no_grad():
            q_in = q_bp.block(q_in)
    return time.perf_counter() - start
