"""The masked linear product of a fine-grained sparse layer.

The forward uses ``weight * mask``; the backward hands the *dense* gradient to the weight (a straight-through
mask). Sparse momentum needs that: the momentum of an absent weight is the optimizer's running average of
gradients at that position, so gradients must reach masked positions. The controller zeroes masked weights
after every optimizer step, so the optimizer's updates there never leak into the forward.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


class _StraightThroughMask(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, weight, 0)  # not weight * mask: NaN * 0 would leak NaN from absent weights

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output, None


def masked_weight(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``weight`` with absent positions 0, whose gradient w.r.t. ``weight`` is dense."""
    return _StraightThroughMask.apply(weight, mask)


def masked_linear(
    x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: Optional[torch.Tensor], weight_is_in_out: bool
) -> torch.Tensor:
    """``x @ (weight*mask)^T + bias`` for nn.Linear's [out, in] weight, or ``x @ (weight*mask) + bias`` for Conv1D."""
    w = masked_weight(weight, mask)
    return F.linear(x, w.t() if weight_is_in_out else w, bias)
