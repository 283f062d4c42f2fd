"""The small-dense baselines: a narrower dense model whose linear layers (or all of whose parameters) hold as many
weights as a sparse one's nonzeros.

    shape = small_dense_shape(config, density=0.1)     # {"n_embd": 80, "n_head": 1} for a 4-layer, 256-wide GPT-2
    shape = small_dense_shape(config, 0.1, match="total")  # {"n_embd": 112, "n_head": 2}: embeddings counted too
    linear_layer_sizes(config)                          # {"transformer.h.0.attn.c_attn": 196608, ...}

"Linear layers" are the layers `sparsify` patches by default: every nn.Linear / Conv1D but the output embedding.
Models are built on the meta device, so counting costs no memory and no time to speak of.

The width rule: keep the depth, and choose the hidden width (a multiple of ``multiple``, 8 by default) whose linear
weights come closest to ``density`` x the full model's (the final nonzero linear weights of a sparse model at that
density); the MLP width scales with it where the config fixes it (``n_inner`` / ``intermediate_size``). Heads keep
the full model's head size where they can: width / head size, rounded, at least 1, lowered until it divides the
width. Embeddings shrink with the width too; they stay dense in every model, so tables report them separately.

``match="total"`` (the study's ``small_dense_total``) applies the same rule to *all* parameters instead: the width
whose parameter count comes closest to the sparse model's nonzeros, ``density`` x its linear weights + everything
else it holds dense (token and position embeddings, norms, biases; tied weights once). A sparse model's dense
embeddings make it hold 1.4-2.6x the linear-matched small-dense model's parameters at densities 0.2-0.05; this one
holds as many to within half a width step: -0.7% / -3.8% / +3.1% for the study's GPT-2 at 0.2 / 0.1 / 0.05
(multiple 8; widths 136 / 112 / 104).
"""
from __future__ import annotations

import copy

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from sparse_nlp.model import find_target_layers

SCALED_WITH_WIDTH = ("n_inner", "intermediate_size")  # MLP width fields scaled in proportion, where set
MATCHES = ("linear", "total")  # what the small-dense model's parameters equal: linear nonzeros, or all nonzeros


def linear_layer_sizes(config: PretrainedConfig) -> dict[str, int]:
    """Weights of each layer `sparsify` would patch in a model of ``config``, by module name."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: module.weight.numel() for name, module in find_target_layers(model)}


def linear_weight_count(config: PretrainedConfig) -> int:
    return sum(linear_layer_sizes(config).values())


def parameter_count(config: PretrainedConfig) -> int:
    """Every parameter of a model of ``config`` (tied weights once, as ``model.parameters()`` yields them)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def sparse_nonzeros(config: PretrainedConfig, density: float) -> float:
    """Nonzero parameters of the full model sparsified at ``density``: its linear weights at that density, the rest
    dense."""
    linear = linear_weight_count(config)
    return density * linear + parameter_count(config) - linear


def with_width(config: PretrainedConfig, width: int) -> PretrainedConfig:
    """A copy of ``config`` at hidden width ``width``: heads by the width rule, the MLP scaled in proportion."""
    full_width, full_heads = config.hidden_size, config.num_attention_heads
    head_size = full_width // full_heads
    heads = max(1, round(width / head_size))
    while width % heads:
        heads -= 1
    narrow = copy.deepcopy(config)
    narrow.hidden_size, narrow.num_attention_heads = width, heads  # GPT-2's attribute_map: n_embd, n_head
    for name in SCALED_WITH_WIDTH:
        if getattr(config, name, None) is not None:
            setattr(narrow, name, max(1, round(getattr(config, name) * width / full_width)))
    return narrow


def small_dense_shape(config: PretrainedConfig, density: float, multiple: int = 8,
                      match: str = "linear") -> dict[str, int]:
    """The config changes of the small-dense model at ``density``: {"n_embd": ..., "n_head": ...} (GPT-2 names;
    ``hidden_size`` / ``num_attention_heads`` for other models), plus any scaled MLP width. ``match``: "linear"
    (its linear weights equal the sparse model's nonzero linear weights) or "total" (all its parameters equal all
    the sparse model's nonzeros, embeddings included)."""
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density!r}.")
    if match not in MATCHES:
        raise ValueError(f"unknown match {match!r}; choose {' or '.join(MATCHES)}.")
    full_width = config.hidden_size
    count = linear_weight_count if match == "linear" else parameter_count
    target = density * linear_weight_count(config) if match == "linear" else sparse_nonzeros(config, density)
    best, best_gap = None, None
    for width in range(multiple, full_width + 1, multiple):
        narrow = with_width(config, width)
        gap = abs(count(narrow) - target)
        if best_gap is None or gap < best_gap:
            best, best_gap = narrow, gap
    if best is None:
        raise ValueError(f"hidden width {full_width} is below the width multiple {multiple}.")
    names = _config_names(config)
    shape = {names["hidden_size"]: best.hidden_size, names["num_attention_heads"]: best.num_attention_heads}
    shape.update({name: getattr(best, name) for name in SCALED_WITH_WIDTH if getattr(config, name, None) is not None})
    return shape


def _config_names(config: PretrainedConfig) -> dict[str, str]:
    """The config's own names of hidden_size and num_attention_heads (GPT-2: n_embd, n_head)."""
    own = getattr(config, "attribute_map", {})  # {standard name: the config's own attribute}
    return {standard: own.get(standard, standard) for standard in ("hidden_size", "num_attention_heads")}
