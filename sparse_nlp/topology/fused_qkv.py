"""Fused query / key / value projections: which output features of the one layer are queries, keys and values.

Several architectures compute q, k and v with one linear layer, so a topology update treats the three as one budget
and a gradient-driven method moves weights between them: in GPT-2, value gradients are ~900x those of queries and
keys at initialisation (11-27x after 150 steps), and RigL moved 74-78% of ``c_attn``'s weights into its value third.
``SparsityConfig(fused_qkv="split")`` makes q, k and v separate topology units (``q_k_v_rows``), each with its own
budget, as if the model had three projections; the default ``joint`` keeps one unit per layer.

The known layouts are the rows of ``sparse_nlp.architectures.FUSED_QKV``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from sparse_nlp.architectures import FUSED_QKV

if TYPE_CHECKING:
    from sparse_nlp.methods.base import LayerState

ROLES = ("q", "k", "v")


def output_roles(model: nn.Module, layer_name: str) -> Optional[torch.Tensor]:
    """Role (0 q, 1 k, 2 v) of each output feature of the fused projection ``layer_name``; None if it is not one."""
    parent_name, _, attribute = layer_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    layout = FUSED_QKV.get(type(parent).__name__)
    if layout is None or layout[0] != attribute:
        return None
    if getattr(parent, "is_cross_attention", False):  # GPT-2 cross-attention: c_attn holds k and v only
        return None
    return layout[1](parent)


def q_k_v_rows(model: nn.Module, layer_name: str, out_features: int) -> Optional[list[torch.Tensor]]:
    """The output features of q, k and v (three index tensors) of a fused projection, or None."""
    roles = output_roles(model, layer_name)
    if roles is None:
        return None
    if roles.numel() != out_features:
        raise ValueError(f"{layer_name}: the q/k/v layout names {roles.numel()} output features, the layer has "
                         f"{out_features}; pass fused_qkv='joint' for this model.")
    return [(roles == role).nonzero().squeeze(1) for role in range(len(ROLES))]


class RowSlice:
    """Some output features of a layer as a topology unit of their own: copies out of, and back into, a LayerState."""

    def __init__(self, rows: torch.Tensor, out_dim: int, role: str):
        self.rows = rows
        self.out_dim = out_dim  # 0: nn.Linear's [out, in]; 1: Conv1D's [in, out]
        self.role = role

    def _take(self, tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if tensor is None else tensor.index_select(self.out_dim, self.rows.to(tensor.device))

    def unit_state(self, layer: "LayerState") -> "LayerState":
        from sparse_nlp.methods.base import LayerState

        share = self.rows.numel() / layer.mask.shape[self.out_dim]
        return LayerState(
            f"{layer.name}[{self.role}]", self._take(layer.magnitude), self._take(layer.mask),
            round(layer.target_units * share), layer.generator, momentum=self._take(layer.momentum),
            gradient=self._take(layer.gradient),
            initial_units=None if layer.initial_units is None else round(layer.initial_units * share),
        )

    @torch.no_grad()
    def write_back(self, layer: "LayerState", unit: "LayerState", grown: torch.Tensor) -> torch.Tensor:
        """Copy the unit's mask rows into the layer's; return ``grown`` as flat positions of the layer."""
        rows = self.rows.to(layer.mask.device)
        layer.mask.index_copy_(self.out_dim, rows, unit.mask)
        positions = torch.arange(layer.mask.numel(), device=rows.device).view(layer.mask.shape)
        return positions.index_select(self.out_dim, rows).reshape(-1)[grown.to(rows.device)]


def q_k_v_slices(model: nn.Module, layer_name: str, layer: nn.Module) -> Optional[list[RowSlice]]:
    """The q, k and v units of a fused projection (a SparseLinear), or None if it is not one."""
    rows = q_k_v_rows(model, layer_name, layer.out_features)
    if rows is None:
        return None
    out_dim = 1 if layer.stores_in_out else 0
    return [RowSlice(r, out_dim, role) for r, role in zip(rows, ROLES)]
