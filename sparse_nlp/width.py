"""Wider and sparser: widen a model's config by a multiplier F and keep the count of its nonzero linear weights.

    plan = sparse_nlp.plan_widening(GPT2Config(n_embd=256, n_head=4), 4, SparsityConfig(density=1.0, block_size=64))
    model = AutoModelForCausalLM.from_config(plan.config)    # n_embd 1024, n_head 16: head size 64, as before
    sparse_nlp.sparsify(model, config=plan.sparsity)          # each layer at density 1 / 4^2 = 0.0625

Widening multiplies the width and the head counts by F (the head size stays) and the MLP follows the width, so each
linear layer of the blocks holds F^2 times the weights. ``density`` is read as the fraction of the *base dense
model's* linear weights that the widened sparse model holds: each layer keeps density / F^2 of its weights. (Issue
32's study: block-64 sparse momentum at width 1,024 and layer density 0.0625 holds as many nonzero linear weights as
the dense width-256 model and beats it on perplexity.) Which fields each model family widens: ``WIDTH_LAYOUTS`` in
sparse_nlp/architectures.py. Every bad combination fails in one line (ValueError) that says what to use instead.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from sparse_nlp.architectures import WIDTH_LAYOUTS, WidthLayout
from sparse_nlp.config import BLOCK_SIZES, DENSE, SparsityConfig
from sparse_nlp.layers.base import out_in_shape
from sparse_nlp.layers.block import block_grid
from sparse_nlp.model import check_divisible, find_target_layers
from sparse_nlp.topology.allocation import layer_shares, plan_nonzeros

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def check_width_multiplier(multiplier: float) -> None:
    if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)) or not multiplier >= 1 \
            or not math.isfinite(multiplier):
        raise ValueError(f"width_multiplier must be a number >= 1 (it widens the model), got {multiplier!r}; to "
                         "make a model narrower, set its width in its config (e.g. --config_overrides "
                         "n_embd=128,n_head=2).")


def _width_layout(config: PretrainedConfig) -> WidthLayout:
    layout = WIDTH_LAYOUTS.get(getattr(config, "model_type", None))
    if layout is None:
        raise ValueError(f"widening knows {', '.join(sorted(WIDTH_LAYOUTS))} configs, not {type(config).__name__}; "
                         "add its width fields to WIDTH_LAYOUTS in sparse_nlp/architectures.py.")
    return layout


def _is_whole(value: float) -> bool:
    return abs(value - round(value)) <= 1e-9 * max(1.0, abs(value))


def widened_fields(config: PretrainedConfig, multiplier: float) -> dict[str, int]:
    """The config fields that widening by ``multiplier`` changes, with their new values ({} for 1).

    Fields that are None (derived from the width, like GPT-2's n_inner) are left out: they follow by themselves.
    """
    check_width_multiplier(multiplier)
    if multiplier == 1:
        return {}
    layout = _width_layout(config)
    base = {}
    for name in (layout.width, *layout.heads, *layout.follows):
        if getattr(config, name, None) is not None:
            base[name] = int(getattr(config, name))
    whole_step = math.gcd(*base.values())  # multipliers that keep every field whole: the multiples of 1/whole_step
    widened = {}
    for name, value in base.items():
        if not _is_whole(value * multiplier):
            steps = [step for step in (math.floor(multiplier * whole_step), math.ceil(multiplier * whole_step))
                     if step > whole_step]  # the nearest that widen
            options = " or ".join(f"{step / whole_step:g}" for step in steps)
            raise ValueError(f"width_multiplier {multiplier:g} makes {type(config).__name__}.{name} {value} into "
                             f"{value * multiplier:g}, not a whole number; use a multiple of 1/{whole_step} (e.g. "
                             f"{options}), which keeps {', '.join(f'{k}={v}' for k, v in base.items())} whole.")
        widened[name] = int(round(value * multiplier))
    for divisor, dividend in layout.divides:
        if divisor in widened and dividend in widened and widened[dividend] % widened[divisor]:
            raise ValueError(f"widened {type(config).__name__}: {divisor} {widened[divisor]} does not divide "
                             f"{dividend} {widened[dividend]} (nor does the base's {base[divisor]} divide "
                             f"{base[dividend]}); give the base model a {divisor} that divides its {dividend}.")
    return widened


def widen_config(config: PretrainedConfig, multiplier: float) -> PretrainedConfig:
    """A copy of ``config`` with its width and head counts multiplied by ``multiplier`` (head size kept) and its MLP
    following the width; the original is unchanged. A multiplier of 1 returns an unchanged copy of any config."""
    changes = widened_fields(config, multiplier)
    widened = copy.deepcopy(config)
    for name, value in changes.items():
        setattr(widened, name, value)
    return widened


def _ceil_significant(value: float, digits: int = 3) -> float:
    """``value`` rounded up to ``digits`` significant digits (a bound that is still a bound when printed)."""
    step = 10.0 ** (math.floor(math.log10(value)) - digits + 1)
    return math.ceil(value / step - 1e-6) * step


def widened_layer_density(density: float, multiplier: float) -> float:
    """Each layer's density in the model widened by ``multiplier``, so that it holds ``density`` x the base dense
    model's linear weights: density / multiplier^2 (4 and 1.0 give 0.0625)."""
    check_width_multiplier(multiplier)
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not density > 0 \
            or not math.isfinite(density):
        raise ValueError(f"density must be a number > 0, got {density!r}.")
    layer_density = density / multiplier ** 2
    if layer_density > 1:
        raise ValueError(f"density {density:g} at width_multiplier {multiplier:g} asks each layer for density "
                         f"{layer_density:g} > 1 (density / multiplier^2); use density <= {multiplier ** 2:g} or "
                         f"width_multiplier >= {_ceil_significant(math.sqrt(density), 4):g}.")
    return layer_density


def _unit_shapes(targets: list[tuple[str, nn.Module]], block_size: int) -> list[tuple[int, int]]:
    """What sparsify plans over: weights, or blocks of the [out, in] grid."""
    return [out_in_shape(m) if block_size == 1 else block_grid(out_in_shape(m), block_size) for _, m in targets]


def _every_layer_live(shapes: list[tuple[int, int]], density: float, distribution: str) -> bool:
    return min(plan_nonzeros(shapes, density, distribution)) >= 1


def _smallest_live_density(shapes: list[tuple[int, int]], distribution: str) -> float:
    """The smallest layer density from which on sparsify gives every layer at least one live unit.

    Largest-remainder rounding is not monotone (a total that works can be followed by one that leaves a layer
    empty), so this walks down from a total that provably works: one at which every layer's proportional part is at
    least 1 (a layer capped at dense only hands its overflow to the others).
    """
    total_units = sum(math.prod(shape) for shape in shapes)
    shares = layer_shares(shapes, distribution)
    lowest = min(total_units, math.ceil(sum(shares) / min(shares)))
    while lowest > 1 and _every_layer_live(shapes, (lowest - 1) / total_units, distribution):
        lowest -= 1
    return lowest / total_units


def _largest_live_block(targets: list[tuple[str, nn.Module]], sparsity: SparsityConfig) -> Optional[int]:
    """The largest block size below ``sparsity.block_size`` that divides every target and leaves each a live block."""
    for block_size in sorted((b for b in BLOCK_SIZES if b < sparsity.block_size), reverse=True):
        divides = all(dim % block_size == 0 for _, m in targets for dim in out_in_shape(m))
        if divides and _every_layer_live(_unit_shapes(targets, block_size), sparsity.density, sparsity.distribution):
            return block_size
    return None


def check_live_layers(model: nn.Module, sparsity: SparsityConfig, multiplier: float = 1.0) -> None:
    """Fail in one line where ``sparsify(model, config=sparsity)`` would leave a target layer without one live unit
    (a weight, or a block) or where ``block_size`` does not divide a target's shape. ``model`` may be on the meta
    device; ``sparsity.density`` is the layer density, ``multiplier`` the widening it came from (for the message)."""
    targets = find_target_layers(model, sparsity.target_modules, sparsity.target_regex)
    block_size = sparsity.block_size
    if block_size > 1:
        check_divisible(targets, block_size)
    shapes = _unit_shapes(targets, block_size)
    planned = plan_nonzeros(shapes, sparsity.density, sparsity.distribution)
    if min(planned) >= 1:
        return
    name = targets[planned.index(0)][0]
    unit = "weight" if block_size == 1 else f"{block_size}x{block_size} block"
    base_density = sparsity.density * multiplier ** 2
    smallest = _ceil_significant(_smallest_live_density(shapes, sparsity.distribution) * multiplier ** 2)
    if smallest <= 1:
        advice = f"use density >= {smallest:g}" + (" or a smaller block_size" if block_size > 1 else "")
    else:
        block = _largest_live_block(targets, sparsity)
        advice = "no density up to 1 gives it one; use " + (f"block_size {block}" if block else "a smaller block_size")
    raise ValueError(f"density {base_density:g} at width_multiplier {multiplier:g} (layer density "
                     f"{sparsity.density:.3g}) leaves {name} ({math.prod(shapes[planned.index(0)])} {unit}s) without "
                     f"a live {unit}: {advice}.")


@dataclass(frozen=True)
class WideningPlan:
    """A widened model's config and sparsity, from ``plan_widening``."""

    config: PretrainedConfig  # the widened model's config (a copy)
    sparsity: SparsityConfig  # the given settings with density = the layer density (density / multiplier^2)
    changes: dict[str, int]  # the config fields widened and their new values ({} for multiplier 1)
    multiplier: float
    density: float  # the fraction of the base dense model's linear weights that the widened sparse model holds


def plan_widening(config: PretrainedConfig, multiplier: float, sparsity: SparsityConfig) -> WideningPlan:
    """Widen ``config`` by ``multiplier`` and turn ``sparsity.density`` (a fraction of the base dense model's linear
    weights) into the layer density of the widened model, checking that every target layer keeps a live unit.

    ``initial_density`` (gradual pruning) below 1 is read the same way; 1 (start dense) stays 1. The targets are
    found on the widened model built on the meta device by ``AutoModelForCausalLM.from_config`` (no memory).
    """
    if sparsity.method == DENSE:
        raise ValueError("width_multiplier widens a sparse model and method 'dense' trains none; to train a wider "
                         "dense model, set its width in its config (e.g. --config_overrides n_embd=1024,n_head=16).")
    from transformers import AutoModelForCausalLM  # here: importing it costs ~0.4 s

    changes = widened_fields(config, multiplier)
    layer_density = widened_layer_density(sparsity.density, multiplier)
    initial = sparsity.initial_density if sparsity.initial_density == 1 else sparsity.initial_density / multiplier ** 2
    layer_sparsity = dataclasses.replace(sparsity, density=layer_density, initial_density=initial)
    widened = widen_config(config, multiplier)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(widened)
    check_live_layers(model, layer_sparsity, multiplier)
    return WideningPlan(widened, layer_sparsity, changes, multiplier, sparsity.density)
