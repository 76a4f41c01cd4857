"""Block reconstruction: tune each block's quantization parameters against its FP32 output.

The second stage of I&S-ViT (Zhong et al., 2023), in the style of BRECQ (Li et al., "BRECQ:
Pushing the Limit of Post-Training Quantization by Block Reconstruction", ICLR 2021) and QDrop
(Wei et al., "QDrop: Randomly Dropping Quantization for Extremely Low-bit Post-Training
Quantization", ICLR 2022). Block by block, the quantized block takes the output of the already
reconstructed quantized blocks, and is tuned with Adam so its output matches the FP32 block's
output on the FP32 input. Every block's FP32 input is computed once, in one pass of the FP32
model, and each target once per block: a step costs one forward and backward of one block.

What is tuned (the learned step sizes follow LSQ, Esser et al., "Learned Step Size
Quantization", ICLR 2020, through a straight-through rounding estimator):

* the step of every uniform activation quantizer;
* the weights' steps, one multiplier per output row and weight group (GPTQ's groups, or the
  row), with the integer codes already chosen (e.g. by GPTQ) kept; or, with
  ``learn_rounding``, the rounding itself, learned afresh from the FP32 weight as in AdaRound
  (Nagel et al., "Up or Down? Adaptive Rounding for Post-Training Quantization", ICML 2020).

As in QDrop, each activation is quantized with probability 1/2 during tuning (the others pass
in full precision), which keeps the learned steps robust to the errors of other sites; log
quantizers (softmax) pass their gradient straight through, so q and k still learn through the
attention probabilities.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from vitslim.models import vit_parts
from vitslim.progress import progress_bar
from vitslim.quant.modules import QuantLinear
from vitslim.quant.primitives import uniform_fake_quant_ste
from vitslim.quant.quantizers import Quantizer, UniformQuantizer, WeightQuantizer

GAMMA, ZETA = -0.1, 1.1  # AdaRound's rectified-sigmoid stretch


def weight_steps(layer: QuantLinear) -> torch.Tensor:
    """The (out, groups) weight steps of a quantized linear: GPTQ's group scales, or one per row."""
    grouped = getattr(layer, "qweight_group_scales", None)
    return grouped if grouped is not None else layer.weight_quantizer.scale.reshape(-1, 1)


def _per_column(steps: torch.Tensor, columns: int) -> torch.Tensor:
    """(out, groups) steps spread over the (out, columns) weight (groups of equal width, the last cut)."""
    width = -(-columns // steps.shape[1])
    return steps.repeat_interleave(width, 1)[:, :columns]


class _LearnableBlock:
    """Makes a block's quantizer steps (and optionally its weight rounding) learnable, and
    hardens them back into plain quantizer parameters with ``freeze``."""

    def __init__(self, block: nn.Module, learn_rounding: bool, drop_prob: float, gen: torch.Generator,
                 learn_bias: bool = False) -> None:
        sites = [m for m in block.modules() if isinstance(m, Quantizer) and not isinstance(m, WeightQuantizer)
                 and m.mode == "quant"]
        self.sites, self.acts = sites, [q for q in sites if isinstance(q, UniformQuantizer)]
        self.linears = [m for m in block.modules() if isinstance(m, QuantLinear) and m.qweight is not None]
        self.step_params, self.round_params = [], []
        # Bias correction learned with the steps: a linear's bias absorbs the mean shift that its
        # quantized weights and input leave in its output, which no step can remove.
        self.bias_params = [lin.linear.bias for lin in self.linears if learn_bias and lin.linear.bias is not None]
        self.bias_grad_flags = [b.requires_grad for b in self.bias_params]
        for bias in self.bias_params:
            bias.requires_grad_()
        for q in sites:
            if q in self.acts:
                q.log_scale = nn.Parameter(q.scale.detach().clamp_min(1e-8).log())
                self.step_params.append(q.log_scale)
            q.fake_quant = self._dropped(q, drop_prob, gen)
        for lin in self.linears:
            steps = weight_steps(lin)
            lin.log_step_gain = nn.Parameter(torch.zeros_like(steps))
            self.step_params.append(lin.log_step_gain)
            wq, step = lin.weight_quantizer, _per_column(steps, lin.linear.in_features)
            if learn_rounding:
                scaled = lin.linear.weight.detach() / step
                lin.base_codes = scaled.floor()
                rest = (scaled - lin.base_codes).clamp(0.01, 0.99)
                # Start where the soft rounding equals the FP weight (AdaRound's initialisation).
                lin.round_logit = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
                self.round_params.append(lin.round_logit)
            else:
                lin.base_codes = (lin.qweight.detach() / step).round().clamp(wq.qmin, wq.qmax)

    @staticmethod
    def _dropped(q: Quantizer, drop_prob: float, gen: torch.Generator):
        """``q``'s fake quantization with a trainable (uniform: LSQ) or straight-through (log)
        gradient, quantizing each value with probability 1 − ``drop_prob`` while training."""
        plain = type(q).fake_quant

        def fake_quant(x: torch.Tensor) -> torch.Tensor:
            if isinstance(q, UniformQuantizer):
                xq = uniform_fake_quant_ste(x, q.log_scale.exp(), q.zero_point, q.qmin, q.qmax)
            else:
                xq = x + (plain(q, x) - x).detach()
            if torch.is_grad_enabled():
                return torch.where(torch.rand(x.shape, generator=gen, dtype=x.dtype) < drop_prob, x, xq)
            return xq

        return fake_quant

    @staticmethod
    def _soft(lin: QuantLinear) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(lin.round_logit) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def _weight(self, lin: QuantLinear, hard: bool) -> torch.Tensor:
        wq = lin.weight_quantizer
        codes = lin.base_codes
        if hasattr(lin, "round_logit"):
            codes = codes + ((lin.round_logit >= 0).float() if hard else self._soft(lin))
        step = _per_column(weight_steps(lin) * lin.log_step_gain.exp(), lin.linear.in_features)
        return torch.clamp(codes, wq.qmin, wq.qmax) * step

    def weights(self) -> None:
        """Each linear's weight from its current (soft) codes and steps."""
        for lin in self.linears:
            lin.qweight = self._weight(lin, hard=False)

    def rounding_penalty(self, beta: float) -> torch.Tensor:
        """AdaRound's regulariser: pushes every soft rounding to 0 or 1 as ``beta`` falls."""
        return sum((1 - (2 * self._soft(lin) - 1).abs().pow(beta)).sum() for lin in self.linears)

    def freeze(self) -> None:
        with torch.no_grad():
            for q in self.acts:
                q.scale = q.log_scale.exp().detach()
                del q.log_scale
            for q in self.sites:
                del q.fake_quant  # back to the class's fake_quant
            for lin in self.linears:
                lin.qweight = self._weight(lin, hard=True).detach()
                gain = lin.log_step_gain.exp().detach()
                if getattr(lin, "qweight_group_scales", None) is not None:
                    lin.qweight_group_scales = lin.qweight_group_scales * gain
                else:
                    wq = lin.weight_quantizer
                    wq.scale = wq.scale * gain.reshape(wq.scale.shape)
                del lin.log_step_gain, lin.base_codes
                if hasattr(lin, "round_logit"):
                    del lin.round_logit
            for bias, flag in zip(self.bias_params, self.bias_grad_flags):
                bias.requires_grad_(flag)


@torch.no_grad()
def _block_inputs(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """The input of every block for ``images``."""
    captured = []
    hooks = [b.register_forward_pre_hook(lambda m, a: captured.append(a[0])) for b in model.blocks]
    model.forward_features(images)
    for h in hooks:
        h.remove()
    return captured


def reconstruct_blocks(fp_model: nn.Module, qmodel: nn.Module, images: torch.Tensor, iters: int,
                       lr: float = 1e-2, batch_size: int = 4, penalty: float = 0.01,
                       learn_rounding: bool = False, drop_prob: float = 0.5, learn_bias: bool = False,
                       bias_lr: float = 1e-4) -> float:
    """Tune every block of ``qmodel`` for ``iters`` Adam steps against ``fp_model``'s blocks
    on ``images``, ``batch_size`` images a step; returns the seconds it took. With
    ``learn_rounding`` the weight rounding is learned afresh (AdaRound, replacing GPTQ's codes)
    and hardened at the end; ``drop_prob`` is QDrop's probability of leaving an activation
    unquantized during tuning. With ``learn_bias`` every quantized linear's bias learns too, at
    ``bias_lr`` (bias correction, Nagel et al., "Data-Free Quantization Through Weight
    Equalization and Bias Correction", 2019, here learned against the block's FP32 output)."""
    start = time.perf_counter()
    fp_blocks, q_blocks = vit_parts(fp_model).blocks, vit_parts(qmodel).blocks
    fp_in = torch.cat([torch.stack(_block_inputs(fp_model, b)) for b in images.split(batch_size)], 1)
    q_in = fp_in[0]
    for i, (fp_bp, q_bp) in enumerate(progress_bar(list(zip(fp_blocks, q_blocks)), "block reconstruction")):
        with torch.no_grad():
            target = torch.cat([fp_bp.block(x) for x in fp_in[i].split(batch_size)])
        gen = torch.Generator().manual_seed(i)
        learn = _LearnableBlock(q_bp.block, learn_rounding, drop_prob, gen, learn_bias)
        opt = torch.optim.Adam([{"params": learn.round_params + learn.step_params},
                                {"params": learn.bias_params, "lr": bias_lr}], lr=lr)
        with torch.enable_grad():  # also when quantize_ is called under torch.no_grad()
            for step in range(iters):
                idx = torch.randperm(len(q_in), generator=gen)[:batch_size]
                learn.weights()
                loss = (q_bp.block(q_in[idx]) - target[idx]).pow(2).mean()
                if learn.round_params and step >= iters // 5:  # AdaRound: warm-up, then β from 20 to 2
                    beta = 20 - 18 * (step - iters // 5) / max(1, iters - iters // 5)
                    loss = loss + penalty * learn.rounding_penalty(beta) / sum(p.numel() for p in learn.round_params)
                opt.zero_grad()
                loss.backward()
                opt.step()
        learn.freeze()
        with torch.no_grad():
            q_in = torch.cat([q_bp.block(x) for x in q_in.split(batch_size)])
    return time.perf_counter() - start
