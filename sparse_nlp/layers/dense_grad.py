"""The dense weight gradient of a block-sparse layer: how it is collected, and its moments over optimizer steps.

A block layer stores only its live blocks, so the optimizer knows nothing of the absent ones. For their momentum the
layer can collect the dense gradient dY^T X in backward (``DenseGradTap``), and ``DenseGradientMoments`` keeps its
first and second moments: window sums over the steps just before an update (``block_momentum="fast"``), or running
averages over every step (``exact``). Every block, live or absent, then gets a momentum on one scale: mean /
sqrt(mean square) per weight, as Adam normalises its own.
"""
from __future__ import annotations

from typing import Optional

import torch

from sparse_nlp.precision import has_fast_bf16


def dense_grad_dtype(device: torch.device) -> torch.dtype:
    """bf16 where GEMMs in it are fast (CUDA with bf16, CPUs with AVX512-BF16/AMX through oneDNN), else fp32."""
    return torch.bfloat16 if has_fast_bf16(device.type) else torch.float32


class DenseGradTap(torch.autograd.Function):
    """y unchanged (a copy: the model may add to it in place); backward also returns the dense dW = dY^T X as the
    probe's gradient, in bf16 where the hardware has fast bf16.

    The sums only rank blocks by mean |momentum|, so bf16 inputs (fp32 accumulation inside the GEMM, fp32 sums
    across steps) are plenty, and the GEMM, the cost of the momentum window, runs ~2x faster.
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor, x: torch.Tensor, probe: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        ctx.save_for_backward(x.detach())
        ctx.dtype = dtype
        return y.clone()

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        (x,) = ctx.saved_tensors
        n, k = grad_y.shape[-1], x.shape[-1]
        dense = grad_y.reshape(-1, n).to(ctx.dtype).t() @ x.reshape(-1, k).to(ctx.dtype)  # [out, in]
        return grad_y, None, dense.float(), None


class DenseGradientMoments:
    """First (and optionally second) moments of a layer's dense gradients [out, in] over optimizer steps."""

    # Names in checkpoints (the controller saves ``state()`` per layer); kept as the first release wrote them.
    STATE = ("dense_grad_sum", "dense_grad_sq_sum", "dense_grad_ema", "dense_grad_sq_ema")

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.dense_grad_sum: Optional[torch.Tensor] = None  # fast: the window's steps summed ...
        self.dense_grad_sq_sum: Optional[torch.Tensor] = None  # ... and their squares
        self.dense_grad_steps = 0  # fast: optimizer steps in the sums
        self.dense_grad_ema: Optional[torch.Tensor] = None  # exact: exponential average over every step ...
        self.dense_grad_sq_ema: Optional[torch.Tensor] = None  # ... and of the squares

    @torch.no_grad()
    def add(self, step: torch.Tensor, ema_beta: Optional[float], squares: bool = True) -> None:
        """Fold one optimizer step's dense gradient in (under DDP: already averaged over ranks).

        ``ema_beta`` set (exact): into running averages. None (fast): into the window's sums; the means are taken
        at the update. ``squares``: keep the second moments too (only the one-scale block scores and
        ``regrown_state="fresh"`` read them).
        """
        if ema_beta is None:
            if self.dense_grad_sum is None:
                self.dense_grad_sum = step
                self.dense_grad_sq_sum = step * step if squares else None
            else:
                self.dense_grad_sum.add_(step)
                if squares:
                    self.dense_grad_sq_sum.addcmul_(step, step)
            self.dense_grad_steps += 1
            return
        if self.dense_grad_ema is None:
            self.dense_grad_ema = torch.zeros_like(step)
            self.dense_grad_sq_ema = torch.zeros_like(step) if squares else None
        self.dense_grad_ema.mul_(ema_beta).add_(step, alpha=1 - ema_beta)
        if squares:
            self.dense_grad_sq_ema.mul_(ema_beta).addcmul_(step, step, value=1 - ema_beta)

    def _mean(self, ema: Optional[torch.Tensor], window_sum: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The running average if there is one, else the window's sum over its steps; None if nothing was kept."""
        if ema is not None:
            return ema
        if window_sum is not None and self.dense_grad_steps:
            return window_sum / self.dense_grad_steps
        return None

    def average(self) -> Optional[torch.Tensor]:
        """The mean dense gradient; None if nothing was collected."""
        return self._mean(self.dense_grad_ema, self.dense_grad_sum)

    def mean_square(self) -> Optional[torch.Tensor]:
        """The mean square of each weight's collected gradients ([out, in]); None unless squares were kept."""
        return self._mean(self.dense_grad_sq_ema, self.dense_grad_sq_sum)

    def momentum(self, adam: str = "normalized") -> Optional[torch.Tensor]:
        """What stands in for the momentum of every block (live and absent) at a topology update, or None.

        ``normalized``: mean / sqrt(mean square) of each weight's gradients, scale-free as Adam's exp_avg /
        sqrt(exp_avg_sq), so blocks of weights whose gradients differ in scale (a fused query-key-value projection)
        compete on how consistent their gradients are; ``raw``: the mean gradient.
        """
        mean = self.average()
        if mean is None or adam == "raw":
            return mean
        mean_sq = self.mean_square()
        if mean_sq is None:
            raise ValueError("no second moments were collected: add(..., squares=True) keeps them.")
        rms = mean_sq.sqrt()
        return torch.where(rms > 0, mean / rms.clamp_min(torch.finfo(rms.dtype).tiny), torch.zeros_like(mean))

    def state(self) -> Optional[dict]:
        """The moments, for a checkpoint taken inside a window (None when there are none)."""
        state = {key: getattr(self, key) for key in self.STATE if getattr(self, key) is not None}
        return {**state, "dense_grad_steps": self.dense_grad_steps} if state else None

    def load_state(self, state: Optional[dict], device: torch.device) -> None:
        self.clear()
        for key, value in (state or {}).items():
            setattr(self, key, value.to(device) if isinstance(value, torch.Tensor) else value)
