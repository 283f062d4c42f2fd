"""`SparseLinear`: wraps an ``nn.Linear`` or transformers ``Conv1D`` and owns its mask.

The original layer stays inside as ``base_layer`` (so unpatching is just taking it back out). The mask is a
boolean buffer of the weight's own shape and layout; topology updates change its contents in place, never the
tensor itself, so references to it (optimizers, DDP buffers, hooks) stay valid. The one exception: under FSDP2 the
first ``apply_mask`` after ``fully_shard`` replaces the whole mask by a DTensor sharded like the weight
(``sparse_nlp.parallel.fsdp``), once, as ``fully_shard`` itself replaced the weight.

The product: The forward uses ``weight * mask``; the backward hands the *dense* gradient to the weight (a straight-through
mask). Sparse momentum needs that: the momentum of an absent weight is the optimizer's running average of
gradients at that position, so gradients must reach masked positions. The controller zeroes masked weights
after every optimizer step, so the optimizer's updates there never leak into the forward.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from sparse_nlp.parallel.fsdp import is_sharded, local, local_part, shard_like, whole
from sparse_nlp.layers.base import LINEAR_TYPES, stores_in_out


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
    x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: Optional[torch.Tensor], stores_in_out: bool
) -> torch.Tensor:
    """``x @ (weight*mask)^T + bias`` for nn.Linear's [out, in] weight, or ``x @ (weight*mask) + bias`` for Conv1D."""
    w = masked_weight(weight, mask)
    return F.linear(x, w.t() if stores_in_out else w, bias)


class SparseLinear(nn.Module):
    def __init__(self, base_layer: nn.Module, mask: torch.Tensor):
        super().__init__()
        if not isinstance(base_layer, LINEAR_TYPES):
            raise TypeError(f"SparseLinear wraps nn.Linear or Conv1D, got {type(base_layer).__name__}.")
        if mask.shape != base_layer.weight.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(base_layer.weight.shape)}.")
        self.base_layer = base_layer
        self.stores_in_out = stores_in_out(base_layer)  # Conv1D: [in, out]
        self.register_buffer("mask", mask.to(device=base_layer.weight.device, dtype=torch.bool))
        self.apply_mask()

    @property
    def weight(self) -> nn.Parameter:
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.weight.shape[0] if self.stores_in_out else self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[1] if self.stores_in_out else self.weight.shape[0]

    @property
    def weight_shape(self) -> tuple[int, int]:
        """(out_features, in_features), whatever the stored layout."""
        return (self.out_features, self.in_features)

    @property
    def nonzeros(self) -> int:
        if is_sharded(self.mask):  # counted when the mask last changed: a sum here would be a collective
            return self._sharded_nonzeros
        return int(self.mask.sum())

    @property
    def density(self) -> float:
        return self.nonzeros / self.mask.numel()

    @torch.no_grad()
    def apply_mask(self) -> None:
        """Zero the weights at masked positions (after every optimizer step); NaN there becomes 0 too.

        Under FSDP2 each rank zeroes its own shard; the first call after ``fully_shard`` shards the mask like the weight.
        """
        weight = self.base_layer.weight
        if is_sharded(weight):
            if not is_sharded(self.mask):
                self._shard_mask_like(weight)
            local(weight).masked_fill_(~local(self.mask), 0)
            return
        weight.masked_fill_(~self.mask, 0)

    def _shard_mask_like(self, weight: torch.Tensor) -> None:
        local_part(self.mask, weight)  # checks that the mask's shards line up with the weight's
        self._sharded_nonzeros = int(self.mask.sum())  # still whole, and the same, on every rank
        self.mask = shard_like(self.mask, weight)

    # ---- the whole mask, for topology updates (collectives under FSDP2: call on every rank) -------------------
    def whole_mask(self) -> torch.Tensor:
        """The mask of the whole layer: the buffer itself, or under FSDP2 a gathered copy."""
        return whole(self.mask)

    @torch.no_grad()
    def write_mask(self, mask: torch.Tensor) -> None:
        """Make the layer's mask ``mask`` (whole, the same on every rank); each rank writes its own shard."""
        if is_sharded(self.mask):
            local(self.mask).copy_(local_part(mask, self.mask))
            self._sharded_nonzeros = int(mask.sum())
        elif mask is not self.mask:
            self.mask.copy_(mask)

    def recount(self) -> None:
        """Under FSDP2, recount the active weights after the mask was loaded from a checkpoint."""
        if is_sharded(self.mask):
            self._sharded_nonzeros = int(self.whole_mask().sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if is_sharded(self.mask):
            # FSDP2 gathered the weight, which apply_mask keeps exactly 0 at absent positions on every shard: the
            # product is already sparse, and its weight gradient dense (as the straight-through mask makes it).
            weight = self.weight
            return F.linear(x, weight.t() if self.stores_in_out else weight, self.bias)
        return masked_linear(x, self.weight, self.mask, self.bias, self.stores_in_out)

    @torch.no_grad()
    def to_base_layer(self) -> nn.Module:
        """The wrapped layer with masked weights folded in (exact zeros)."""
        self.apply_mask()
        return self.base_layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, density={self.density:.4f}"
