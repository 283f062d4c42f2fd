"""Fused query / key / value projections: which output features of the one layer are queries, keys and values.

Several architectures compute q, k and v with one linear layer, so a topology update treats the three as one budget
and a gradient-driven method moves weights between them: in GPT-2, value gradients are ~900x those of queries and
keys at initialisation (11-27x after 150 steps), and RigL moved 74-78% of ``c_attn``'s weights into its value third.
``SparsityConfig(fused_qkv="split")`` makes q, k and v separate topology units (``q_k_v_rows``), each with its own
budget, as if the model had three projections; the default ``joint`` keeps one unit per layer.

Each known layout names the output features of each role (0 query, 1 key, 2 value):
- GPT-2 ``attn.c_attn`` (Conv1D, out = 3 x width): [q | k | v];
- GPT-NeoX ``attention.query_key_value``: per head [q | k | v] (heads x 3 x head_size);
- Falcon ``self_attention.query_key_value``: per kv group [queries | k | v] (new architecture), [q heads | k | v]
  (multi-query), or per head [q | k | v];
- Phi-3 ``self_attn.qkv_proj``: [q (heads x head_dim) | k | v (kv heads x head_dim each)].
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

ROLES = ("q", "k", "v")


def _blocks(*sizes: int) -> torch.Tensor:
    """[0] * sizes[0] + [1] * sizes[1] + [2] * sizes[2]."""
    return torch.cat([torch.full((size,), role) for role, size in enumerate(sizes)])


def _per_group(groups: int, pattern: torch.Tensor, width: int) -> torch.Tensor:
    """``pattern`` (one role per slot of a group) repeated for each of ``groups``, each slot ``width`` features wide."""
    return pattern.repeat_interleave(width).repeat(groups)


def _gpt2(attention: nn.Module) -> torch.Tensor:
    return _blocks(attention.split_size, attention.split_size, attention.split_size)


def _gpt_neox(attention: nn.Module) -> torch.Tensor:
    config = attention.config
    return _per_group(config.num_attention_heads, torch.arange(3), attention.head_size)


def _falcon(attention: nn.Module) -> torch.Tensor:
    heads, head_dim = attention.num_heads, attention.head_dim
    if attention.new_decoder_architecture:
        per_group = heads // attention.num_kv_heads
        return _per_group(attention.num_kv_heads, _blocks(per_group, 1, 1), head_dim)
    if attention.multi_query:
        return _blocks(heads * head_dim, head_dim, head_dim)
    return _per_group(heads, torch.arange(3), head_dim)


def _phi3(attention: nn.Module) -> torch.Tensor:
    config = attention.config
    kv = attention.num_key_value_heads * attention.head_dim
    return _blocks(config.num_attention_heads * attention.head_dim, kv, kv)


# attention class name -> (the fused projection's attribute, its output features' roles)
LAYOUTS: dict[str, tuple[str, Callable[[nn.Module], torch.Tensor]]] = {
    "GPT2Attention": ("c_attn", _gpt2),
    "GPTNeoXAttention": ("query_key_value", _gpt_neox),
    "FalconAttention": ("query_key_value", _falcon),
    "Phi3Attention": ("qkv_proj", _phi3),
}


def output_roles(model: nn.Module, layer_name: str) -> Optional[torch.Tensor]:
    """Role (0 q, 1 k, 2 v) of each output feature of the fused projection ``layer_name``; None if it is not one."""
    parent_name, _, attribute = layer_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    layout = LAYOUTS.get(type(parent).__name__)
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
        from sparse_nlp.methods import LayerState

        share = self.rows.numel() / layer.mask.shape[self.out_dim]
        return LayerState(
            name=f"{layer.name}[{self.role}]", weight=self._take(layer.weight), mask=self._take(layer.mask),
            momentum=self._take(layer.momentum), gradient=self._take(layer.gradient),
            target_nonzeros=round(layer.target_nonzeros * share), generator=layer.generator,
            initial_nonzeros=None if layer.initial_nonzeros is None else round(layer.initial_nonzeros * share),
        )

    @torch.no_grad()
    def write_back(self, layer: "LayerState", unit: "LayerState", grown: torch.Tensor) -> torch.Tensor:
        """Copy the unit's mask and weight rows into the layer's; return ``grown`` as flat positions of the layer."""
        rows = self.rows.to(layer.mask.device)
        layer.mask.index_copy_(self.out_dim, rows, unit.mask)
        layer.weight.index_copy_(self.out_dim, rows, unit.weight)
        positions = torch.arange(layer.mask.numel(), device=rows.device).view(layer.mask.shape)
        return positions.index_select(self.out_dim, rows).reshape(-1)[grown.to(rows.device)]


def q_k_v_slices(model: nn.Module, layer_name: str, layer: nn.Module) -> Optional[list[RowSlice]]:
    """The q, k and v units of a fused projection (a SparseLinear), or None if it is not one."""
    rows = q_k_v_rows(model, layer_name, layer.out_features)
    if rows is None:
        return None
    out_dim = 1 if layer.stores_in_out else 0
    return [RowSlice(r, out_dim, role) for r, role in zip(rows, ROLES)]
