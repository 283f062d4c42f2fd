"""`SparseLinear`: wraps an ``nn.Linear`` or transformers ``Conv1D`` and owns its mask.

The original layer stays inside as ``base_layer`` (so unpatching is just taking it back out). The mask is a
boolean buffer of the weight's own shape and layout; topology updates change its contents in place, never the
tensor itself, so references to it (optimizers, DDP buffers, hooks) stay valid.
"""
from __future__ import annotations

import torch
from torch import nn

from sparse_nlp.ops import masked_linear
from sparse_nlp.targeting import LINEAR_TYPES


class SparseLinear(nn.Module):
    def __init__(self, base_layer: nn.Module, mask: torch.Tensor):
        super().__init__()
        if not isinstance(base_layer, LINEAR_TYPES):
            raise TypeError(f"SparseLinear wraps nn.Linear or Conv1D, got {type(base_layer).__name__}.")
        if mask.shape != base_layer.weight.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(base_layer.weight.shape)}.")
        self.base_layer = base_layer
        self.weight_is_in_out = not isinstance(base_layer, nn.Linear)  # Conv1D stores [in, out]
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
        return self.weight.shape[0] if self.weight_is_in_out else self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[1] if self.weight_is_in_out else self.weight.shape[0]

    @property
    def weight_shape(self) -> tuple[int, int]:
        """(out_features, in_features), whatever the stored layout."""
        return (self.out_features, self.in_features)

    @property
    def nonzeros(self) -> int:
        return int(self.mask.sum())

    @property
    def density(self) -> float:
        return self.nonzeros / self.mask.numel()

    @torch.no_grad()
    def apply_mask(self) -> None:
        """Zero the weights at masked positions (after every optimizer step); NaN there becomes 0 too."""
        self.base_layer.weight.masked_fill_(~self.mask, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return masked_linear(x, self.weight, self.mask, self.bias, self.weight_is_in_out)

    @torch.no_grad()
    def to_base_layer(self) -> nn.Module:
        """The wrapped layer with masked weights folded in (exact zeros)."""
        self.apply_mask()
        return self.base_layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, density={self.density:.4f}"
