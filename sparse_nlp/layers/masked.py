"""`SparseLinear`: wraps an ``nn.Linear`` or transformers ``Conv1D`` and owns its mask.

The original layer stays inside as ``base_layer`` (so unpatching is just taking it back out). The mask is a
boolean buffer of the weight's own shape and layout; topology updates change its contents in place, never the
tensor itself, so references to it (optimizers, DDP buffers, hooks) stay valid. The one exception: under FSDP2 the
first ``apply_mask`` after ``fully_shard`` replaces the whole mask by a DTensor sharded like the weight
(``sparse_nlp.parallel.fsdp``), once, as ``fully_shard`` itself replaced the weight.

The product: the forward uses ``weight * mask``; the backward hands the *dense* gradient to the weight (a
straight-through mask). Sparse momentum needs that: the momentum of an absent weight is the optimizer's running average of
gradients at that position, so gradients must reach masked positions. The controller zeroes masked weights
after every optimizer step, so the optimizer's updates there never leak into the forward.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import nn

from sparse_nlp.layers.base import LINEAR_TYPES, SparseLayer, stores_in_out
from sparse_nlp.methods.base import LayerState
from sparse_nlp.parallel.fsdp import is_sharded, local, local_part, positions_mask, shard_like, whole

if TYPE_CHECKING:
    from sparse_nlp.topology.context import UpdateContext


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


class SparseLinear(SparseLayer):
    def __init__(self, base_layer: nn.Module, mask: torch.Tensor, *, target_units: Optional[int] = None,
                 initial_units: Optional[int] = None):
        super().__init__()
        if not isinstance(base_layer, LINEAR_TYPES):
            raise TypeError(f"SparseLinear wraps nn.Linear or Conv1D, got {type(base_layer).__name__}.")
        if mask.shape != base_layer.weight.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(base_layer.weight.shape)}.")
        self.base_layer = base_layer
        self.stores_in_out = stores_in_out(base_layer)  # Conv1D: [in, out]
        self.register_buffer("mask", mask.to(device=base_layer.weight.device, dtype=torch.bool))
        self.target_units = int(self.mask.sum()) if target_units is None else target_units  # weights
        self.initial_units = initial_units  # gradual pruning's start (None: every weight)
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
    def active_units(self) -> int:
        if is_sharded(self.mask):  # counted when the mask last changed: a sum here would be a collective
            return self._sharded_nonzeros
        return int(self.mask.sum())

    def compute_path(self) -> str:
        return "masked dense"

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

    # ---- topology updates ----------------------------------------------------------------------------------------
    def layer_state(self, name: str, context: "UpdateContext") -> LayerState:
        """The layer's own mask (updated in place), or under FSDP2 whole copies gathered when a method reads them."""
        gradient = None
        if context.method.needs_gradient:
            gradient = self.weight.grad
            if gradient is None:
                raise ValueError(
                    f"method {context.config.method!r} grows by gradient but {name} has none: call controller.step() "
                    "after optimizer.step() and before optimizer.zero_grad()."
                )
        momentum = context.momentum.read if context.method.needs_momentum else None
        if is_sharded(self.mask):  # each tensor gathered at its first read; apply_update writes the shards back
            return LayerState(
                name, lambda: whole(self.weight.data).abs(), self.whole_mask(), self.target_units, context.generator,
                momentum=(lambda: whole(momentum())) if momentum is not None else None,
                gradient=(lambda: whole(gradient)) if gradient is not None else None, initial_units=self.initial_units)
        return LayerState(name, lambda: self.weight.detach().abs(), self.mask, self.target_units, context.generator,
                          momentum=momentum, gradient=gradient, initial_units=self.initial_units)

    @torch.no_grad()
    def apply_update(self, state: LayerState, grown: torch.Tensor, context: "UpdateContext") -> None:
        """Grown weights start at 0 with fresh optimizer slots (``regrown_state``); then rank 0's mask wins (DDP,
        FSDP2), and where it differed from this rank's the slots restart too. Under FSDP2 each rank writes its
        shard of the whole new mask."""
        restart = [grown] if context.reset_regrown else []
        weight = self.weight.data
        if is_sharded(self.mask):
            restart += context.replicas.agree_on([state.mask])
            self.write_mask(state.mask)
            local(weight).masked_fill_(local_part(positions_mask(grown, weight), weight), 0)
        else:  # state.mask is this layer's own mask, already updated in place
            weight.view(-1)[grown] = 0  # a weight regrown where it was just pruned starts from 0 too
            if context.reset_regrown:
                context.momentum.reset(grown, keep_scale=context.keep_scale)
            restart = context.replicas.agree_on([self.mask])
        for positions in restart:
            context.momentum.reset(positions, keep_scale=context.keep_scale)

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
