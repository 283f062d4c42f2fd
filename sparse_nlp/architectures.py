"""Per-architecture facts, in one table each: what sparse_nlp knows of a model family's module layout.

- ``FUSED_QKV``: attention modules that compute q, k and v with one linear layer, and which output features of it
  are queries, keys and values (``fused_qkv="split"``, ``sparse_nlp.topology.fused_qkv``).
- ``MLP_LAYOUTS``: where each model type keeps its MLP's projections (``sparse_nlp.export.compact_export``).
- ``ATTENTION_PARTS``: names that mark a linear layer as part of attention rather than the MLP (reports and plots).
- ``WIDTH_LAYOUTS``: the config fields that set a model family's width, heads and MLP size (``sparse_nlp.width``).

Add a family by adding its row here.

Each known layout names the output features of each role (0 query, 1 key, 2 value):
- GPT-2 ``attn.c_attn`` (Conv1D, out = 3 x width): [q | k | v];
- GPT-NeoX ``attention.query_key_value``: per head [q | k | v] (heads x 3 x head_size);
- Falcon ``self_attention.query_key_value``: per kv group [queries | k | v] (new architecture), [q heads | k | v]
  (multi-query), or per head [q | k | v];
- Phi-3 ``self_attn.qkv_proj``: [q (heads x head_dim) | k | v (kv heads x head_dim each)].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


# ---- fused q/k/v projections: the role (0 query, 1 key, 2 value) of each output feature ------------------------------
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
FUSED_QKV: dict[str, tuple[str, Callable[[nn.Module], torch.Tensor]]] = {
    "GPT2Attention": ("c_attn", _gpt2),
    "GPTNeoXAttention": ("query_key_value", _gpt_neox),
    "FalconAttention": ("query_key_value", _falcon),
    "Phi3Attention": ("qkv_proj", _phi3),
}


# ---- MLPs: where the hidden units are --------------------------------------------------------------------------------
@dataclass(frozen=True)
class MLPLayout:
    """Where an architecture keeps its MLP: module paths relative to one MLP block, and its config field."""

    blocks: Callable[[nn.Module], list[nn.Module]]  # the modules that each hold one MLP's projections
    inputs: tuple[str, ...]  # projections into the hidden units (rows = units)
    output: str  # projection out of the hidden units (columns = units)
    hidden_of_zero: Callable[[nn.Module, int], torch.Tensor]  # each unit's value for a zero input
    config_field: str


def _gpt2_hidden(block, width):
    return block.act(block.c_fc(torch.zeros(1, width)))[0]


MLP_LAYOUTS = {
    "gpt2": MLPLayout(lambda m: [b.mlp for b in m.transformer.h], ("c_fc",), "c_proj", _gpt2_hidden, "n_inner"),
    "llama": MLPLayout(
        lambda m: [layer.mlp for layer in m.model.layers],
        ("gate_proj", "up_proj"),
        "down_proj",
        lambda b, w: (b.act_fn(b.gate_proj(torch.zeros(1, w))) * b.up_proj(torch.zeros(1, w)))[0],
        "intermediate_size",
    ),
    "opt": MLPLayout(
        lambda m: list(m.model.decoder.layers),
        ("fc1",),
        "fc2",
        lambda b, w: b.activation_fn(b.fc1(torch.zeros(1, w)))[0],
        "ffn_dim",
    ),
}


# ---- attention or MLP, by a layer's name -----------------------------------------------------------------------------
ATTENTION_PARTS = ("attention", "q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value")  # and "*attn*"


def is_attention_layer(name: str) -> bool:
    """Attention projection (True) or MLP / other linear layer (False), judged by the layer's name."""
    return any("attn" in part or part in ATTENTION_PARTS for part in name.lower().split("."))


# ---- width: the config fields a width multiplier scales -------------------------------------------------------------
@dataclass(frozen=True)
class WidthLayout:
    """The config fields that set a model's width. Widening by F multiplies each by F; the head size stays, so every
    linear layer of the blocks grows F x F (F^2 weights)."""

    width: str  # the residual stream's width
    heads: tuple[str, ...]  # head counts: query heads, then key/value heads where they are separate
    follows: tuple[str, ...]  # other sizes that follow the width (the MLP's); None (derived from the width) stays None
    divides: tuple[tuple[str, str], ...]  # (a, b): field a must divide field b


_LLAMA_WIDTH = WidthLayout(  # head_dim is its own field: hidden_size need not be heads x head_dim
    "hidden_size", ("num_attention_heads", "num_key_value_heads"), ("intermediate_size",),
    (("num_key_value_heads", "num_attention_heads"),),
)
_GROUPED_HEADS_WIDTH = WidthLayout(  # head size = hidden_size / num_attention_heads
    "hidden_size", ("num_attention_heads", "num_key_value_heads"), ("intermediate_size",),
    (("num_attention_heads", "hidden_size"), ("num_key_value_heads", "num_attention_heads")),
)

# config.model_type -> its width fields
WIDTH_LAYOUTS = {
    "gpt2": WidthLayout("n_embd", ("n_head",), ("n_inner",), (("n_head", "n_embd"),)),  # n_inner None: 4 x n_embd
    "llama": _LLAMA_WIDTH,
    "mistral": _LLAMA_WIDTH,
    "qwen2": _GROUPED_HEADS_WIDTH,
    "phi3": _GROUPED_HEADS_WIDTH,
    "gpt_neox": WidthLayout("hidden_size", ("num_attention_heads",), ("intermediate_size",),
                            (("num_attention_heads", "hidden_size"),)),
    "opt": WidthLayout("hidden_size", ("num_attention_heads",), ("ffn_dim", "word_embed_proj_dim"),
                       (("num_attention_heads", "hidden_size"),)),
}
